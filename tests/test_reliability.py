"""Reliability: bad input, interruption (real SIGKILL), numerical faults, safe grading.

1. Bad input gets a clear error that names the culprit (config key, data file and line,
   weight file, checkpoint tensor, role with no training data), and the CLI turns each into
   one ``malt-jax: error: ...`` line with exit code 2.
2. Interruption: the whole pipeline runs in a subprocess (``reliability_driver.py``, tiny
   random model, ``ParityTask``) that is SIGKILLed during expansion, training and evaluation;
   the reruns resume from the last completed unit and the final artifacts are identical to an
   uninterrupted reference run.
3. Numerical faults: NaN/Inf in the loss stops training with a message naming role and step;
   the last checkpoint holds exactly the pre-fault state and resuming from it loses nothing.
4. Grading safety: an adversarial corpus goes through every task's grader in bounded time
   without executing anything (tripwires on eval/exec/os.system/Popen/pickle, sentinel files).

``CASES`` counts the cases per category (``test_case_counts`` prints them).
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from malt_jax import cli
from malt_jax.config import ConfigError, LoraConfig, ModelConfig, TrainConfig, load_run_config
from malt_jax.model.llama import init_params
from malt_jax.model.weights import WeightError
from malt_jax.runtime.checkpoint import Checkpointer, CheckpointError
from malt_jax.tasks import DataError, Example, get_task
from malt_jax.training import data as D
from malt_jax.training.role import NonFiniteError, train_role
from malt_jax.workflows import pipeline

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("reliability_driver.py")

# ==============================================================================================
# helpers


def _cli(argv: list[str]) -> tuple[int, str]:
    """Runs ``malt-jax`` in-process; (exit code, stderr). Any escaping exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _assert_one_line_error(rc: int, stderr: str, *needles: str) -> str:
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("malt-jax: error: "), stderr
    assert stderr.strip().count("malt-jax: error:") == 1 and "\n" not in line
    for n in needles:
        assert n in line, (n, line)
    return line


def _set(d: dict, dotted: str, value) -> dict:
    node = d
    *parents, last = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return d


BASE_CFG = {  # a valid, small config (synthetic task, tiny random model)
    "name": "reliability",
    "model_preset": "tiny",
    "weights": "random",
    "task": {"name": "synthetic", "num_train": 4, "num_eval": 4, "options": {"train_size": 20, "test_size": 20}},
    "sampling": {"temperature": 1.0, "max_new_tokens": 6},
    "tree": {"n": 2, "m": 2, "l": 2, "questions_per_batch": 1},
    "lora": {"rank": 2, "targets": ["wq", "wv"]},
    "train": {"sft_epochs": 1, "dpo_epochs": 1, "batch_size": 2, "max_seq_len": 128},
    "eval": {"votes": 2, "max_new_tokens": 6, "bootstrap_samples": 50},
}


def _write_cfg(tmp: Path, data: dict | str, name: str = "cfg") -> Path:
    path = tmp / f"{name}.yaml"
    if isinstance(data, dict):
        data = {"run_dir": str(tmp / f"{name}_run"), **data}
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(data)
    return path


# ==============================================================================================
# 1. bad input


# (case id, mutation of BASE_CFG or raw YAML text, CLI overrides, text the error must contain)
CONFIG_CASES = [
    ("unknown top-level key", lambda d: _set(d, "lerning_rate", 1e-3), [], "unknown config key lerning_rate"),
    ("unknown nested key", lambda d: _set(d, "train.lerning_rate", 1e-3), [], "train.lerning_rate"),
    ("unknown model key", lambda d: _set(d, "model.dimm", 8), [], "model.dimm"),
    ("int expected", lambda d: _set(d, "train.batch_size", "eight"), [], "train.batch_size"),
    ("bool expected", lambda d: _set(d, "tree.share_prefix", "maybe"), [], "tree.share_prefix"),
    ("float expected", lambda d: _set(d, "sampling.temperature", "hot"), [], "sampling.temperature"),
    ("list expected", lambda d: _set(d, "lora.targets", 5), [], "lora.targets"),
    ("mapping expected", lambda d: _set(d, "eval", 3), [], "eval: expected a mapping"),
    ("literal expected", lambda d: _set(d, "train.dpo_loss", "hinge"), [], "train.dpo_loss"),
    ("model field type", lambda d: _set(d, "model.dim", "wide"), [], "model.dim"),
    ("unknown preset", lambda d: _set(d, "model_preset", "gpt-5"), [], "model_preset"),
    ("zero tree width", lambda d: _set(d, "tree.n", 0), [], "tree.n must be >= 1"),
    ("negative batch size", lambda d: _set(d, "train.batch_size", -2), [], "train.batch_size must be >= 1"),
    ("zero eval questions", lambda d: _set(d, "task.num_eval", 0), [], "task.num_eval must be >= 1"),
    ("zero lora rank", lambda d: _set(d, "lora.rank", 0), [], "lora.rank must be >= 1"),
    ("bad override value", None, ["train.batch_size=lots"], "train.batch_size"),
    ("override without =", None, ["train.batch_size"], "key=value"),
    ("invalid YAML", "name: [unclosed\n", [], "invalid YAML at line 2"),
    ("top level not a mapping", "- a\n- b\n", [], "top level must be a mapping"),
    ("missing config file", "MISSING", [], "config file not found"),
]

