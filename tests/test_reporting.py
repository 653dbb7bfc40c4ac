"""Reporting hygiene: the held-out figures of the selected epoch told apart from figures on a set
that never chose an epoch (train.heldout_report_fraction), weighted figures with their unweighted
k / n beside them, and McNemar comparisons that carry their discordant counts in the summaries."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest

from malt_jax.config import RunConfig, TrainConfig, load_run_config
from malt_jax.evaluation.report import skills_section, training_section, verifier_section
from malt_jax.evaluation.stats import SystemResult, compare, holm, mcnemar_exact, verifier_confusion
from malt_jax.roles import ROLES
from malt_jax.stages import train as train_stage
from malt_jax.stages.train import heldout_questions, report_questions
from malt_jax.workflows.summary import experiment_summary

ROOT = Path(__file__).resolve().parent.parent


def _results_tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "experiments" / "results_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------- held-out: selection vs report


def test_report_questions_split_the_heldout_questions():
    held = heldout_questions(100, 0.2, seed=0)
    rep = report_questions(held, 0.5, seed=0)
    assert rep <= held and len(rep) == 10 and rep == report_questions(held, 0.5, seed=0)
    assert rep != report_questions(held, 0.5, seed=1)
    assert report_questions(held, 0.0, 0) == set()  # the default: every held-out question selects
    assert report_questions({3}, 0.5, 0) == set()  # one question: it selects, nothing reports
    assert len(report_questions({3, 4}, 0.01, 0)) == 1  # at least one when the fraction is > 0
    assert len(report_questions({3, 4, 5}, 0.99, 0)) == 2  # at least one always selects


def test_report_fraction_keeps_existing_config_hashes():
    """A new option at its default stays out of the run's identity (existing run directories and
    results keep their hashes); set, it is part of it."""
    assert RunConfig().hash() == "b1ba8bea3dda"
    cfg = load_run_config(ROOT / "experiments" / "smollm2_synthetic.yaml")
    assert cfg.train.heldout_report_fraction == 0.0
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, heldout_report_fraction=0.5))
    assert other.hash() != cfg.hash()
    with pytest.raises(ValueError, match="heldout_report_fraction"):
        TrainConfig(heldout_report_fraction=1.0)


def _fake_credit(run_dir: Path, n_questions: int) -> None:
    """A credit stage's files: per role one SFT example and one DPO pair per training question
    (the question index in the prompt's first token)."""
    d = run_dir / "credit"
    d.mkdir(parents=True)
    summary = {"questions": n_questions}
    for role in ROLES:
        sft = [{"prompt": [q, 1], "completion": [2, 3], "coord": [q, 0]} for q in range(n_questions)]
        dpo = [
            {"prompt": [q, 1], "chosen": [4], "rejected": [5], "coords": [[q, 0], [q, 1]]} for q in range(n_questions)
        ]
        (d / f"{role}_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
        (d / f"{role}_dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    (d / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_run_train_holds_a_report_set_out_of_epoch_selection(tmp_path, monkeypatch, fraction):
    """``train.heldout_report_fraction`` splits the held-out questions: the selection part goes to
    ``train_role`` as ``*_heldout`` (chooses epochs), the rest as ``*_report`` (never does); the
    training part is the same as without it, and training.json says which is which."""
    import malt_jax.training.role as role_lib

    n = 40
    _fake_credit(tmp_path, n)
    calls = {}

    def fake_train_role(base, cfg, lora, train_cfg, sft, dpo, role, ckpt_dir, **kw):
        calls[role[0].upper()] = {"sft": sft, "dpo": dpo, **kw}  # called with the role's name
        return role_lib.RoleTraining(adapter={}, sft_adapter={}, history=[], epochs=[], trained=True, counts={})

    monkeypatch.setattr(role_lib, "train_role", fake_train_role)
    monkeypatch.setattr(train_stage, "save_adapter", lambda ad, path: Path(path).write_text("x"))
    monkeypatch.setattr(train_stage, "load_adapter", lambda path: {})
    monkeypatch.setattr(train_stage.tblog, "write_training", lambda *a: True)
    cfg = RunConfig()
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, heldout_fraction=0.25, heldout_report_fraction=fraction, generator_dpo=True
        ),
    )
    model = types.SimpleNamespace(params={}, cfg=None, tokenizer=types.SimpleNamespace(pad_id=0))
    train_stage.run_train(cfg, model, tmp_path, progress=False)

    held = heldout_questions(n, 0.25, cfg.train.seed)
    rep = report_questions(held, fraction, cfg.train.seed)
    assert len(held) == 10 and len(rep) == (5 if fraction else 0)
    counts = json.loads((tmp_path / "adapters" / "training.json").read_text())
    q = lambda exs: {ex.prompt[0] for ex in exs}  # noqa: E731
    for role in ROLES:
        c = calls[role]
        assert q(c["sft"]) == q(c["dpo"]) == set(range(n)) - held  # training: as without a report set
        assert q(c["sft_heldout"]) == q(c["dpo_heldout"]) == held - rep  # choose the epochs
        assert q(c["sft_report"]) == q(c["dpo_report"]) == rep  # never choose one
        t = counts[role]
        assert t["heldout_use"] == "epoch selection"
        assert (t["heldout_questions"], t["report_questions"]) == (len(held - rep), len(rep))
        assert t["sft"] == {
            "examples": n,
            "heldout": 10 - len(rep),
            "report": len(rep),
            "train": 30,
            "train_after_cap": 30,
        }
        assert t["dpo"]["heldout"] == 10 - len(rep) and t["dpo"]["report"] == len(rep)


# ------------------------------------------------------------------------- summaries


def _epochs(report: bool) -> list[dict]:
    """A role's epoch records: SFT epochs 0..2 (1 selected), DPO epochs 0..1 (1 selected)."""
    recs = []
    for e, loss in enumerate((2.0, 1.5, 1.75)):
        r = {"stage": "sft", "epoch": e, "step": 2 * e, "heldout/loss": loss, "best": e == 1}
        r.update({"heldout/accuracy": 0.5, "heldout/correct_tokens": 10, "heldout/tokens": 20})
        recs.append(r)
    for e, (loss, acc, k) in enumerate(((0.693, 0.0, 0), (0.4, 0.9, 7))):
        r = {"stage": "dpo", "epoch": e, "step": 2 * e, "heldout/loss": loss, "best": e == 1}
        r.update({"heldout/rewards/accuracies": acc, "heldout/rewards/margins": 0.5 * e})
        r.update({"heldout/rewards/accurate_pairs": k, "heldout/pairs": 10})
        recs.append(r)
    if report:
        recs[0].update({"report/loss": 2.1})
        recs[1].update({"report/loss": 1.9})
        recs[3].update({"report/loss": 0.693, "report/rewards/accuracies": 0.0})
        recs[4].update({"report/loss": 0.6, "report/rewards/accuracies": 0.55, "report/rewards/margins": 0.1})
        recs[4].update({"report/rewards/accurate_pairs": 3, "report/pairs": 6})
    return recs


def _run_dir(tmp_path: Path, report: bool) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "adapters").mkdir(parents=True)
    counts = {}
    for role in ROLES:
        rows = _epochs(report)
        (run_dir / "adapters" / f"{role}_epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[role] = {
            "heldout_questions": 2,
            "report_questions": 2 if report else 0,
            "heldout_use": "epoch selection",
            "sft": {"examples": 20, "heldout": 3, "report": 3 if report else 0, "train": 14, "train_after_cap": 14},
            "dpo": {"pairs": 22, "heldout": 10, "report": 6 if report else 0, "train": 6, "train_after_cap": 6},
            "trained": True,
        }
    (run_dir / "adapters" / "training.json").write_text(json.dumps(counts))
    return run_dir


