"""The paper's role ablation "G and R trained with an empty critique" as a run of its own
(``tree.critique: false``): trees with an empty verifier level, training data and adapters for G
and R only, the run's trained chains evaluated as G -> (no critique) -> R; on a tiny random model
(the parity task, the paper's separate framing)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from malt_jax.config import ConfigError, RunConfig, TreeConfig, load_run_config, to_dict
from malt_jax.model.base_model import load_model
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec
from malt_jax.stages import rundir
from malt_jax.stages.credit import build_datasets
from malt_jax.stages.eval import System, default_systems
from malt_jax.workflows import pipeline
from tests.fixtures import hand_trees, write_tiny_config
from tests.parity_task import ParityTask

NO_CRITIQUE = ["tree.critique=false", "tree.m=1", "tree.l=3", "task.framing=separate"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gr0run")
    cfg = load_run_config(write_tiny_config(tmp / "cfg.yaml", tmp / "out"), NO_CRITIQUE)
    model = load_model("random", cfg.model)
    summary = pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    return cfg, model, summary


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_trees_leave_the_verifier_level_empty(run):
    cfg, _, _ = run
    out = Path(cfg.run_dir)
    trees = rundir.load_expansion(out)
    assert trees["rewards"].shape == (4, 2, 1, 3) and trees["V_tokens"].shape[:3] == (4, 2, 1)
    assert not trees["V_lengths"].any() and trees["V_stopped"].all() and trees["R_lengths"].any()
    texts = _rows(out / "expansion" / "batch_00000.jsonl")
    assert all(v == [[""], [""]] for r in texts for v in [r["V"]])
    assert ExpansionSpec.from_tree(cfg.tree, cfg.sampling).empty_levels == (1,)


def test_credit_gives_the_verifier_no_data_and_r_its_sampled_prompts(run):
    """G and R get SFT rows and DPO pairs, V none (no files, no statistics); every R prompt is
    R's prefix + G's tokens + the codec's empty-critique separators, built here by hand."""
    cfg, model, _ = run
    out = Path(cfg.run_dir)
    credit = json.loads((out / "credit" / "summary.json").read_text())
    assert not any(k.startswith("verifier/") for k in credit)
    assert not list((out / "credit").glob("V_*"))
    for role, name in (("G", "generator"), ("R", "refiner")):
        assert credit[f"{name}/sft"] == len(_rows(out / "credit" / f"{role}_sft.jsonl"))
        assert credit[f"{name}/dpo_pairs"] == len(_rows(out / "credit" / f"{role}_dpo.jsonl"))
    trees = rundir.load_expansion(out)
    codec = PromptCodec(model.tokenizer, ParityTask(), "separate")
    (_,), (s1, s2) = codec.empty_critique_seps
    assert (s1, s2) != codec.seps[1]  # the verifier's reply prefix is not in R's prompt
    questions = {i: q for i, q in enumerate(json.loads((out / "splits.json").read_text())["train"])}
    examples = {e.id: e for e in ParityTask().load("train")}
    r_sft, r_dpo = _rows(out / "credit" / "R_sft.jsonl"), _rows(out / "credit" / "R_dpo.jsonl")
    assert r_sft and r_dpo
    for prompt, (q, i, j, _k) in [(r["prompt"], r["coord"]) for r in r_sft] + [
        (r["prompt"], r["coords"][0]) for r in r_dpo
    ]:
        assert j == 0
        g = trees["G_tokens"][q, i, : trees["G_lengths"][q, i]].tolist()
        assert prompt == codec.prefixes(examples[questions[q]].question)[1] + g + s1 + s2


def test_g_and_r_are_trained_and_v_gets_no_adapter(run):
    cfg, _, summary = run
    out = Path(cfg.run_dir) / "adapters"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "G.safetensors",
        "G_sft.safetensors",
        "R.safetensors",
        "R_sft.safetensors",
    ]
    counts = rundir.training_counts(Path(cfg.run_dir))
    assert set(counts) == {"G", "R"} and counts["G"]["trained"] and counts["R"]["trained"]
    final, sft = rundir.load_adapters(Path(cfg.run_dir))
    assert final is not None and sft is not None and set(final) == set(sft) == {"G", "R"}
    assert any(np.abs(np.asarray(w["b"])).max() > 0 for w in final["R"]["layers"].values())


def test_the_runs_chain_is_evaluated_without_a_critique(run):
    cfg, _, summary = run
    out = Path(cfg.run_dir)
    malt = _rows(out / "eval" / "malt.jsonl")
    assert len(malt) == 6 and all(r["texts"]["V"] == ["", "", ""] for r in malt)
    assert all(len(r["texts"]["R"]) == 3 for r in malt)
    assert any(v for r in _rows(out / "eval" / "chain.jsonl") for v in r["texts"]["V"])  # the baseline critiques
    s = json.loads((out / "summary.json").read_text())
    assert s["critique"] is False and "empty critique" in s["trained_chain"]
    assert set(s["verifier"]) == {"chain"} and s["skills"]["malt"]["verifier"]["n"] == 0
    assert not any(n.startswith("malt-") for n in s["systems"])
    pairs = {(c["a"], c["b"]) for c in s["comparisons"]}
    assert ("malt+MV@3", "single+MV@3") in pairs and len(pairs) == 10  # 2 MALT systems x 5 baselines
    assert [c for c in s["comparisons"] if c["primary"]][0]["a"] == "malt+MV@3"
    report = (out / "report.md").read_text()
    assert "G and R trained with an empty critique" in report.splitlines()[0]
    assert "| Trained chain | G -> (empty critique) -> R" in report


