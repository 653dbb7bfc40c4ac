"""malt_jax.evaluation.report: report.md tables and PNG plots."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from malt_jax.evaluation.plots import plot_training_curves
from malt_jax.evaluation.report import RunRecord, format_table, training_section, write_report
from malt_jax.evaluation.stats import SystemResult, compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND" or b"IEND" in data[-12:]
    assert len(data) > 5_000, f"{path.name} suspiciously small ({len(data)} bytes)"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def results():
    base = np.array([True] * 5 + [False] * 5)  # 0.5
    malt = np.array([True] * 8 + [False] * 2)  # 0.8; right wherever base is
    return {
        "baseline G": SystemResult("baseline G", base),
        "MALT G->V->R": SystemResult("MALT G->V->R", malt),
    }


CREDIT = {
    "threshold": 0.5,
    "questions": 4,
    "generator/nodes": 12,
    "generator/positive_rate": 0.25,
    "generator/sft": 3,
    "generator/dpo_pairs": 7,
    "verifier/nodes": 36,
    "verifier/positive_rate": 0.5,
    "verifier/sft": 18,
    "verifier/dpo_pairs": 20,
    "R/positive_rate": 0.75,  # short alias
    "R/sft": 81,
    "R/dpo_pairs": 40,
}

META = RunRecord(
    model="SmolLM2-135M-Instruct",
    task="synthetic",
    seeds=[0, 1, 2],
    config_hash="abc123",
    wall_times={"expansion": 12.34, "train": 5.0},
    extra={"device": "cpu"},
)


def test_report_tables_and_plots(tmp_path, results):
    comps = compare(results, "MALT G->V->R", ["baseline G"], bootstrap_samples=200, seed=0)
    path = write_report(tmp_path / "run", results, comps, CREDIT, META)
    assert path == tmp_path / "run" / "report.md"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# ")

    # meta table
    assert "| Model | SmolLM2-135M-Instruct |" in lines
    assert "| Task | synthetic |" in lines
    assert "| Questions | 10 |" in lines  # derived from results
    assert "| Seeds | 0, 1, 2 |" in lines
    assert "| Config hash | abc123 |" in lines
    assert "| Wall time | expansion: 12.3 s, train: 5.0 s |" in lines
    assert "| device | cpu |" in lines

    # accuracy table (Wilson 5/10 = [0.2366, 0.7634], 8/10 = [0.4902, 0.9433])
    assert "| system | accuracy | 95% Wilson CI | n |" in lines
    assert "| baseline G | 0.5000 | [0.2366, 0.7634] | 10 |" in lines
    assert "| MALT G->V->R | 0.8000 | [0.4902, 0.9433] | 10 |" in lines

    # paired comparison: 3 discordant questions, all wins -> McNemar p = 2 * 1/8 = 0.25
    # (with its discordant counts: target only / baseline only / n)
    assert (
        "| target vs baseline | diff | discordant: target only / baseline only / n | McNemar p "
        "| bootstrap 95% CI | bootstrap p |"
    ) in lines
    row = next(line for line in lines if line.startswith("| MALT G->V->R vs baseline G |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    c = comps[0]
    assert cells[1:] == [
        "+0.3000",
        "3 / 0 / 10",
        "0.2500",
        f"[{c['bootstrap_lo']:.4f}, {c['bootstrap_hi']:.4f}]",
        f"{c['bootstrap_p']:.4f}",
    ]

    # credit table: aliases folded into the role names, ordered G, V, R
    assert "| role | valid nodes | positive rate | SFT examples | DPO pairs |" in lines
    assert "| generator | 12 | 0.2500 | 3 | 7 |" in lines
    assert "| verifier | 36 | 0.5000 | 18 | 20 |" in lines
    assert "| refiner | n/a | 0.7500 | 81 | 40 |" in lines
    assert lines.index("| generator | 12 | 0.2500 | 3 | 7 |") < lines.index("| refiner | n/a | 0.7500 | 81 | 40 |")
    assert "threshold: 0.5" in text

    # plots, referenced from the markdown
    for name in ("accuracy.png", "positive_rate.png"):
        w, h = _png_size(tmp_path / "run" / name)
        assert w >= 300 and h >= 300
        assert f"]({name})" in text


def test_report_run_table_from_the_pipelines_record(tmp_path, results):
    """The record the pipeline writes (``pipeline.run_record``): every field a labelled row, once."""
    from malt_jax.config import load_run_config
    from malt_jax.workflows.pipeline import run_record

    cfg = load_run_config(Path(__file__).parents[1] / "experiments" / "smollm2_synthetic.yaml")
    record = run_record(cfg, n_train=128, n_eval=10, timings={"load": 1.0, "eval": 2.5})
    lines = write_report(tmp_path, results, [], None, record).read_text().splitlines()
    rows = lines[lines.index("## Run") + 4 : lines.index("## Accuracy") - 1]
    assert rows == [
        "| Model | smollm2 |",
        "| Task | synthetic |",
        "| Questions | 10 |",
        "| Seeds | split 0, train 0, eval 1 |",
        f"| Config hash | {cfg.hash()} |",
        "| Wall time | load: 1.0 s, eval: 2.5 s |",
        "| Training questions | 128 |",
        "| Framing | separate |",
        "| Tree (n x m x l) | 3x3x3 |",
    ]


def test_report_without_credit_summary(tmp_path, results):
    # stale plot from an earlier run must not survive next to the new report
    (tmp_path / "positive_rate.png").write_bytes(b"stale")
    comps = compare(results, "MALT G->V->R", ["baseline G"], bootstrap_samples=50)
    path = write_report(tmp_path, results, comps, None, RunRecord(model="m"))
    text = path.read_text()
    assert "Credit assignment" not in text
    assert not (tmp_path / "positive_rate.png").exists()
    _png_size(tmp_path / "accuracy.png")

    path = write_report(tmp_path, results, comps, {}, RunRecord())
    text = path.read_text()
    assert "## Credit assignment" in text and "No per-role credit statistics" in text
    assert "positive_rate.png" not in text
    assert not (tmp_path / "positive_rate.png").exists()
    assert "| baseline G | 0.5000 | [0.2366, 0.7634] | 10 |" in text.splitlines()


def test_report_nan_rates_and_empty_inputs(tmp_path):
    # "generator/sft" comes first, so a last-write-wins merge of the "G/" alias would show 0
    credit = {"generator/sft": 2, "G/positive_rate": float("nan"), "G/sft": 0, "G/dpo_pairs": 0}
    path = write_report(tmp_path, {}, [], credit, RunRecord(title="Empty run"))
    text = path.read_text()
    assert text.startswith("# Empty run\n")
    assert "No systems were evaluated." in text and "No paired comparisons." in text
    assert "| generator | n/a | 2 | 0 |" in text.splitlines()  # full role name wins over "G/"
    assert not (tmp_path / "accuracy.png").exists()
    _png_size(tmp_path / "positive_rate.png")


def test_format_table_alignment(results):
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["system", "accuracy", "95%", "Wilson", "CI", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("baseline G ") and "0.5000" in lines[2] and "[0.2366, 0.7634]" in lines[2]
    assert lines[3].startswith("MALT G->V->R") and lines[3].endswith("10")
    # columns are aligned: the accuracy and n columns end at the same offsets in every row
    ends = {line.index("0.") for line in lines[2:]}
    assert len(ends) == 1
    assert len({len(line) for line in lines}) == 1


def _epoch(stage, epoch, heldout, train=None, best=False, acc=None, margin=None):
    rec = {
        "stage": stage,
        "epoch": epoch,
        "step": 2 * epoch,
        "learning_rate": None if epoch == 0 else 1e-3,
        "train/loss": train,
        "heldout/loss": heldout,
        "best": best,
    }
    if stage == "sft":
        rec["heldout/accuracy"] = 0.5
    else:
        rec.update(
            {
                "train/rewards/accuracies": None if epoch == 0 else 0.75,
                "train/rewards/margins": None,
                "heldout/rewards/accuracies": acc,
                "heldout/rewards/margins": margin,
                "heldout/rewards/chosen": 0.0,
                "heldout/rewards/rejected": 0.0,
            }
        )
    return rec


EPOCHS = {
    "generator": [
        _epoch("sft", 0, 2.5),
        _epoch("sft", 1, 1.75, 2.0),
        _epoch("sft", 2, 1.5, 1.2, best=True),
        _epoch("sft", 3, 1.625, 0.8),
    ],
    "verifier": [
        _epoch("sft", 0, 3.0),
        _epoch("sft", 1, 2.25, 2.5, best=True),
        _epoch("sft", 2, 2.5, 1.0),
        _epoch("dpo", 0, 0.6931, acc=0.0, margin=0.0),
        _epoch("dpo", 1, 0.5, 0.6, True, 0.8, 0.375),
    ],
    "refiner": [],
}
COUNTS = {
    "generator": {"sft": 12, "sft_heldout": 4, "dpo": 0, "dpo_heldout": 0},
    "verifier": {"sft": 20, "sft_heldout": 5, "dpo": 9, "dpo_heldout": 3},
    "refiner": {"sft": 0, "sft_heldout": 0, "dpo": 0, "dpo_heldout": 0, "trained": False},
}


def test_plot_training_curves_writes_png(tmp_path):
    plot_training_curves(EPOCHS, tmp_path / "training.png")
    w, h = _png_size(tmp_path / "training.png")
    assert w == 1200 and h == 650  # one 4-inch column per role, two rows, dpi 100


def test_training_section_numbers():
    lines = training_section(EPOCHS, COUNTS)
    assert lines[0] == "## Training (epoch selection on held-out data)"
    assert "| generator | SFT | 12 / 4 | 3 | 2 | 2.5000 | 1.5000 | - | - |" in lines
    assert "| generator | DPO | 0 / 0 | 0 | - | not run |  |  |  |" in lines
    assert "| verifier | SFT | 20 / 5 | 2 | 1 | 3.0000 | 2.2500 | - | - |" in lines
    assert "| verifier | DPO | 9 / 3 | 1 | 1 | 0.6931 | 0.5000 | 0.8000 | +0.3750 |" in lines
    assert any(
        line.startswith("| refiner |") and "no positive examples: keeps the base model" in line for line in lines
    )
    # without a "trained" flag, a role with no records and no data is recognised as untrained
    lines = training_section({"R": []}, {"R": {"sft": 0, "dpo": 0}})
    assert any("keeps the base model" in line for line in lines)
