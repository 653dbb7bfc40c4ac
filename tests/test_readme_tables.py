"""README.md and docs/experiments.md hold the result tables exactly as experiments/results_tables.py
prints them from results/*.json: a table that drifts from its JSON fails here. To fix a failure,
paste the blocks of `python experiments/results_tables.py --readme` (or `--docs`) over the old ones."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "experiments" / "results_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TABLES = _tables()


def _heading(block: str) -> str:
    return block.split("\n", 1)[0]


@pytest.mark.parametrize(
    ("doc", "blocks"),
    [("README.md", TABLES.readme_blocks()), ("docs/experiments.md", TABLES.docs_blocks())],
    ids=["readme", "docs"],
)
def test_result_blocks_verbatim(doc: str, blocks: list[str]) -> None:
    text = (ROOT / doc).read_text()
    for block in blocks:
        assert block in text, f"{doc}: the block {_heading(block)!r} differs from results_tables.py's output"


def test_readme_blocks_in_order() -> None:
    text = (ROOT / "README.md").read_text()
    starts = [text.index(b) for b in TABLES.readme_blocks()]
    assert starts == sorted(starts)


def test_every_summary_has_a_block() -> None:
    """Every experiment summary in results/ is shown somewhere (the study's per-size files by the study)."""
    shown = "\n".join(TABLES.readme_blocks() + TABLES.docs_blocks())
    for path in sorted((ROOT / "results").glob("*.json")):
        assert f"results/{path.name}" in shown, path.name


def test_machine_and_date_fields() -> None:
    """A summary's own `date` / `machine` fields win; a file of unknown provenance says so."""
    d = {"wall_time_s": 1.0, "date": "2027-01-02T03:04:05", "machine": {"cpu": "AMD EPYC 7B13", "isa": ["avx2"]}}
    assert TABLES._date("smollm2-synthetic.json", d) == "2027-01-02"
    assert TABLES._machine("smollm2-synthetic.json", d) == "AMD EPYC 7B13 (avx2)"
    rerun = {"wall_time_s": 1.0}  # a re-run written without the fields: not the committed run
    assert TABLES._date("smollm2-synthetic.json", rerun) == "not recorded in the file"
    assert TABLES._machine("smollm2-synthetic.json", rerun) == "not recorded in the file"


def test_figures_dated_not_numbered_by_work_period() -> None:
    """The documents date their figures ("measured 2026-11-30"), never by work period."""
    word = "sess" + "ion"  # spelt in two parts so that this file does not contain it either
    for doc in ["README.md", "bench/README.md", "tpu_configs/README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = (ROOT / doc).read_text()
        assert not re.search(word, text, re.IGNORECASE), doc