def _ev() -> dict:
    """``run_eval``-shaped output of two baselines and a trained system on 30 questions."""
    rng = np.random.default_rng(0)
    base = rng.random(30) < 0.4
    single = rng.random(30) < 0.3
    malt = base ^ (rng.random(30) < 0.3)
    results = {n: SystemResult(n, c) for n, c in (("single", single), ("chain", base), ("malt", malt))}
    comps = compare(results, "malt", ["single", "chain"], bootstrap_samples=100, seed=0)
    comps[0]["primary"], comps[1]["primary"] = True, False
    comps[0]["p_holm"] = comps[0]["mcnemar_p"]
    comps[1]["p_holm"] = holm([comps[1]["mcnemar_p"]])[0]
    verifier = {"chain": verifier_confusion([True, True, False, False, False], [True, False, True, False, None])}
    return {"results": results, "comparisons": comps, "verifier": verifier}


def test_summary_comparisons_carry_discordant_counts_and_n(tmp_path):
    """Every McNemar comparison in a summary built by the code carries n, b01 (a wrong, b right)
    and b10 (a right, b wrong), the counts its p-value comes from; results_tables still reads it."""
    ev = _ev()
    run_dir = _run_dir(tmp_path, report=False)
    s = experiment_summary("x", "malt-jax run x.yaml", "abc", ev, run_dir, 4, 30, 1, ("malt", "single"), 1.0)
    assert len(s["comparisons"]) == 2
    for c in s["comparisons"]:
        a, b = ev["results"][c["a"]].correct, ev["results"][c["b"]].correct
        mc = mcnemar_exact(a, b)
        assert (c["n"], c["b01"], c["b10"], c["p"]) == (30, mc["b01"], mc["b10"], mc["p_value"])
        assert c["b01"] == int(np.sum(~a & b)) and c["b10"] == int(np.sum(a & ~b))
        assert c["diff"] == pytest.approx((c["b10"] - c["b01"]) / c["n"])
    assert any(c["b01"] + c["b10"] > 0 for c in s["comparisons"])
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s))
    block = _results_tables().file_block(str(path))  # the tables of a fresh summary still render
    assert "| malt vs single (primary) |" in block and "| malt vs chain |" in block


