"""The RL comparison's bookkeeping (experiments/testbed_rl_compare.py): the systems that stand for
each method, per-seed McNemar tests, comparisons pooled over seeds with Holm over all but the
primary, reward curves with Wilson intervals, held-out (validation) curves of the MV@3 systems
(none for a run without them), the plot, refusal of runs evaluated on other questions, and the
README block, on fabricated run directories of three seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from malt_jax.evaluation.stats import wilson_interval
from malt_jax.stages.rundir import read_jsonl
from tests.fixtures import experiment_module

CMP = experiment_module("testbed_rl_compare", "experiments/testbed_rl_compare.py")
TABLES = experiment_module("results_tables", "experiments/results_tables.py")
N = 80
# per method: the systems its run directory evaluates and their accuracy
RUNS = {
    "offline": {"single": 0.5, "chain": 0.6, "malt": 0.7},
    "iterate": {"single": 0.5, "chain": 0.6, "malt": 0.72},
    "rl": {"single": 0.5, "chain": 0.6, "malt": 0.8},
    "grpo-single": {"single": 0.5, "single-trained": 0.65},
}


def _write_eval(out: Path, rng, accuracies: dict[str, float], ids: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, p in accuracies.items():
        rows = []
        for q, qid in enumerate(ids):
            passes = [bool(rng.random() < p) for _ in range(3)]
            answers = [str(q) if ok else "x" for ok in passes]
            vote = max(set(answers), key=answers.count)
            rows.append(
                {
                    "id": qid,
                    "pass_correct": passes,
                    "pass_answers": answers,
                    "vote_answer": vote,
                    "vote_correct": vote == str(q),
                }
            )
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_metrics(run: Path, rng, iterations: int, tokens: int) -> None:
    (run / "rl").mkdir(parents=True, exist_ok=True)
    rows = [
        {"iteration": i, "role": "G", "chain_accuracy": float(rng.random()), "num_tokens": (i + 1) * tokens}
        for i in range(iterations)
    ]
    (run / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_heldout(run: Path, rng, points: list[int], tokens: int, system: str) -> None:
    """``rl/heldout.jsonl`` as malt-jax rl writes it: per point the first pass and the vote."""
    rows = []
    for i in points:
        for name in (system.removesuffix("+MV@3"), system):
            k = int(rng.integers(0, 201))
            rows.append(
                {
                    "iteration": i,
                    "num_tokens": i * tokens,
                    "system": name,
                    "accuracy": k / 200,
                    "ci95": [round(x, 4) for x in wilson_interval(k, 200)],
                    "correct": k,
                    "n": 200,
                }
            )
    (run / "rl" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# held-out points per method: rl every 2 of 4 iterations; grpo-single at the start and the end
POINTS = {"rl": [0, 2, 4], "grpo-single": [0, 4]}


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(CMP, "ROOT", tmp_path)
    monkeypatch.setattr(CMP, "N_EVAL", N)
    ids = [f"q{i}" for i in range(N)]
    records = {}
    for seed in CMP.SEEDS:
        rng = np.random.default_rng(seed)
        records[seed] = {}
        for m, acc in RUNS.items():
            run = CMP.run_dir(m, seed)
            _write_eval(run / "eval", rng, acc, ids)
            if m in ("rl", "grpo-single"):
                _write_metrics(run, rng, 4, 1000)
                if (m, seed) != ("grpo-single", 2):  # a run made before rl.eval_every: no held-out rows
                    _write_heldout(run, rng, POINTS[m], 1000, CMP.SYSTEM[m])
            records[seed][m] = {"tokens": 4000 + seed, "wall_time_s": 10.0}
    return records


def test_pooled_primary_holm_tokens_and_curves(runs):
    summary = CMP.summarize(runs, "python experiments/testbed_rl_compare.py", 60.0)
    pooled = summary["pooled"]
    primary = "rl vs offline"
    assert pooled[primary]["primary"] and "p_holm" not in pooled[primary]
    correct = {s: {m: CMP.correctness(CMP.run_dir(m, s)) for m in RUNS} for s in CMP.SEEDS}
    expected = np.mean(
        [correct[s]["rl"]["malt+MV@3"][1].mean() - correct[s]["offline"]["malt+MV@3"][1].mean() for s in CMP.SEEDS]
    )
    assert pooled[primary]["diff"] == pytest.approx(expected)
    others = [k for k in pooled if k != primary]
    assert sorted(others) == sorted(f"{a} vs {b}" for a, b in CMP.FAMILY)
    assert all(pooled[k]["p_holm"] >= pooled[k]["p_value"] for k in others)
    # the single-agent method stands for its trained G with the vote
    s0 = summary["per_seed"]["0"]
    assert s0["accuracy"]["grpo-single"] == pytest.approx(correct[0]["grpo-single"]["single-trained+MV@3"][1].mean())
    assert s0["tokens"]["rl"] == 4000
    t = s0["tests"]["rl vs grpo-single"]
    a, b = correct[0]["rl"]["malt+MV@3"][1], correct[0]["grpo-single"]["single-trained+MV@3"][1]
    assert (t["b01"], t["b10"]) == (int((~a & b).sum()), int((a & ~b).sum()))
    assert summary["complete"] and set(summary["targets"]) == {"rl beats offline", "rl beats grpo-single"}
    curve = summary["reward_curves"]["rl_s0"]
    assert [p["num_tokens"] for p in curve] == [1000, 2000, 3000, 4000]
    assert all(p["ci95"][0] <= p["reward"] <= p["ci95"][1] for p in curve)
    text = "\n".join(TABLES.testbed_rl_tables(summary))
    assert "| rl vs offline |" in text and "**primary**" in text and "4,000" in text


def test_heldout_curves_of_the_mv_systems_and_the_plot(runs, tmp_path):
    summary = CMP.summarize(runs, "cmd", 1.0)
    curves = summary["heldout_curves"]
    assert sorted(curves) == sorted(
        f"{m}_s{s}" for s in CMP.SEEDS for m in ("rl", "grpo-single") if (m, s) != ("grpo-single", 2)
    )
    for name, pts in curves.items():
        method = name.rpartition("_s")[0]
        rows = [
            r
            for r in read_jsonl(CMP.run_dir(method, int(name[-1])) / "rl" / "heldout.jsonl")
            if r["system"] == CMP.SYSTEM[method]
        ]
        assert [p["iteration"] for p in pts] == POINTS[method]
        assert [p["num_tokens"] for p in pts] == [1000 * i for i in POINTS[method]]
        assert [(p["accuracy"], p["correct"], p["ci95"]) for p in pts] == [
            (r["accuracy"], r["correct"], r["ci95"]) for r in rows
        ]
        assert all(p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] and p["n"] == 200 for p in pts)
    assert "grpo-single_s2" in summary["reward_curves"]  # its training reward curve is still there
    png = tmp_path / "plot.png"
    CMP.plot(summary, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CMP.plot({"reward_curves": summary["reward_curves"]}, png)  # a summary written before the curves


def test_rl_runs_ask_for_heldout_points_on_validation_questions():
    budget = {"tokens": 118_000, "generator_mean_length": 6.0}
    for m in ("rl", "grpo-single"):
        over = CMP.rl_overrides(m, 0, budget)
        assert f"rl.eval_every={CMP.EVAL_EVERY[m]}" in over and "rl.eval_questions=200" in over
    single = CMP.rl_overrides("grpo-single", 0, budget)
    iterations = int(next(o for o in single if o.startswith("rl.iterations=")).split("=")[1])
    assert 5 <= len([i for i in range(iterations + 1) if i % CMP.EVAL_EVERY["grpo-single"] == 0]) <= 10


def test_runs_evaluated_on_other_questions_are_refused(runs):
    run = CMP.run_dir("rl", 1)
    _write_eval(run / "eval", np.random.default_rng(9), RUNS["rl"], [f"other{i}" for i in range(N)])
    with pytest.raises(RuntimeError, match="seed 1: the methods were evaluated on different questions"):
        CMP.summarize(runs, "cmd", 1.0)