def test_ask_runs_the_chain_without_a_critique(run):
    from malt_jax.workflows.ask import ask_run

    cfg, _, _ = run
    turns = []
    out = ask_run(cfg.run_dir, "Question number 3?", votes=2, on_turn=lambda r, t: turns.append(r))
    assert [c["V"] for c in out["chains"]] == ["", ""] and turns == ["G", "R"]


def test_rerun_resumes_without_recomputing(run):
    cfg, model, summary = run
    out = Path(cfg.run_dir)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".npz", ".safetensors", ".jsonl")}
    again = pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    assert again["table"] == summary["table"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_value_iteration_on_the_depth_two_tree_matches_numpy():
    """With one empty critique per answer the tree is effectively G -> R: an answer's value is
    the mean of its l refinements' rewards; labels, SFT rows and DPO pairs of G and R computed
    here independently with NumPy; V gets nothing."""
    rng = np.random.default_rng(3)
    Q, n, l, thr = 5, 3, 4, 0.5
    rewards = (rng.random((Q, n, 1, l)) < 0.5).astype(np.float32)
    trees = hand_trees(rewards, rng.random((Q, n)) < 0.5, empty_critique=True)
    seps = (([1],), ([2, 3], [4]))
    data, summary = build_datasets(trees, seps, 99, thr, None, 0, verifier_balance=True, roles=("G", "R"))
    assert set(data) == {"G", "R"} and not any(k.startswith("verifier/") for k in summary)
    g_value = rewards[:, :, 0, :].mean(-1)
    g_pos = g_value > thr
    r_pos = rewards[:, :, 0, :] > thr
    assert summary["generator/mean_value"] == pytest.approx(g_value.mean())
    assert summary["generator/positive_rate"] == pytest.approx(g_pos.mean())
    assert summary["refiner/positive_rate"] == pytest.approx(r_pos.mean())
    assert [r["coord"] for r in data["G"]["sft"]] == [[q, i] for q, i in zip(*np.nonzero(g_pos))]
    assert [r["coord"] for r in data["R"]["sft"]] == [[q, i, 0, k] for q, i, k in zip(*np.nonzero(r_pos))]
    g_pairs = [
        [[q, a], [q, b]] for q in range(Q) for a in range(n) for b in range(n) if g_pos[q, a] and not g_pos[q, b]
    ]
    assert sorted(r["coords"] for r in data["G"]["dpo"]) == sorted(g_pairs)
    r_pairs = [
        [[q, i, 0, a], [q, i, 0, b]]
        for q in range(Q)
        for i in range(n)
        for a in range(l)
        for b in range(l)
        if r_pos[q, i, a] and not r_pos[q, i, b]
    ]
    assert sorted(r["coords"] for r in data["R"]["dpo"]) == sorted(r_pairs)
    # R's prompt: the question, G's answer, the separators around the empty critique
    row = data["R"]["sft"][0]
    q, i = row["coord"][:2]
    assert row["prompt"] == [5] * 4 + [10 + i, 2, 3, 4] and row["completion"] == [30 + row["coord"][3], 99]
    assert data["G"]["sft"][0]["prompt"] == [5] * 4


def test_config_errors_name_the_field(tmp_path):
    def err(*over: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_run_config(None, ["tree.critique=false", *over])
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert err().startswith("tree.m: expected 1 with tree.critique: false")
    assert err("tree.m=1", "eval.ablations=true").startswith("eval.ablations: expected false with tree.critique")
    assert err("tree.m=1", "iterate.rounds=2").startswith("tree.critique: false is not supported by iterative")
    assert err("tree.m=1", "rl.iterations=2", "rl.reference=base", "sampling.temperature=1").startswith(
        "tree.critique: false is not supported by an RL run"
    )
    from malt_jax.workflows.study import run_study

    cfg = load_run_config(None, ["tree.critique=false", "tree.m=1", "study.train_sizes=[4]", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^tree.critique: false is not supported by malt-jax study"):
        run_study(cfg, progress=False)
    with pytest.raises(ValueError, match="trained verifier"):
        default_systems(3, ablations=True, critique=False)


def test_the_option_is_part_of_the_identity_only_when_set():
    base = RunConfig()
    off = dataclasses.replace(base, tree=TreeConfig(m=1, critique=False))
    assert "critique" not in to_dict(base, identity_only=True)["tree"]
    assert to_dict(off, identity_only=True)["tree"]["critique"] is False
    assert base.hash() != off.hash() != dataclasses.replace(base, tree=TreeConfig(m=1)).hash()
    assert TreeConfig().roles == ("G", "V", "R") and TreeConfig(m=1, critique=False).roles == ("G", "R")


def test_default_systems_without_a_critique():
    systems = {s.name: s for s in default_systems(3, sft_chain=True, critique=False)}
    chain = {"roles": ("G", "R"), "critique": False}
    assert systems["malt"] == System("malt", 3, 3, False, True, **chain)
    assert systems["sft-chain"] == System("sft-chain", 3, 3, False, True, stage="sft", **chain)
    assert systems["chain"] == System("chain", 3, 3, False, False)  # the untrained baseline keeps its critique
    assert list(systems) == [s.name for s in default_systems(3, sft_chain=True)]