@pytest.mark.parametrize("report", [False, True])
def test_summary_training_tells_selection_and_report_figures_apart(tmp_path, report):
    s = experiment_summary("x", "c", "h", _ev(), _run_dir(tmp_path, report), 4, 30, 1, ("malt", "single"), 1.0)
    for role in ROLES:
        t = s["training"][role]
        assert t["heldout_set"] == "epoch selection"
        assert (t["sft_epochs"], t["dpo_epochs"]) == (1, 1)
        assert (t["heldout_sft_loss_start"], t["heldout_sft_loss_end"]) == (2.0, 1.5)
        assert (t["heldout_dpo_loss_start"], t["heldout_dpo_loss_end"]) == (0.693, 0.4)
        # the weighted reward accuracy with its unweighted k / n pairs
        assert (t["heldout_dpo_accuracy"], t["heldout_dpo_accurate_pairs"], t["heldout_dpo_pairs"]) == (0.9, 7, 10)
        if report:
            assert (t["report_sft_loss_start"], t["report_sft_loss_end"]) == (2.1, 1.9)
            assert (t["report_dpo_loss_start"], t["report_dpo_loss_end"]) == (0.693, 0.6)
            assert (t["report_dpo_accuracy"], t["report_dpo_accurate_pairs"], t["report_dpo_pairs"]) == (0.55, 3, 6)
        else:
            assert all(v is None for k, v in t.items() if k.startswith("report_"))
    assert s["verifier"]["chain"]["correct_verdicts"] == 2 and s["verifier"]["chain"]["n"] == 5
    # the committed summaries' table code reads the new training block unchanged
    tables = _results_tables()
    assert len(tables.training_table(s)) == 2 + len(ROLES)


# ------------------------------------------------------------------------- report.md


def test_report_training_section_labels_the_selection_set_and_shows_k_n():
    counts = {"V": {"sft": 14, "sft_heldout": 3, "dpo": 6, "dpo_heldout": 10}}
    lines = training_section({"V": _epochs(report=False)}, counts)
    header = next(line for line in lines if line.startswith("| role |"))
    assert "selection-set loss @selected" in header and "held-out loss" not in header and "report-set" not in header
    assert "| V | DPO | 6 / 10 | 1 | 1 | 0.6930 | 0.4000 | 0.9000 (7 / 10) | +0.5000 |" in lines
    assert any("optimistic" in line and "heldout_report_fraction" in line for line in lines)

    counts = {"V": {**counts["V"], "sft_report": 3, "dpo_report": 6}}
    lines = training_section({"V": _epochs(report=True)}, counts)
    header = next(line for line in lines if line.startswith("| role |"))
    assert "report-set loss @selected" in header and "examples (train / selection / report)" in header
    assert "| V | SFT | 14 / 3 / 3 | 2 | 1 | 2.0000 | 1.5000 | - | - | 2.1000 | 1.9000 | - |" in lines
    assert (
        "| V | DPO | 6 / 10 / 6 | 1 | 1 | 0.6930 | 0.4000 | 0.9000 (7 / 10) | +0.5000 | 0.6930 | 0.6000 "
        "| 0.5500 (3 / 6) |"
    ) in lines
    assert any("never chose an epoch" in line for line in lines)


def test_verifier_balanced_accuracy_comes_with_unweighted_verdicts():
    c = verifier_confusion([True, True, True, False], [True, True, True, True])  # always agrees
    assert c["balanced_accuracy"] == 0.5 and (c["correct_verdicts"], c["n"]) == (3, 4)
    row = next(line for line in verifier_section({"v": c}) if line.startswith("| v |"))
    assert row.endswith("| 0.500 | 3 / 4 |")
    old = {k: v for k, v in c.items() if k != "correct_verdicts"}  # a summary written before
    assert next(line for line in verifier_section({"v": old}) if line.startswith("| v |")).endswith("| 3 / 4 |")
    skills = {
        "v": {
            "generator": {"accuracy": 0.75, "n": 4},
            "verifier": c,
            "refiner": {"fix_rate": 0.0, "break_rate": 0.0, "fixed": 0, "broken": 0, "g_wrong": 1, "g_right": 3},
        }
    }
    row = next(line for line in skills_section(skills) if line.startswith("| v |"))
    assert "| 0.500 (3 / 4 right) |" in row