# errors found when the task is built (pipeline.make_task), still before any model work
TASK_CASES = [
    ("unknown task", lambda d: _set(d, "task.name", "gsm9k"), "unknown task 'gsm9k'"),
    ("unknown task option", lambda d: _set(d, "task.options.max_vlaue", 20), "max_vlaue"),
    ("bad task option value", lambda d: _set(d, "task.options.steps", "abc"), "steps must be an int"),
    ("too many questions asked", lambda d: _set(d, "task.num_train", 10_000), "num_train=10000"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_name_the_key(case, tmp_path):
    _, change, overrides, needle = case
    if change == "MISSING":
        path = tmp_path / "missing.yaml"
    elif isinstance(change, str):
        path = _write_cfg(tmp_path, change)
    else:
        data = copy.deepcopy(BASE_CFG)
        if change:
            change(data)
        path = _write_cfg(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    assert needle in str(info.value)
    _assert_one_line_error(*_cli(["run", str(path), *overrides, "--no-progress"]), needle)


@pytest.mark.parametrize("case", TASK_CASES, ids=[c[0] for c in TASK_CASES])
def test_task_config_errors_name_the_option(case, tmp_path):
    _, change, needle = case
    data = change(copy.deepcopy(BASE_CFG))
    path = _write_cfg(tmp_path, data)
    cfg = load_run_config(path)
    with pytest.raises(ValueError) as info:
        pipeline.load_splits(cfg, pipeline.make_task(cfg), tmp_path)
    assert needle in str(info.value)
    t0 = time.monotonic()
    _assert_one_line_error(*_cli(["run", str(path), "--no-progress"]), needle)
    assert time.monotonic() - t0 < 30  # reported before the model is loaded


def test_cli_subprocess_exit_code_and_single_line(tmp_path):
    """The real ``python -m malt_jax run`` process: exit code 2, one stderr line, no traceback."""
    path = _write_cfg(tmp_path, _set(copy.deepcopy(BASE_CFG), "train.lerning_rate", 1e-3))
    proc = subprocess.run(
        [sys.executable, "-m", "malt_jax", "run", str(path), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "train.lerning_rate")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------- data rows

GSM_OK = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
MATH_OK = {"problem": "What is 1/2 + 0?", "answer": "\\frac{1}{2}"}
CSQA_OK = {
    "id": "c",
    "question": "Where is money kept?",
    "choices": {"label": ["A", "B"], "text": ["bank", "library"]},
    "answerKey": "A",
}
CSQA_ORIG_OK = {
    "id": "o",
    "answerKey": "B",
    "question": {
        "stem": "Where are books kept?",
        "choices": [{"label": "A", "text": "bank"}, {"label": "B", "text": "library"}],
    },
}

# (case id, task, good row, bad line as written to the file, text the reason must contain)
ROW_CASES = [
    ("gsm8k invalid JSON", "gsm8k", GSM_OK, '{"question": "q", "answer": ', "invalid JSON"),
    ("gsm8k row not an object", "gsm8k", GSM_OK, "[1, 2]", "JSON object"),
    ("gsm8k missing question", "gsm8k", GSM_OK, {"answer": "#### 1"}, "'question'"),
    ("gsm8k question not a string", "gsm8k", GSM_OK, {"question": 7, "answer": "#### 1"}, "'question' must be str"),
    ("gsm8k answer null", "gsm8k", GSM_OK, {"question": "q", "answer": None}, "'answer'"),
    ("gsm8k no #### line", "gsm8k", GSM_OK, {"question": "q", "answer": "it is 5"}, "####"),
    ("gsm8k #### not a number", "gsm8k", GSM_OK, {"question": "q", "answer": "#### five"}, "not a number"),
    ("math invalid JSON", "math", MATH_OK, '{"problem": ', "invalid JSON"),
    ("math missing problem", "math", MATH_OK, {"answer": "1"}, "'problem'"),
    ("math problem not a string", "math", MATH_OK, {"problem": ["p"], "answer": "1"}, "'problem' must be str"),
    ("math no answer and no boxed", "math", MATH_OK, {"problem": "p", "solution": "no box here"}, "boxed"),
    ("csqa answerKey not a label", "csqa", CSQA_OK, {**CSQA_OK, "answerKey": "E"}, "answerKey 'E'"),
    (
        "csqa label/text mismatch",
        "csqa",
        CSQA_OK,
        {**CSQA_OK, "choices": {"label": ["A", "B"], "text": ["bank"]}},
        "differ in length",
    ),
    ("csqa missing answerKey", "csqa", CSQA_OK, {k: v for k, v in CSQA_OK.items() if k != "answerKey"}, "answerKey"),
    ("csqa choices not a mapping", "csqa", CSQA_OK, {**CSQA_OK, "choices": ["bank", "library"]}, "'choices'"),
    (
        "csqa empty choices",
        "csqa",
        CSQA_ORIG_OK,
        {**CSQA_ORIG_OK, "question": {"stem": "s", "choices": []}},
        "no choices",
    ),
    (
        "csqa choice without label",
        "csqa",
        CSQA_ORIG_OK,
        {**CSQA_ORIG_OK, "question": {"stem": "s", "choices": [{"text": "bank"}]}},
        "'label'",
    ),
]


def _data_file(tmp: Path, good: dict, bad, bad_line: int = 3, n_good: int = 5) -> Path:
    def row(i):  # distinct questions (duplicates are never split across train/eval)
        r = {**good, "id": f"r{i}"}
        for k in ("question", "problem"):
            if isinstance(r.get(k), str):
                r[k] = f"{r[k]} ({i})"
        return json.dumps(r)

    lines = [row(i) for i in range(n_good)]
    lines.insert(bad_line - 1, bad if isinstance(bad, str) else json.dumps(bad))
    path = tmp / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_malformed_row_names_file_and_line_or_is_skipped(case, tmp_path):
    _, name, good, bad, reason = case
    path = _data_file(tmp_path, good, bad, bad_line=3)
    with pytest.raises(DataError) as info:
        get_task(name, path=path).load("train")
    assert str(info.value).startswith(f"{path}:3: "), str(info.value)
    assert reason in str(info.value) and info.value.line == 3
    task = get_task(name, path=path, on_error="skip")
    assert len(task.load("train")) == 5
    assert task.skipped == {"train": 1} and task.errors["train"][0].startswith(f"{path}:3: ")


def test_math_json_tree_malformed_file_is_named(tmp_path):
    root = tmp_path / "MATH" / "train" / "algebra"
    root.mkdir(parents=True)
    (root / "1.json").write_text(json.dumps({"problem": "p", "solution": "so \\boxed{2}"}))
    (root / "2.json").write_text('{"problem": "p",\n "solution": ')
    with pytest.raises(DataError, match=r"2\.json:2: invalid JSON"):
        get_task("math", path=tmp_path / "MATH").load("train")
    task = get_task("math", path=tmp_path / "MATH", on_error="skip")
    assert [e.answer for e in task.load("train")] == ["2"] and task.skipped["train"] == 1


def test_malformed_dataset_through_the_cli_and_skip_option(tmp_path):
    path = _data_file(tmp_path, GSM_OK, {"question": "q", "answer": "#### five"}, bad_line=4, n_good=8)
    data = copy.deepcopy(BASE_CFG)
    data["task"] = {"name": "gsm8k", "path": str(path), "num_train": 2, "num_eval": 2}
    cfg_path = _write_cfg(tmp_path, data)
    _assert_one_line_error(*_cli(["run", str(cfg_path), "--no-progress"]), f"{path}:4:", "not a number")
    # task.options.on_error: skip -> the run proceeds on the good rows and counts the bad one
    cfg = load_run_config(cfg_path, ["task.options.on_error=skip", f"run_dir={tmp_path / 'skip_run'}"])
    task = pipeline.make_task(cfg)
    train, evals = pipeline.load_splits(cfg, task, tmp_path)
    assert len(train) == 2 and len(evals) == 2
    assert task.skipped == {"train": 1, "test": 1} and f"{path}:4:" in task.errors["train"][0]


# ---------------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    from malt_jax.model.weights import save_hf

    cfg = ModelConfig.tiny()
    out = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(init_params(cfg, jax.random.key(0)), cfg, out)
    return out


def _gguf_prefix(dst: Path, n_bytes: int) -> Path:
    from malt_jax.model.files import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return dst


def _hf_variant(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    change(dst)
    return dst


def _edit_json(key, value):
    def change(d: Path):
        c = json.loads((d / "config.json").read_text())
        if value is None:
            c.pop(key)
        else:
            c[key] = value
        (d / "config.json").write_text(json.dumps(c))

    return change


def _truncate(n_bytes):
    def change(d: Path):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: n_bytes if n_bytes >= 0 else f.stat().st_size // 2])

    return change


# (case id, builder(tmp, hf_dir) -> weights path, text the error must contain)
WEIGHT_CASES = [
    ("missing gguf", lambda t, hf: t / "nope.gguf", "not found"),
    ("missing directory", lambda t, hf: t / "no_such_dir", "not found"),
    ("gguf truncated to 256 KB", lambda t, hf: _gguf_prefix(t / "cut.gguf", 1 << 18), "truncated"),
    ("gguf truncated to 32 bytes", lambda t, hf: _gguf_prefix(t / "cut32.gguf", 32), "truncated"),
    ("not a gguf", lambda t, hf: (t / "junk.gguf").write_bytes(os.urandom(256)) and t / "junk.gguf", "GGUF"),
    ("safetensors truncated by half", lambda t, hf: _hf_variant(hf, t / "h", _truncate(-1)), "truncated"),
    ("safetensors truncated header", lambda t, hf: _hf_variant(hf, t / "h", _truncate(20)), "truncated"),
    ("safetensors empty", lambda t, hf: _hf_variant(hf, t / "h", _truncate(0)), "truncated"),
    (
        "safetensors missing",
        lambda t, hf: _hf_variant(hf, t / "h", lambda d: (d / "model.safetensors").unlink()),
        "no *.safetensors",
    ),
    (
        "config.json missing key",
        lambda t, hf: _hf_variant(hf, t / "h", _edit_json("num_hidden_layers", None)),
        "num_hidden_layers",
    ),
    (
        "config.json wrong type",
        lambda t, hf: _hf_variant(hf, t / "h", _edit_json("num_hidden_layers", "two")),
        "n_layers",
    ),
    (
        "config.json invalid JSON",
        lambda t, hf: _hf_variant(hf, t / "h", lambda d: (d / "config.json").write_text("{")),
        "invalid JSON",
    ),
    (
        "config.json shape != tensors",
        lambda t, hf: _hf_variant(hf, t / "h", _edit_json("hidden_size", 128)),
        "expected (128,)",
    ),
    (
        "config.json more layers than tensors",
        lambda t, hf: _hf_variant(hf, t / "h", _edit_json("num_hidden_layers", 3)),
        "model.layers.2",
    ),
]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_named(case, tmp_path, hf_tiny):
    _, build, needle = case
    weights = build(tmp_path, hf_tiny)
    with pytest.raises((WeightError, ConfigError)) as info:
        pipeline.load_model(str(weights))
    assert needle in str(info.value)
    cfg_path = _write_cfg(tmp_path, {**copy.deepcopy(BASE_CFG), "weights": str(weights)})
    _assert_one_line_error(*_cli(["run", str(cfg_path), "--no-progress"]), needle)


# ---------------------------------------------------------------------------------- checkpoints

NF_CFG = ModelConfig.tiny(n_layers=1)
NF_LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
NF_TRAIN = TrainConfig(
    learning_rate=1e-2,
    dpo_learning_rate=1e-2,
    warmup_ratio=0.25,
    batch_size=8,
    grad_accum=1,
    max_seq_len=32,
    grad_clip=1.0,
    sft_epochs=2,
    dpo_epochs=1,
    checkpoint_every=1,
)


def _base(cfg: ModelConfig):
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape) if len(s.shape) > 1 else np.ones(s.shape), jnp.float32),
        shapes,
    )


@pytest.fixture(scope="module")
def nf_base():
    return _base(NF_CFG)


def _sft(n, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    w = weights or {}
    return [
        D.SFTExample(
            list(rng.integers(1, 256, rng.integers(2, 8))),
            list(rng.integers(1, 256, rng.integers(2, 9))),
            weight=w.get(i, 1.0),
        )
        for i in range(n)
    ]


def _dpo(n, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    w = weights or {}
    return [
        D.DPOExample(
            list(rng.integers(1, 256, rng.integers(2, 8))),
            list(rng.integers(1, 256, rng.integers(2, 9))),
            list(rng.integers(1, 256, rng.integers(2, 9))),
            weight=w.get(i, 1.0),
        )
        for i in range(n)
    ]


CKPT_CASES = [  # (case id, model config of the second run, LoRA config of the second run, error text)
    ("wider model (dim)", ModelConfig.tiny(n_layers=1, dim=32, n_heads=2, n_kv_heads=1), NF_LORA, "shape"),
    ("more layers", ModelConfig.tiny(n_layers=2), NF_LORA, "shape"),
    ("other LoRA rank", NF_CFG, dataclasses.replace(NF_LORA, rank=2), "shape"),
    ("other LoRA targets", NF_CFG, dataclasses.replace(NF_LORA, targets=("wq", "wv", "wo")), "tensor"),
]


@pytest.mark.parametrize("case", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_checkpoint_from_another_model_shape_is_refused(case, nf_base, tmp_path):
    _, cfg2, lora2, needle = case
    train = dataclasses.replace(NF_TRAIN, sft_epochs=1)
    exs = _sft(8)
    train_role(nf_base, NF_CFG, NF_LORA, train, exs, None, "generator", tmp_path / "ck", progress=False)
    with Checkpointer(tmp_path / "ck") as ck:
        before = ck.all_steps()
    with pytest.raises(CheckpointError) as info:
        train_role(_base(cfg2), cfg2, lora2, train, exs, None, "generator", tmp_path / "ck", progress=False)
    msg = str(info.value)
    assert needle in msg and str(tmp_path / "ck") in msg and "adapter/layers/" in msg, msg
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.all_steps() == before  # nothing overwritten


# ==============================================================================================
# 2. interruption: SIGKILL during expansion, training and evaluation, then resume

RUN_CFG = """\
name: reliability-kill
model_preset: tiny
weights: random
run_dir: {run_dir}
task: {{name: parity, num_train: 4, num_eval: 4, options: {{train_split: train, eval_split: test}}}}
sampling: {{temperature: 1.0, max_new_tokens: 6}}
tree: {{n: 2, m: 2, l: 2, questions_per_batch: 1}}
lora: {{rank: 2, targets: [wq, wv]}}
train: {{sft_epochs: 1, dpo_epochs: 1, batch_size: 2, max_seq_len: 128, checkpoint_every: 1,
         max_sft_examples: 6, max_dpo_pairs: 4}}
eval: {{votes: 2, max_new_tokens: 6, bootstrap_samples: 50}}
"""
RUN_TIMEOUT_S = 420  # one subprocess, cold compilation cache included


def _driver_env(cache: Path) -> dict:
    env = dict(os.environ)
    # one CPU device (no mesh), and a persistent compilation cache shared by all the runs:
    # the reference run fills it, so the killed runs spend their time on real work
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    return env


class Driver:
    """``reliability_driver.py`` on one config, launched as a subprocess."""

    def __init__(self, tmp: Path, name: str, cache: Path):
        self.run_dir = tmp / name
        self.cfg = tmp / f"{name}.yaml"
        self.cfg.write_text(RUN_CFG.format(run_dir=self.run_dir))
        self.env = _driver_env(cache)
        self.logs: list[str] = []

    def start(self) -> tuple[subprocess.Popen, Path]:
        log = self.cfg.with_name(f"{self.run_dir.name}.{len(self.logs)}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(DRIVER), str(self.cfg)], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT
            )
        return proc, log

    def complete(self, timeout: float = RUN_TIMEOUT_S) -> str:
        return self.wait(*self.start(), timeout=timeout)

    def wait(self, proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            pytest.fail(f"driver did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        self.logs.append(log.read_text())
        assert rc == 0, self.logs[-1][-3000:]
        return self.logs[-1]

    def kill_when(self, marker, what: str, timeout: float = RUN_TIMEOUT_S) -> str:
        """Starts a run and SIGKILLs it as soon as ``marker()`` is true."""
        proc, log = self.start()
        deadline = time.monotonic() + timeout
        try:
            while not marker():
                if proc.poll() is not None:
                    pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        self.logs.append(log.read_text())
        return self.logs[-1]


def _ckpt_steps(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def _mtimes(paths) -> dict:
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def kill_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module", autouse=True)
def reference_in_background(request, kill_tmp):
    """Starts the uninterrupted reference run at this module's first test, so that it overlaps
    the quick in-process tests (only when a selected test needs it)."""
    if not any("reference_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    ref = Driver(kill_tmp, "reference", kill_tmp / "jax_cache")
    proc, log = ref.start()
    yield ref, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def reference_run(reference_in_background, kill_tmp):
    ref, proc, log = reference_in_background
    ref.wait(proc, log)
    return kill_tmp, ref.run_dir


def _assert_same_artifacts(a: Path, b: Path) -> None:
    files = lambda d, pat: sorted(p.relative_to(d) for p in d.glob(pat))  # noqa: E731
    # expansion: every batch's arrays (tokens, log-probs, rewards, ...) and texts
    assert files(a, "expansion/batch_*") == files(b, "expansion/batch_*")
    for rel in files(a, "expansion/batch_*.npz"):
        x, y = np.load(a / rel), np.load(b / rel)
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{rel}:{k}")
    for rel in files(a, "expansion/*.jsonl") + files(a, "credit/*") + files(a, "eval/*.jsonl"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel  # eval: answers, correctness, texts
    assert len(files(a, "eval/*.jsonl")) == 4 and len(files(a, "credit/*.jsonl")) == 6
    for role in pipeline.ROLES:
        assert (a / f"adapters/{role}.safetensors").read_bytes() == (b / f"adapters/{role}.safetensors").read_bytes()
        ha, hb = (
            [
                {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
                for x in (d / f"adapters/{role}_history.jsonl").read_text().splitlines()
            ]
            for d in (a, b)
        )
        assert ha == hb, role
    assert json.loads((a / "done.json").read_text()) == json.loads((b / "done.json").read_text())


def test_sigkill_during_expansion_training_and_eval_then_resume(reference_run):
    tmp, ref_dir = reference_run
    run = Driver(tmp, "killed", tmp / "jax_cache")
    out = run.run_dir

    # 1. killed during expansion, right after the first question batch was written
    run.kill_when(lambda: (out / "expansion" / "batch_00000.npz").exists(), "first expansion batch")
    done = sorted((out / "expansion").glob("batch_*[0-9].npz"))
    assert 1 <= len(done) < 4, done  # really mid-stage
    kept = _mtimes(done)

    # 2. killed during training (verifier), right after its first checkpoint
    v_ckpt = out / "adapters" / "V_ckpt"
    run.kill_when(lambda: bool(_ckpt_steps(v_ckpt)), "first verifier checkpoint")
    assert _mtimes(kept) == kept  # finished batches were not recomputed
    assert len(list((out / "expansion").glob("batch_*[0-9].npz"))) == 4
    assert (out / "adapters" / "G.safetensors").exists() and not (out / "adapters" / "V.safetensors").exists()
    last = json.loads((v_ckpt / str(_ckpt_steps(v_ckpt)[-1]) / "meta" / "metadata").read_text())

    # 3. killed during evaluation, right after the first system's results
    log = run.kill_when(lambda: any((out / "eval").glob("*.jsonl")), "first eval result")
    assert f"verifier: resuming {last['stage']} at step {last['stage_step']}/" in log, log[-2000:]
    assert "generator: resuming" not in log  # a finished role is loaded, not retrained
    evals = sorted((out / "eval").glob("*.jsonl"))
    assert 1 <= len(evals) < 4, evals
    kept_eval = _mtimes(evals)

    # 4. the rerun finishes; results equal the uninterrupted run's
    run.complete()
    assert _mtimes(kept_eval) == kept_eval and _mtimes(kept) == kept
    _assert_same_artifacts(ref_dir, out)


def test_empty_training_set_keeps_base_model(reference_run, tmp_path, caplog):
    """No positive trajectory after credit assignment: training warns, naming each role, that it
    keeps the base model, and writes untrained adapters (LoRA b = 0, i.e. the base model)."""
    _, ref_dir = reference_run
    cfg_path = _write_cfg(tmp_path, copy.deepcopy(BASE_CFG))
    cfg = load_run_config(cfg_path)
    run_dir = pipeline.prepare_run_dir(cfg)
    (run_dir / "expansion").mkdir()
    for f in sorted((ref_dir / "expansion").glob("batch_*[0-9].npz")):  # a finished expansion, all wrong
        arrays = dict(np.load(f))
        arrays["rewards"] = np.zeros_like(arrays["rewards"])
        np.savez(run_dir / "expansion" / f.name, **arrays)
    for stage in ("credit", "train"):
        with caplog.at_level("WARNING"):
            rc, err = _cli([stage, str(cfg_path), "--no-progress"])
        assert rc == 0 and "Traceback" not in err, err
    summary = json.loads((run_dir / "credit" / "summary.json").read_text())
    assert summary["leaf_accuracy"] == 0.0
    for role, name in pipeline.ROLE_NAMES.items():
        assert f"role {name!r}: no positive trajectories" in caplog.text and "keeps the base model" in caplog.text
        adapter = pipeline.load_adapter(run_dir / "adapters" / f"{role}.safetensors")
        assert all(not np.asarray(ab["b"]).any() for ab in adapter["layers"].values())
        assert (run_dir / "adapters" / f"{role}_epochs.jsonl").read_text() == ""


def test_expansion_written_with_another_batch_size_is_refused(reference_run, tmp_path):
    """Expansion batches are resumed by file name; files from another batch layout (e.g. a run
    resumed on another device count) must not silently drop questions."""
    _, ref_dir = reference_run
    cfg = load_run_config(_write_cfg(tmp_path, _set(copy.deepcopy(BASE_CFG), "tree.questions_per_batch", 2)))
    run_dir = pipeline.prepare_run_dir(cfg)
    (run_dir / "expansion").mkdir()
    for name in ("batch_00000.npz", "batch_00001.npz"):  # 1 question each: questions 2 and 3 are missing
        shutil.copy(ref_dir / "expansion" / name, run_dir / "expansion" / name)
    task = pipeline.make_task(cfg)
    train, _ = pipeline.load_splits(cfg, task, run_dir)
    model = pipeline.load_model("random", cfg.model)
    with pytest.raises(ValueError, match=r"hold 2 question\(s\).*4 training questions.*another batch size"):
        pipeline.run_expand(cfg, model, task, train, run_dir, progress=False)


# ==============================================================================================
# 3. numerical faults


def _restore_like(ckdir: Path, err: NonFiniteError, n_pairs: int | None = None):
    ck = Checkpointer(ckdir)
    try:
        meta = ck.metadata()
        target = {"state": err.state, "best_adapter": err.state.adapter}
        if meta["stage"] == "dpo":
            target["sft_adapter"] = err.state.adapter
            target["ref_logps"] = np.zeros((n_pairs, 2), np.float32)
        restored, _ = ck.restore(target)
        return restored, meta, ck.all_steps()
    finally:
        ck.close()


def _same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _in_batch(n: int, batch: int, epoch: int = 0) -> int:
    """An example index that lands in batch ``batch`` of ``epoch`` (so earlier steps are clean)."""
    return int(dict(D.epoch_batches(n, NF_TRAIN.batch_size, NF_TRAIN.seed, epoch))[batch][0])


def test_huge_learning_rate_stops_with_role_and_step(nf_base, tmp_path):
    train = dataclasses.replace(NF_TRAIN, learning_rate=1e38, warmup_ratio=0.0)  # overflows float32 after one update
    with pytest.raises(NonFiniteError) as info:
        train_role(nf_base, NF_CFG, NF_LORA, train, _sft(24), None, "refiner", tmp_path / "ck", progress=False)
    err = info.value
    step = int(err.state.step)
    assert step >= 1 and f"role 'refiner': non-finite SFT loss at step {step}" in str(err)
    assert "NOT applied" in str(err) and "learning rate" in str(err)
    restored, meta, steps = _restore_like(tmp_path / "ck", err)
    assert meta["stage"] == "sft" and meta["stage_step"] == step and max(steps) == step
    _same(restored["state"], err.state)  # the last checkpoint is exactly the pre-fault state
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))


def test_nan_example_weight_then_fixed_data_resumes_without_loss(nf_base, tmp_path):
    n = 12
    bad = _in_batch(n, batch=1)  # step 1 of epoch 0
    with pytest.raises(NonFiniteError, match=r"role 'generator': non-finite SFT loss at step 1 ") as info:
        train_role(
            nf_base,
            NF_CFG,
            NF_LORA,
            NF_TRAIN,
            _sft(n, weights={bad: float("nan")}),
            None,
            "generator",
            tmp_path / "ck",
            progress=False,
        )
    restored, meta, steps = _restore_like(tmp_path / "ck", info.value)
    assert steps[-1] == 1 and meta["stage_step"] == 1
    _same(restored["state"], info.value.state)
    # fix the data and rerun: resumes from the good checkpoint, ends where a clean run ends
    fixed = train_role(nf_base, NF_CFG, NF_LORA, NF_TRAIN, _sft(n), None, "generator", tmp_path / "ck", progress=False)
    clean = train_role(
        nf_base, NF_CFG, NF_LORA, NF_TRAIN, _sft(n), None, "generator", tmp_path / "clean", progress=False
    )
    _same(fixed.adapter, clean.adapter)
    assert [h["loss"] for h in fixed.history] == [h["loss"] for h in clean.history]


def test_inf_pair_weight_stops_dpo_with_role_and_step(nf_base, tmp_path):
    n = 12
    bad = _in_batch(n, batch=1)
    with pytest.raises(NonFiniteError, match=r"role 'verifier': non-finite DPO loss at step 1 ") as info:
        train_role(
            nf_base,
            NF_CFG,
            NF_LORA,
            dataclasses.replace(NF_TRAIN, sft_epochs=1),
            _sft(8),
            _dpo(n, weights={bad: float("inf")}),
            "verifier",
            tmp_path / "ck",
            progress=False,
        )
    restored, meta, steps = _restore_like(tmp_path / "ck", info.value, n_pairs=n)
    assert meta["stage"] == "dpo" and meta["stage_step"] == 1 and steps[-1] == meta["global_step"]
    _same(restored["state"], info.value.state)
    assert np.isfinite(np.asarray(restored["ref_logps"])).all()


def test_pipeline_training_fault_names_role_and_keeps_last_checkpoint(reference_run, tmp_path):
    """A run whose learning rate blows up: the pipeline stops naming role and step, writes no
    adapter, and the role's checkpoint holds the last finite state."""
    _, ref_dir = reference_run
    cfg = load_run_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "model_preset=tiny",
            "weights=random",
            "lora.rank=2",
            "lora.targets=[wq, wv]",
            "train.batch_size=2",
            "train.max_seq_len=128",
            "train.checkpoint_every=1",
            "train.warmup_ratio=0",
            "train.learning_rate=1e38",
            "train.sft_epochs=2",
        ],
    )
    run_dir = pipeline.prepare_run_dir(cfg)
    shutil.copytree(ref_dir / "credit", run_dir / "credit")
    model = pipeline.load_model("random", cfg.model)
    with pytest.raises(NonFiniteError, match=r"role 'generator': non-finite SFT loss at step [1-9]") as info:
        pipeline.run_train(cfg, model, run_dir, progress=False)
    assert not (run_dir / "adapters" / "G.safetensors").exists()
    restored, meta, _ = _restore_like(run_dir / "adapters" / "G_ckpt", info.value)
    assert meta["stage_step"] == int(info.value.state.step)
    _same(restored["state"], info.value.state)


# ==============================================================================================
# 4. grading safety


def _corpus(sentinel: Path) -> dict[str, str]:
    s = str(sentinel)
    touch = f"__import__('os').system('touch {s}')"
    nested_frac = "\\frac{" * 500 + "1" + "}{2}" * 500
    return {
        # huge numbers
        "huge int": "Final Answer: " + "9" * 1_000_000,
        "huge boxed int": "\\boxed{" + "7" * 200_000 + "}",
        "huge decimal": "The answer is 1." + "0" * 100_000 + "1",
        "latex power tower": "Final Answer: 10^{10^{10^{10}}}",
        "power tower 9": "Final Answer: 9^{9^{9^{9^{9}}}}",
        "python power": "Final Answer: 10**10**10**10",
        "scientific notation": "Final Answer: 1e999999999",
        "factorial": "Final Answer: 100000000!",
        "huge thousands list": "#### " + ",".join(["999"] * 50_000),
        "huge fraction": "Final Answer: \\frac{" + "9" * 5000 + "}{" + "7" * 5000 + "}",
        "nan and inf": "Final Answer: NaN inf -inf Infinity 1e309",
        # deep nesting
        "nested frac": f"Final Answer: {nested_frac}",
        "nested boxed": "\\boxed{" * 50_000 + "1" + "}" * 50_000,
        "unbalanced braces": "{" * 200_000 + "\\boxed{" * 50_000,
        "nested sqrt": "Final Answer: " + "\\sqrt{" * 2000 + "2" + "}" * 2000,
        "nested parens": "Final Answer: " + "(" * 5000 + "1" + ")" * 5000,
        "nested left/right": "Final Answer: " + "\\left(" * 3000 + "x" + "\\right)" * 3000,
        "nested sets": "Final Answer: " + "\\{" * 3000 + "1" + "\\}" * 3000,
        "nested exponents": "Final Answer: " + "x^{" * 3000 + "2" + "}" * 3000,
        "long sum": "Final Answer: " + "+".join(["x"] * 20_000),
        "long tuple": "Final Answer: (" + ",".join(["1"] * 20_000) + ")",
        # megabyte-long strings
        "1 MB filler then answer": "x" * 1_000_000 + "\nFinal Answer: 1",
        "1 MB of Final Answer lines": "Final Answer: A\n" * 70_000,
        "1 MB newlines": "\n" * 1_000_000,
        "1 MB backslashes": "\\" * 1_000_000,
        "1 MB dollars": "$" * 1_000_000,
        "1 MB unicode": "\u2212\u00bd\U0001f600" * 350_000,
        "1 MB 'the answer is'": "the answer is " * 80_000,
        "1 MB digits and commas": "1," * 500_000,
        "regex backtracking bait": "final" + " " * 500_000 + "answer" + " " * 500_000,
        # code injection
        "__import__ os.system": f"Final Answer: {touch}",
        "__import__ in boxed": f"\\boxed{{{touch}}}",
        "eval/exec text": f'Final Answer: eval("{touch}") or exec("{touch}")',
        "open() write": f"Final Answer: open('{s}', 'w').write('x')",
        "dunder escape": "Final Answer: ().__class__.__bases__[0].__subclasses__()",
        "lambda call": f"Final Answer: (lambda: {touch})()",
        "sympy globals escape": "Final Answer: Symbol('x').__class__.__init__.__globals__['__builtins__']"
        f"['__import__']('os').system('touch {s}')",
        "latex \\input/\\write18": f"Final Answer: \\input{{{s}}} \\include{{/etc/passwd}} \\write18{{touch {s}}}",
        "shell substitution": f"Final Answer: $(touch {s}) `touch {s}`",
        "format-string probes": "Final Answer: {0.__class__.__mro__} {self.__dict__} %s%s%s%n",
        "pickle opcodes": f"Final Answer: cos\nsystem\n(S'touch {s}'\ntR.",
        "NUL, surrogates, ANSI": "Final Answer: \x00\ud800\udfff\x1b[2J 1",
        "expression with payload": f"Final Answer: x + __import__('os').system('touch {s}')*0",
        "payload in every position": f"{touch}\n#### {touch}\n\\boxed{{{touch}}}\nThe answer is {touch}",
    }


GRADING_CASES = list(_corpus(Path("/sentinel")))
GRADE_BOUND_S = 10.0  # per string, all tasks together (MATH's symbolic check alone may use 5 s)


@pytest.fixture(scope="module")
def graders():
    tasks = {name: get_task(name) for name in ("gsm8k", "math", "csqa", "synthetic")}
    csqa_ex = Example(
        "c", "Where is money kept?\nA) bank\nB) library", "A", meta={"choices": {"A": "bank", "B": "library"}}
    )
    # warm every code path (imports, regexes, the sympy worker) before timing and tripwires
    assert tasks["math"].grade("Final Answer: $2\\sqrt{2}$", "\\sqrt{8}") == 1
    assert tasks["gsm8k"].grade("#### 1,000", "1000") == 1 and tasks["synthetic"].grade("Final Answer: 7", "7") == 1
    assert tasks["csqa"].grade_example("Final Answer: bank", csqa_ex) == 1
    return tasks, csqa_ex


def _install_tripwires(mp: pytest.MonkeyPatch) -> list[str]:
    """Records (and blocks) any attempt to evaluate code, unpickle, or start a process other than
    the sympy worker; returns the list the attempts are recorded in."""
    calls: list[str] = []
    real_popen = subprocess.Popen

    def wire(name, real=None, allow=lambda a, k: False):
        def f(*a, **k):
            if allow(a, k):
                return real(*a, **k)
            calls.append(f"{name}{a!r}"[:300])
            raise PermissionError(f"tripwire: {name}")

        return f

    for mod, attr in (
        (builtins, "eval"),
        (builtins, "exec"),
        (os, "system"),
        (os, "popen"),
        (os, "execv"),
        (os, "execve"),
        (pickle, "loads"),
    ):
        mp.setattr(mod, attr, wire(f"{mod.__name__}.{attr}"))
    mp.setattr(
        subprocess,
        "Popen",
        wire("subprocess.Popen", real_popen, allow=lambda a, k: "malt_jax.tasks._sympy_worker" in a[0]),
    )
    return calls


@pytest.mark.parametrize("name", GRADING_CASES)
def test_adversarial_output_graded_safely_in_bounded_time(name, graders, tmp_path, capfd):
    tasks, csqa_ex = graders
    sentinel = tmp_path / "PWNED"
    text = _corpus(sentinel)[name]
    golds = {"gsm8k": "1", "math": "x^2", "csqa": "A", "synthetic": "1"}
    results, answers = [], []
    with pytest.MonkeyPatch.context() as mp:
        calls = _install_tripwires(mp)  # only around the graders (pytest itself may exec)
        t0 = time.monotonic()
        for tname, task in tasks.items():
            results.append(task.grade(text, golds[tname]))
            answers.append(task.extract(text))
        results += [tasks["math"].grade(text, "1"), tasks["csqa"].grade_example(text, csqa_ex)]
        elapsed = time.monotonic() - t0
    assert calls == [], calls
    assert elapsed < GRADE_BOUND_S, f"{name}: {elapsed:.1f} s"
    assert set(results) <= {0, 1} and all(a is None or isinstance(a, str) for a in answers)
    assert not sentinel.exists() and not list(tmp_path.iterdir())
    assert "PWNED" not in capfd.readouterr().out


def test_injection_payloads_are_refused_not_matched(graders):
    """Payloads never count as correct answers, even against a gold that looks like them."""
    tasks, _ = graders
    payload = "__import__('os').system('echo hi')"
    assert tasks["math"].grade(f"Final Answer: {payload}", "0") == 0
    assert tasks["gsm8k"].grade(f"Final Answer: {payload}", "0") == 0
    assert tasks["csqa"].grade(f"Final Answer: {payload}", "A") == 0


# ==============================================================================================
# 5. counts

CASES = {
    "bad input": len(CONFIG_CASES) + len(TASK_CASES) + 1 + len(ROW_CASES) + 2 + len(WEIGHT_CASES) + len(CKPT_CASES) + 2,
    "interruption (SIGKILL points)": 3,
    "numerical faults": 4,
    "adversarial grading strings": len(GRADING_CASES),
}


def test_case_counts(capsys):
    assert len(GRADING_CASES) >= 30 and len(ROW_CASES) >= 10 and len(CONFIG_CASES) >= 10
    with capsys.disabled():
        print(
            "\nreliability cases:",
            ", ".join(f"{k}: {v}" for k, v in CASES.items()),
            f"(bad input = {len(CONFIG_CASES)} config + {len(TASK_CASES)} task + 1 CLI subprocess + "
            f"{len(ROW_CASES) + 2} data + {len(WEIGHT_CASES)} weights + {len(CKPT_CASES)} checkpoint + "
            "1 empty training set + 1 mismatched expansion batches; "
            "grading: each string x 4 tasks' graders and extractors)",
        )


def test_checkpoint_from_same_shape_other_model_is_refused(nf_base, tmp_path):
    """Adapter shapes can match across models (here: another vocabulary); the model hash cannot."""
    cfg2 = dataclasses.replace(NF_CFG, vocab_size=NF_CFG.vocab_size + 8)
    train = dataclasses.replace(NF_TRAIN, sft_epochs=1)
    exs = _sft(8)
    train_role(nf_base, NF_CFG, NF_LORA, train, exs, None, "generator", tmp_path / "ck", progress=False)
    with pytest.raises(ValueError, match="another model config"):
        train_role(_base(cfg2), cfg2, NF_LORA, train, exs, None, "generator", tmp_path / "ck", progress=False)
