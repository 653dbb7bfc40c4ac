"""`make testbed` at a smoke size (slow suite): pretrain a tiny testbed model from scratch with the
testbed corpus, then the whole MALT pipeline on it, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from malt_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_testbed_at_smoke_size(tmp_path):
    model = tmp_path / "model"
    pre = ["train.steps=20", "train.warmup_steps=5", "train.eval_every=10", "train.checkpoint_every=10"]
    assert (
        main(["pretrain", str(ROOT / "experiments/pretrain/testbed.yaml"), f"out_dir={model}", *pre, "--no-progress"])
        == 0
    )
    summary = json.loads((model / "pretrain.json").read_text())
    assert summary["heldout_loss"] < summary["initial_heldout_loss"]
    run = [
        f"weights={model}",
        f"run_dir={tmp_path / 'run'}",
        f"results={tmp_path / 'results'}",
        "task.num_train=4",
        "task.num_eval=8",
        "tree.questions_per_batch=4",
        "train.sft_epochs=1",
        "train.dpo_epochs=1",
        "eval.batch_questions=8",
    ]
    assert main(["run", str(ROOT / "experiments/testbed.yaml"), *run, "--no-progress"]) == 0
    out = json.loads((tmp_path / "results" / "testbed.json").read_text())
    assert out["n_eval"] == 8 and set(out["skills"]) >= {"chain", "malt"}
    for s in out["skills"].values():
        assert 0.0 <= s["generator"]["accuracy"] <= 1.0 and s["generator"]["n"] == 8 * 3
    assert "Role skills" in (tmp_path / "run" / "report.md").read_text()
