"""Iterative MALT (``malt-jax iterate``) on the tiny random model and the parity task (trees
2x2x2, 4 training, 6 evaluation and 2 validation questions): round 1 is the plain pipeline, later
rounds sample with the previous round's adapters and train from them, the threshold schedule, the
stop on no gain, resumption, the validation questions, and configs refused naming the field."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from malt_jax import cli
from malt_jax.config import ConfigError, IterateConfig, RunConfig, load_run_config, to_dict
from malt_jax.model.base_model import load_model
from malt_jax.roles import ROLES
from malt_jax.stages import expand as expand_stage
from malt_jax.stages.rundir import load_adapter
from malt_jax.tasks.base import question_key
from malt_jax.training import role as role_module
from malt_jax.workflows import iterate as iterate_mod
from malt_jax.workflows.iterate import round_dir, run_iterative
from malt_jax.workflows.pipeline import run
from tests.fixtures import write_tiny_config
from tests.parity_task import ParityTask

# the parity task has the same 12 questions in every split: 4 train + 6 eval leave 2 for validation
THREE = "iterate: {rounds: 3, val_questions: 2}\n"
SCORES = {1: 0.5, 2: 1.0, 3: 0.5}  # forced validation MALT+MV@3 accuracy per round: round 3 loses


def _cfg(tmp: Path, run: str, extra: str = "", overrides: tuple[str, ...] = ()) -> RunConfig:
    path = write_tiny_config(tmp / f"{run}.yaml", tmp / run, task="parity", extra=extra)
    return load_run_config(path, list(overrides))


def _bytes(d: Path, names=ROLES) -> dict[str, bytes]:
    return {r: (d / f"{r}.safetensors").read_bytes() for r in names}


def _forced(real):
    def score(ev, votes, r):
        out = real(ev, votes, r)
        return {n: {**v, "accuracy": SCORES[r]} for n, v in out.items()}

    return score


@pytest.fixture(scope="module")
def model():
    return load_model("random", load_run_config(None, ["model_preset=tiny"]).model)


@pytest.fixture(scope="module")
def three(tmp_path_factory, model):
    """Three rounds (stop on no gain, validation scores forced by SCORES: round 3 does not gain),
    with the trees' sampling adapters and the training starts recorded."""
    tmp = tmp_path_factory.mktemp("iterate")
    cfg = _cfg(tmp, "three", THREE)
    sampled, starts = [], []
    real_sample, real_train = expand_stage.sample_trees, role_module.train_role

    def sample(*args, **kw):
        if kw.get("desc") == "expand (train trees)":
            sampled.append({"adapters": kw["adapters"], "seed": kw["seed"], "mode": args[3].mode})
        return real_sample(*args, **kw)

    def train(*args, **kw):
        starts.append({"ckpt": Path(args[7]), "init": kw.get("init")})
        return real_train(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(expand_stage, "sample_trees", sample)
        mp.setattr(role_module, "train_role", train)
        mp.setattr(iterate_mod, "validation_accuracy", _forced(iterate_mod.validation_accuracy))
        out = run_iterative(cfg, model=model, task=ParityTask(), progress=False, command="malt-jax iterate c.yaml")
    return tmp, cfg, out, sampled, starts


def _same(a, b) -> bool:
    return (
        a is None
        and b is None
        or (
            a is not None
            and b is not None
            and all(
                np.array_equal(np.asarray(a["layers"][n][f]), np.asarray(b["layers"][n][f]))
                for n in a["layers"]
                for f in "ab"
            )
        )
    )


def test_one_round_is_exactly_the_plain_pipeline(tmp_path, model):
    plain = _cfg(tmp_path, "plain")
    run(plain, stages=("expand", "credit", "train"), model=model, task=ParityTask(), progress=False)
    one = _cfg(tmp_path, "one", "iterate: {rounds: 1, val_questions: 2}\n")
    out = run_iterative(one, model=model, task=ParityTask(), progress=False, evaluate=False)
    state = out["iterate"]
    assert state["rounds_run"] == 1 and state["final_round"] == 1 and state["thresholds"] == [0.5]
    plain_dir, one_dir = Path(plain.run_dir), Path(one.run_dir)
    want = _bytes(plain_dir / "adapters", [f"{r}{s}" for r in ROLES for s in ("", "_sft")])
    assert _bytes(one_dir / "round_1" / "adapters", list(want)) == want
    assert _bytes(one_dir / "adapters", list(want)) == want  # the final adapters, published
    for a, b in zip(
        sorted((plain_dir / "expansion").glob("*.npz")), sorted((one_dir / "round_1/expansion").glob("*.npz"))
    ):
        with np.load(a) as x, np.load(b) as y:
            assert sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    assert (plain_dir / "credit" / "G_sft.jsonl").read_text() == (one_dir / "round_1/credit/G_sft.jsonl").read_text()
    # a default iterate section (one round) is not part of a run's identity
    assert "iterate" not in to_dict(RunConfig(), identity_only=True)
    assert load_run_config(None, ["iterate.rounds=1"]).hash() == RunConfig().hash()
    assert load_run_config(None, ["iterate.rounds=2"]).hash() != RunConfig().hash()


def test_later_rounds_sample_with_and_train_from_the_previous_adapters(three):
    tmp, cfg, _, sampled, starts = three
    run_dir = Path(cfg.run_dir)
    assert len(sampled) == 3  # one expansion call per round (2 batches each)
    assert sampled[0]["adapters"] == (None, None, None) and sampled[0]["mode"] == "extend"
    assert [s["seed"] for s in sampled] == [cfg.train.seed, cfg.train.seed + 1, cfg.train.seed + 2]
    for r in (2, 3):
        prev = {role: load_adapter(round_dir(run_dir, r - 1) / "adapters" / f"{role}.safetensors") for role in ROLES}
        assert sampled[r - 1]["mode"] == "fork"
        assert all(_same(a, prev[role]) for a, role in zip(sampled[r - 1]["adapters"], ROLES))
    # round 1 trains from fresh adapters, later rounds from the previous round's (init: previous)
    by_round = {}
    for s in starts:
        by_round.setdefault(s["ckpt"].parent.parent.name, []).append(s)
    assert [s["init"] for s in by_round["round_1"]] == [None, None, None]
    for r in (2, 3):
        prev_dir = round_dir(run_dir, r - 1) / "adapters"
        for s in by_round[f"round_{r}"]:
            role = s["ckpt"].name.split("_")[0]
            assert _same(s["init"], load_adapter(prev_dir / f"{role}.safetensors"))
    # the trees of round 2 are not those of round 1 (other adapters, other keys)
    g1 = [json.loads(x)["G"] for x in (run_dir / "round_1/expansion/batch_00000.jsonl").read_text().splitlines()]
    g2 = [json.loads(x)["G"] for x in (run_dir / "round_2/expansion/batch_00000.jsonl").read_text().splitlines()]
    assert g1 != g2


def test_threshold_schedule(three):
    _, cfg, out, _, _ = three
    assert IterateConfig(rounds=3).round_thresholds(0.5) == (0.5, 0.7, 0.9)
    assert IterateConfig(rounds=5).round_thresholds(0.5) == (0.5, 0.6, 0.7, 0.8, 0.9)
    assert IterateConfig(rounds=1).round_thresholds(0.37) == (0.37,)
    assert IterateConfig(rounds=2).round_thresholds(0.95) == (0.95, 0.95)  # never lowered
    assert IterateConfig(rounds=2, thresholds=(0.6, 0.8)).round_thresholds(0.5) == (0.6, 0.8)
    run_dir = Path(cfg.run_dir)
    used = [json.loads((round_dir(run_dir, r) / "credit/summary.json").read_text())["threshold"] for r in (1, 2, 3)]
    assert used == pytest.approx([0.5, 0.7, 0.9])
    assert [r["threshold"] for r in out["iterate"]["rounds"]] == [0.5, 0.7, 0.9]


def test_stop_on_no_gain_keeps_the_previous_adapters(three):
    _, cfg, out, _, _ = three
    run_dir = Path(cfg.run_dir)
    state = out["iterate"]
    assert state["rounds_run"] == 3 and state["final_round"] == 2
    assert state["stop_reason"].startswith("no gain: round 3's validation malt+MV@3 accuracy 0.5000 is not above")
    assert [r["gain"] for r in state["rounds"]] == [None, True, False]
    assert _bytes(run_dir / "adapters") == _bytes(round_dir(run_dir, 2) / "adapters")
    assert _bytes(run_dir / "adapters") != _bytes(round_dir(run_dir, 3) / "adapters")
    assert json.loads((run_dir / "iterate.json").read_text()) == json.loads(json.dumps(state))
    # the final adapters are evaluated on the evaluation questions with every system of `run`
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_eval"] == 6 and summary["iterate"]["final_round"] == 2
    assert {"single-greedy", "single+MV@3", "chain+MV@3", "malt", "malt+MV@3"} <= set(summary["systems"])
    report = (run_dir / "report.md").read_text()
    assert "## Iterations" in report and "Stop reason: no gain: round 3" in report and "2 (final)" in report
    for rec in state["rounds"]:
        v = rec["validation"]["malt+MV@3"]
        assert v["n"] == 2 and len(v["ci95"]) == 2 and set(rec["validation"]) == {"malt", "malt+MV@3"}


def test_a_rerun_after_a_stop_midway_continues_to_the_same_final_adapters(three, tmp_path, model):
    _, cfg, out, _, _ = three
    src = Path(cfg.run_dir)
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)  # a moved or copied run resumes
    # as if killed while round 2 trained its refiner: round 3, R's final adapter, the validation
    # rows and every final output gone
    for name in ("round_3", "adapters", "eval", "summary.json", "report.md", "iterate.json"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (dst / "round_2/adapters/R.safetensors").unlink()
    shutil.rmtree(dst / "round_2/eval")
    copy = dataclasses.replace(cfg, run_dir=str(dst))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iterate_mod, "validation_accuracy", _forced(iterate_mod.validation_accuracy))
        part = run_iterative(copy, model=model, task=ParityTask(), progress=False, evaluate=False, stop_after=2)
        assert part["stopped_at"] == 2 and part["iterate"]["final_round"] is None
        assert not (dst / "round_3").exists() and not (dst / "adapters").exists()
        done = run_iterative(copy, model=model, task=ParityTask(), progress=False, evaluate=False)
    assert _bytes(dst / "adapters") == _bytes(src / "adapters")
    for r in (2, 3):
        assert _bytes(round_dir(dst, r) / "adapters") == _bytes(round_dir(src, r) / "adapters")
    assert done["iterate"]["rounds"] == out["iterate"]["rounds"]
    assert done["iterate"]["stop_reason"] == out["iterate"]["stop_reason"]


