"""malt-jax rl with ``rl.agents: single``: the single-agent GRPO baseline (G alone, tree.n answers
per question, each rewarded by its own grade) on the tiny random model and the parity task:
depth-1 trees, advantages, G-only training, exact resume, config checks and the evaluation of the
trained generator ("single-trained")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from malt_jax.config import ConfigError, RunConfig, load_run_config, to_dict
from malt_jax.model.lora import lora_scale
from malt_jax.roles import ROLES
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages import rl as rl_stage
from malt_jax.stages.eval import default_systems, primary_names
from malt_jax.stages.rundir import load_adapters
from malt_jax.workflows.rl import initial_adapters, run_rl
from tests.fixtures import (
    RL_SINGLE as SINGLE,
    RL_SINGLE_N as N,
    rl_config,
    rl_metric_rows,
    tiny_model,
    uninterrupted_rl,
    write_tiny_config,
)
from tests.parity_task import ParityTask

SYSTEMS = ["single-greedy", "single", "single+MV@3", "single-trained", "single-trained+MV@3"]


def _cfg(tmp: Path, run: str = "out", extra: tuple[str, ...] = ()) -> RunConfig:
    return rl_config(tmp, SINGLE, run, extra)


def _numpy_advantages(x: np.ndarray, baseline: str, normalize: str, eps: float = 1e-6) -> np.ndarray:
    """GRPO / RLOO / Dr. GRPO advantages of every row of ``x`` [Q, n], written independently."""
    out = np.zeros_like(x, dtype=np.float64)
    for q, row in enumerate(x.astype(np.float64)):
        if row.max() == row.min():
            continue  # a group without signal
        others = np.array([np.delete(row, i).mean() for i in range(len(row))])  # leave-one-out means
        a = row - (row.mean() if baseline == "mean" else others)
        if normalize == "std":
            a = a / (row.std(ddof=1) + eps)
        out[q] = a
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def full(tmp_path_factory, model):
    """An uninterrupted 2-iteration single-agent run (reference: the base model)."""
    return uninterrupted_rl(_cfg(tmp_path_factory.mktemp("rl_single")), model)


def test_single_samples_depth_one_trees_rewarded_by_the_grade_of_g(tmp_path, model):
    cfg = _cfg(tmp_path)
    task = ParityTask()
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    spec = rl_stage.rl_spec(cfg, codec)
    assert spec.depth == 1 and spec.n == N
    questions = task.load("train")[:2]
    start, _ = initial_adapters(cfg)
    arrays = rl_stage.sample_iteration(
        model,
        codec,
        task,
        questions,
        spec,
        seed=3,
        batch_size=2,
        adapters=tuple(start[r] for r in ROLES),  # type: ignore[arg-type]
        lora_scale=lora_scale(cfg.lora),
    )
    assert not any(k.startswith(("V_", "R_")) for k in arrays), sorted(arrays)
    assert arrays["G_lengths"].shape == arrays["rewards"].shape == (2, N)
    # each answer's reward is the task's grade of G's own text (parity: no strict rewards)
    prefix = task.prompts.prefix("G")
    for q, ex in enumerate(questions):
        for i in range(N):
            ids = arrays["G_tokens"][q, i, : arrays["G_lengths"][q, i]].tolist()
            text = prefix + model.tokenizer.decode(ids, skip_special_tokens=True)
            assert arrays["rewards"][q, i] == task.grade_example(text, ex), (q, i)
    assert rl_stage.sampled_tokens(arrays) == int(arrays["G_lengths"].sum()) > 0  # what was sampled
    rows = rl_stage.role_rows(arrays, "G", codec.seps, codec.end_of_turn)
    assert len(rows) == 2 * N and all(len(c) > 0 for _, c in rows)
    adv = rl_stage.iteration_advantages(arrays["rewards"], cfg)
    np.testing.assert_allclose(
        np.asarray(adv.advantages("G")), _numpy_advantages(arrays["rewards"], "mean", "std"), rtol=1e-5, atol=1e-6
    )
    assert np.abs(np.asarray(adv.advantages("G"))).max() > 0  # answers of both grades: a signal to learn
    with pytest.raises(KeyError, match="generator only"):
        adv.advantages("V")


@pytest.mark.parametrize("baseline,normalize", [("mean", "std"), ("loo", "none"), ("loo", "std"), ("mean", "none")])
def test_single_advantages_equal_the_numpy_formula(tmp_path, baseline, normalize):
    cfg = _cfg(tmp_path, extra=(f"rl.baseline={baseline}", f"rl.normalize={normalize}"))
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0.5, 0.0, 1.0, 0.25]], np.float32)
    adv = rl_stage.iteration_advantages(rewards, cfg)
    want = _numpy_advantages(rewards, baseline, normalize)
    np.testing.assert_allclose(np.asarray(adv.advantages("generator")), want, rtol=1e-5, atol=1e-6)
    m = {k: float(v) for k, v in adv.metrics.items()}
    assert m["generator/reward_mean"] == pytest.approx(rewards.mean())
    assert m["generator/frac_reward_zero_std"] == pytest.approx(0.25) and m["generator/groups"] == 4


def test_single_trains_only_g_and_counts_only_g_tokens(full):
    cfg, summary = full
    run_dir = Path(cfg.run_dir)
    rows = rl_metric_rows(run_dir)
    assert [(r["iteration"], r["role"]) for r in rows] == [(0, "G"), (1, "G")]
    assert summary["roles"] == ["G"] and summary["agents"] == "single" and summary["iterations"] == 2
    for r in rows:  # G's reward is the system's accuracy: its answers are the leaves
        assert r["reward_mean"] == pytest.approx(r["chain_accuracy"]) and r["groups"] == 2
    # G's answers only: at most 2 iterations x 2 questions x N answers x 6 tokens
    assert 0 < summary["num_tokens"] <= 2 * 2 * N * 6
    start, _ = initial_adapters(cfg)
    final, _ = load_adapters(run_dir)
    assert final is not None
    for r in ROLES:
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(final[r]), jax.tree.leaves(start[r]))
        )
        assert same == (r != "G"), r  # V and R keep their start adapters


def test_single_resume_after_a_stop_gives_the_uninterrupted_adapters(full, tmp_path, model):
    cfg = _cfg(tmp_path)
    stopped = run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False, stop_after=1)
    run_dir = Path(cfg.run_dir)
    assert stopped["stopped_at"] == 1 and not (run_dir / "adapters").exists()
    run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)
    resumed, _ = load_adapters(run_dir)
    uninterrupted, _ = load_adapters(Path(full[0].run_dir))
    assert resumed is not None and uninterrupted is not None
    for r in ROLES:
        for a, b in zip(jax.tree.leaves(resumed[r]), jax.tree.leaves(uninterrupted[r])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "iteration_s"} for r in rows]  # noqa: E731
    assert strip(rl_metric_rows(run_dir)) == strip(rl_metric_rows(Path(full[0].run_dir)))


def test_single_evaluation_writes_the_single_trained_systems(full, tmp_path, model):
    """A finished single-agent run evaluated with the default systems: no chain, G's trained
    adapter alone as "single-trained", the primary comparison single-trained+MV@3 vs single+MV@3."""
    cfg, _ = full
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)  # a copied run resumes (and here only evaluates)
    cfg = load_run_config(write_tiny_config(tmp_path / "copy.yaml", copy, task="parity"), SINGLE)
    s = run_rl(cfg, model=model, task=ParityTask(), progress=False)
    assert s["iterations"] == 2 and list(s["eval"]) == SYSTEMS
    assert all(0 <= v <= 1 for v in s["eval"].values())
    assert sorted(p.stem for p in (copy / "eval").glob("*.jsonl")) == ["single", "single-greedy", "single-trained"]
    assert s["primary"]["target"] == "single-trained+MV@3" and s["primary"]["baseline"] == "single+MV@3"
    written = json.loads((copy / "rl" / "summary.json").read_text())
    assert written["primary"] == s["primary"] and "single-trained+MV@3" in s["table"]


def test_single_default_systems_and_primary_names():
    systems = default_systems(3, sft_chain=True, ablations=True, agents="single")
    assert [(s.name, s.depth, s.votes, s.greedy, s.trained) for s in systems] == [
        ("single-greedy", 1, 1, True, False),
        ("single", 1, 3, False, False),
        ("single-trained", 1, 3, False, True),
    ]
    assert primary_names(3, "single") == ("single-trained+MV@3", "single+MV@3")
    assert primary_names(1, "single") == ("single-trained", "single")
    assert primary_names(3) == ("malt+MV@3", "single+MV@3")


@pytest.mark.parametrize("roles", ["[G, V]", "[V]", "[G, V, R]"])
def test_single_with_other_roles_is_refused_naming_rl_roles(tmp_path, roles):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="parity")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, SINGLE + [f"rl.roles={roles}"])
    msg = str(info.value)
    assert msg.startswith(f"{path}: rl.roles") and "single" in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="rl.roles"):  # the default roles (G, V, R) too
        load_run_config(path, [s for s in SINGLE if not s.startswith("rl.roles")])
    assert not (tmp_path / "out").exists()


def test_single_config_counts_g_only_trees_and_keeps_hashes(tmp_path):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="parity")
    one = N * 6  # G's N answers at 6 tokens: one single-agent tree
    cfg = load_run_config(path, SINGLE + [f"rl.token_budget={one}", "tree.m=1", "tree.l=1"])  # m, l unused
    assert cfg.rl.tree_tokens(cfg.tree, cfg.sampling) == one and cfg.rl.depth == 1
    with pytest.raises(ConfigError, match="rl.token_budget"):
        load_run_config(path, SINGLE + [f"rl.token_budget={one - 1}"])
    with pytest.raises(ConfigError, match="tree.n"):
        load_run_config(path, SINGLE + ["tree.n=1"])
    multi = ["rl.iterations=2", "rl.reference=base"]
    # the field is part of the identity only when set: existing RL runs keep their hashes
    assert "agents" not in to_dict(load_run_config(None, multi), identity_only=True)["rl"]
    assert load_run_config(None, multi + ["rl.agents=multi"]).hash() == load_run_config(None, multi).hash()
    assert load_run_config(None, multi + ["rl.agents=single", "rl.roles=[G]"]).hash() != (
        load_run_config(None, multi + ["rl.roles=[G]"]).hash()
    )
    assert "agents" not in to_dict(RunConfig(), identity_only=True).get("rl", {})
