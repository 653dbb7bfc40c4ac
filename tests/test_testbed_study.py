"""The testbed study's bookkeeping (experiments/testbed_study.py): per-seed McNemar tests, the
comparisons pooled over seeds with Holm over all but the primary, the targets, and the README
block rendered from the summary, on fabricated evaluation rows of three seeds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from malt_jax.stages.eval import default_systems, system_results
from tests.fixtures import experiment_module

STUDY = experiment_module("testbed_study", "experiments/testbed_study.py")
TABLES = experiment_module("results_tables", "experiments/results_tables.py")
ROOT = Path(__file__).resolve().parent.parent
N = 60
RATES = {
    "single": 0.5,
    "chain": 0.45,
    "sft-chain": 0.6,
    "malt": 0.85,
    "malt-G": 0.6,
    "malt-GV": 0.7,
    "malt-GR": 0.55,
    "gr0": 0.6,  # the chain of the gr0 part's runs
}


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
def study(study_records):
    summary, correct, _ = study_records
    return summary, correct


@pytest.fixture()
def study_records(tmp_path, monkeypatch):
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
    return STUDY.seeds_summary(records, "python experiments/testbed_study.py", 300.0), correct, records


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


def _write_gr0_run(tmp_path, seed: int) -> dict:
    """A finished gr0-part run of ``seed`` (eval rows of every system it evaluates, and its
    summary.json): its chain right 0.6 of the time per pass."""
    rng = np.random.default_rng(100 + seed)
    run = tmp_path / "runs/testbed_study" / STUDY.gr0_tag(seed)
    (run / "eval").mkdir(parents=True)
    systems = {}
    for system in default_systems(3, sft_chain=True, critique=False):
        rows = _rows(rng, dataclasses.replace(system, name="gr0" if system.name == "malt" else system.name))
        (run / "eval" / f"{system.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for n, r in system_results(system, rows).items():
            systems[n] = {"accuracy": float(r.correct.mean()), "ci95": [0, 1], "correct": int(r.correct.sum()), "n": N}
    summary = {"systems": systems, "skills": {"malt": _skills(0.66, float("nan"), 0.3, 0.1)}, "wall_time_s": 50.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return summary


def test_gr0_runs_join_the_seeds_summary_as_a_family_of_their_own(study_records, tmp_path):
    """The gr0 part's runs (fabricated for seeds 0 and 1) add gr0-trained (+MV@3) to those seeds,
    per-seed McNemar tests against the seed's MALT, the pair pooled over those seeds with Holm
    within its own family; the pre-declared family is unchanged, and the table shows the new rows
    only once the data exists."""
    before, correct, records = study_records
    gr0 = {s: _write_gr0_run(tmp_path, s) for s in (0, 1)}
    after = STUDY.seeds_summary(records, "python experiments/testbed_study.py", 300.0)
    correct = {s: {**correct[s], **STUDY.gr0_correctness(s)} for s in gr0}
    for s in (0, 1):
        systems = after["per_seed"][str(s)]["systems"]
        assert systems["gr0-trained+MV@3"] == gr0[s]["systems"]["malt+MV@3"]
        assert systems["gr0-trained"] == gr0[s]["systems"]["malt"]
        a, b = correct[s]["malt+MV@3"], correct[s]["gr0-trained+MV@3"]
        t = after["per_seed"][str(s)]["tests"]["malt+MV@3 vs gr0-trained+MV@3"]
        assert (t["b01"], t["b10"]) == (int((~a & b).sum()), int((a & ~b).sum()))
        assert after["per_seed"][str(s)]["skills"]["gr0-trained"]["verifier_balanced_accuracy"] is None
    assert "gr0-trained" not in after["per_seed"]["2"]["systems"]
    keys = ["malt+MV@3 vs gr0-trained+MV@3", "malt vs gr0-trained"]
    pooled = after["pooled"]
    diff = np.mean([correct[s]["malt+MV@3"].mean() - correct[s]["gr0-trained+MV@3"].mean() for s in (0, 1)])
    assert pooled[keys[0]]["diff"] == pytest.approx(diff) and pooled[keys[0]]["n"] == 2 * N
    from malt_jax.evaluation.stats import holm

    assert [pooled[k]["p_holm"] for k in keys] == pytest.approx(holm([pooled[k]["p_value"] for k in keys]))
    for k, c in before["pooled"].items():  # the pre-declared family as before
        assert pooled[k]["p_value"] == pytest.approx(c["p_value"]) and pooled[k].get("p_holm") == c.get("p_holm")
    assert after["gr0"]["seeds"] == [0, 1] and not after["gr0"]["complete"]
    assert after["gr0"]["holm_family"] == keys and after["gr0"]["wall_time_s"] == 100.0
    text = "\n".join(TABLES.testbed_seeds_tables(after))
    assert "| gr0-trained+MV@3 | " in text and "| malt+MV@3 vs gr0-trained+MV@3 |" in text
    assert "G and R trained with an empty critique" in text and "incomplete" in text
    assert "| gr0-trained | " not in text.split("role skill")[1]  # skills: only once every seed has one
    assert "gr0" not in "\n".join(TABLES.testbed_seeds_tables(before))


def test_gr0_overrides_are_the_seed_runs_plus_the_option():
    from malt_jax.config import load_run_config

    name, over = STUDY.gr0_overrides(1)
    seed_name, seed_over = STUDY.run_overrides(STUDY.DEFAULT_LEVEL, 1, ablations=False)
    assert name == "testbed_study_v080f020_gr0_s1" and f"name={name}" in over
    assert "run_dir=runs/testbed_study/v080f020_gr0_s1" in over
    assert set(over) - set(seed_over) == {f"name={name}", "run_dir=runs/testbed_study/v080f020_gr0_s1", *STUDY.GR0_TREE}
    cfg = load_run_config(ROOT / STUDY.RUN_CONFIG, over)
    seeds_cfg = load_run_config(ROOT / STUDY.RUN_CONFIG, seed_over)
    assert not cfg.tree.critique and cfg.tree.m == 1 and not cfg.eval.ablations and cfg.train.seed == 1
    assert cfg.tree.l == seeds_cfg.tree.m * seeds_cfg.tree.l  # as many refinements per answer
    assert STUDY.PARTS == ("seeds", "gr0", "phase", "curve")


def test_the_gr0_part_runs_alone_and_rewrites_the_seeds_summary(study_records, tmp_path, monkeypatch):
    """``--parts gr0`` runs only the gr0 runs (stubbed here) and rewrites the seeds summary from
    the seed runs on disk, keeping its command."""
    _, _, records = study_records
    for s, rec in records.items():
        (tmp_path / f"runs/testbed_study/v080f020_s{s}/summary.json").write_text(json.dumps(rec))
    (tmp_path / "results").mkdir()
    (tmp_path / "results/testbed_study.json").write_text(json.dumps({"command": "python experiments/testbed_study.py"}))
    ran = []
    monkeypatch.setattr(STUDY, "ensure_model", lambda level, progress: {})
    monkeypatch.setattr(STUDY, "run_malt", lambda *a, **k: pytest.fail("the seeds part ran"))
    monkeypatch.setattr(STUDY, "run_gr0", lambda seed, progress: ran.append(seed) or _write_gr0_run(tmp_path, seed))
    monkeypatch.chdir(tmp_path)
    assert STUDY.main(["--parts", "gr0", "--no-progress"]) == 0
    out = json.loads((tmp_path / "results/testbed_study.json").read_text())
    assert ran == [0, 1, 2] and out["gr0"]["complete"] and out["command"] == "python experiments/testbed_study.py"
    assert all("gr0-trained+MV@3" in out["per_seed"][str(s)]["systems"] for s in STUDY.SEEDS)
    assert "| gr0-trained | " in "\n".join(TABLES.testbed_seeds_tables(out))


def test_the_gr0_part_never_drops_seeds_from_the_summary(study_records, tmp_path, monkeypatch):
    """Where the run directories of some of the summary's seeds are not on this machine, the gr0
    part leaves the summary as it was (its runs join it when the seeds part writes it)."""
    _, _, records = study_records
    (tmp_path / "runs/testbed_study/v080f020_s0/summary.json").write_text(json.dumps(records[0]))
    (tmp_path / "results").mkdir()
    old = json.dumps({"command": "python experiments/testbed_study.py", "seeds": [0, 1, 2]})
    (tmp_path / "results/testbed_study.json").write_text(old)
    monkeypatch.setattr(STUDY, "ensure_model", lambda level, progress: {})
    monkeypatch.setattr(STUDY, "run_gr0", lambda seed, progress: _write_gr0_run(tmp_path, seed))
    monkeypatch.chdir(tmp_path)
    assert STUDY.main(["--parts", "gr0", "--no-progress"]) == 0
    assert (tmp_path / "results/testbed_study.json").read_text() == old
