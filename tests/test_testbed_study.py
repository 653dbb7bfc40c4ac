"""The testbed study's bookkeeping (experiments/testbed_study.py): per-seed McNemar tests, the
comparisons pooled over seeds with Holm over all but the primary, the targets, and the README
block rendered from the summary, on fabricated evaluation rows of three seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from malt_jax.stages.eval import default_systems
from tests.fixtures import experiment_module

STUDY = experiment_module("testbed_study", "experiments/testbed_study.py")
TABLES = experiment_module("results_tables", "experiments/results_tables.py")
N = 60
RATES = {"single": 0.5, "chain": 0.45, "sft-chain": 0.6, "malt": 0.85, "malt-G": 0.6, "malt-GV": 0.7, "malt-GR": 0.55}


def _rows(rng, system) -> list[dict]:
    p = RATES.get(system.name, 0.5)
    rows = []
    for q in range(N):
        passes = [bool(rng.random() < p) for _ in range(system.votes)]
        answers = [str(q) if ok else "x" for ok in passes]
        vote = max(set(answers), key=answers.count)
        rows.append(
            {"pass_correct": passes, "pass_answers": answers, "vote_answer": vote, "vote_correct": vote == str(q)}
        )
    return rows


def _skills(g, v, fix, brk):
    return {
        "generator": {"accuracy": g},
        "verifier": {"balanced_accuracy": v},
        "refiner": {"fix_rate": fix, "break_rate": brk},
    }


@pytest.fixture()
def study(tmp_path, monkeypatch):
    monkeypatch.setattr(STUDY, "ROOT", tmp_path)
    monkeypatch.setattr(STUDY, "N_EVAL", N)
    records, correct = {}, {}
    for seed in STUDY.SEEDS:
        rng = np.random.default_rng(seed)
        out = tmp_path / "runs/testbed_study" / f"{STUDY.level_tag(STUDY.DEFAULT_LEVEL)}_s{seed}" / "eval"
        out.mkdir(parents=True)
        for system in default_systems(3, sft_chain=True, ablations=True):
            rows = _rows(rng, system)
            (out / f"{system.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        correct[seed] = STUDY.correctness(out.parent)
        records[seed] = {
            "n_train": 256,
            "systems": {
                n: {"accuracy": float(c.mean()), "ci95": [0, 1], "correct": int(c.sum()), "n": N}
                for n, c in correct[seed].items()
            },
            "skills": {
                "chain": _skills(0.6, 0.75, 0.35, 0.10),
                "sft-chain": _skills(0.65, 0.76, 0.36, 0.09),
                "malt": _skills(0.7, 0.9 + 0.01 * seed, 0.5, 0.05),
            },
            "training": {},
            "wall_time_s": 100.0,
        }
    return STUDY.seeds_summary(records, "python experiments/testbed_study.py", 300.0), correct


def test_pooled_comparisons_primary_holm_and_targets(study):
    summary, correct = study
    primary = "malt+MV@3 vs single+MV@3"
    pooled = summary["pooled"]
    assert pooled[primary]["primary"] and "p_holm" not in pooled[primary]
    expected = np.mean([correct[s]["malt+MV@3"].mean() - correct[s]["single+MV@3"].mean() for s in STUDY.SEEDS])
    assert pooled[primary]["diff"] == pytest.approx(expected)
    assert pooled[primary]["n"] == 3 * N and len(pooled[primary]["diffs"]) == 3
    others = [k for k in pooled if k != primary]
    assert len(others) == len(STUDY.POOLED)
    assert all(pooled[k]["p_holm"] >= pooled[k]["p_value"] for k in others)
    for s in map(str, STUDY.SEEDS):
        t = summary["per_seed"][s]["tests"][primary]
        a, b = correct[int(s)]["malt+MV@3"], correct[int(s)]["single+MV@3"]
        assert (t["b01"], t["b10"]) == (int((~a & b).sum()), int((a & ~b).sum()))
    targets = summary["targets"]
    assert targets["verifier_balanced_accuracy_gain"] == pytest.approx(0.91 - 0.75)
    assert targets["verifier_gain_at_least_0.10"]
    assert targets["refiner_fix_rate"] == {"base": pytest.approx(0.35), "malt": pytest.approx(0.5)}
    assert summary["complete"] and summary["seeds"] == [0, 1, 2]


def test_block_renders_every_seed_and_the_primary(study):
    summary, _ = study
    lines = TABLES.testbed_seeds_tables(summary)
    text = "\n".join(lines)
    assert "| malt+MV@3 vs single+MV@3 |" in text and "**primary**" in text
    row = next(x for x in lines if x.startswith("| malt+MV@3 |"))
    accs = [summary["per_seed"][s]["systems"]["malt+MV@3"]["accuracy"] for s in ("0", "1", "2")]
    assert f"{np.mean(accs):.3f} +- {np.std(accs, ddof=1):.3f}" in row
    assert "Targets:" in text


def test_phase_levels_parse_and_unknown_levels_are_refused(capsys):
    assert STUDY._level("1.0,0.0") == (1.0, 0.0)
    assert STUDY._level("0.65,0.35") == (0.65, 0.35)
    with pytest.raises(SystemExit):
        STUDY.main(["--parts", "phase", "--levels", "0.7,0.3"])
    err = capsys.readouterr().err
    assert "--levels: '0.7,0.3' is not one of" in err and "'0.5,0.5'" in err