def test_validation_questions_are_disjoint_from_training_and_evaluation(three):
    _, cfg, _, _, _ = three
    run_dir = Path(cfg.run_dir)
    splits = json.loads((run_dir / "splits.json").read_text())
    val_ids = json.loads((run_dir / "validation.json").read_text())["validation"]
    task = ParityTask()
    by_id = {e.id: e for s in ("train", "test", "validation") for e in task.load(s)}
    assert len(val_ids) == 2 and all(i.startswith("validation-") for i in val_ids)
    used = {question_key(by_id[i].question) for i in splits["train"] + splits["eval"]}
    assert not used & {question_key(by_id[i].question) for i in val_ids}  # also by text, not only by id
    rows = [json.loads(x) for x in (round_dir(run_dir, 1) / "eval" / "malt.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == val_ids


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["iterate.rounds=0"], "iterate.rounds"),
        (["iterate.rounds=2", "iterate.thresholds=[0.5]"], "iterate.thresholds"),
        (["iterate.rounds=2", "iterate.thresholds=[0.5, 1.2]"], "iterate.thresholds"),
        (["iterate.init=scratch"], "iterate.init"),
        (["iterate.val_questions=0"], "iterate.val_questions"),
        (["iterate.stop_on_no_gain=maybe"], "iterate.stop_on_no_gain"),
    ],
)
def test_bad_iterate_configs_are_refused_at_load_naming_the_field(tmp_path, overrides, key):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="parity")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}") and "\n" not in msg, msg


def test_too_few_validation_questions_are_refused_before_any_write(tmp_path, model):
    cfg = _cfg(tmp_path, "out", "iterate: {rounds: 2, val_questions: 3}\n")  # only 2 are left
    with pytest.raises(ConfigError, match=r"^iterate.val_questions: 3 asked, .* only 2 question\(s\)"):
        run_iterative(cfg, model=model, task=ParityTask(), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock.0"]
    # `malt-jax run` runs one round: a config of several is refused, naming the field
    with pytest.raises(ConfigError, match="^iterate.rounds: 2 rounds are run by malt-jax iterate"):
        run(dataclasses.replace(cfg, iterate=IterateConfig(rounds=2, val_questions=2)), model=model, task=ParityTask())


def test_cli_iterate_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="tests.parity_task:ParityTask")
    assert cli.main(["iterate", str(path), "iterate.rounds=2", "iterate.val_questions=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("malt-jax: error: iterate.val_questions: 5 asked") and "\n" not in err
    assert not (tmp_path / "out" / "config.yaml").exists()
    assert cli.main(["run", str(path), "iterate.rounds=2"]) == 2
    assert capsys.readouterr().err.startswith("malt-jax: error: iterate.rounds: 2 rounds are run by malt-jax iterate")
