"""GSM8K (Cobbe et al. 2021): grade-school math word problems with integer answers.

Sources: the original JSON-lines layout (``question``, ``answer`` whose last line is
``#### N``; gold = N with commas removed), as one file or a directory of ``train.jsonl`` /
``test.jsonl``; or a TFDS directory written by ``to_tfds``.

TFDS: tfds' own ``gsm8k`` builder needs a download (impossible offline) and
``tfds.dataset_builders.store_as_tfds_dataset`` imports tensorflow; ``to_tfds`` instead uses a
small local ``GeneratorBasedBuilder`` with ``array_record`` files, which works WITHOUT
tensorflow installed (details in ``tfds_store``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from malt_jax.tasks import tfds_store
from malt_jax.tasks.base import DataError, Example, LoadResult, Task, check_on_error
from malt_jax.tasks.dataio import RowError, read_jsonl, require, resolve_split_file
from malt_jax.tasks.grading import extract_number, grade_number, normalize_number
from malt_jax.tasks.prompts import resolve_prompts

TFDS_NAME = "malt_gsm8k"
TFDS_FIELDS = ("id", "question", "answer")


def gold_from_solution(solution: str) -> str:
    """The normalised number after the last ``####`` of a GSM8K solution."""
    if "####" not in solution:
        raise RowError("answer has no '#### <number>' line")
    gold = normalize_number(solution.rsplit("####", 1)[1])
    if gold is None:
        raise RowError(f"answer after '####' is not a number: {solution.rsplit('####', 1)[1]!r}")
    return gold


def parse_row(row: Mapping[str, Any], row_id: str) -> Example:
    """One GSM8K row -> ``Example`` (``meta['solution']`` keeps the worked solution)."""
    question = require(row, "question").strip()
    solution = require(row, "answer")
    gold = gold_from_solution(solution)
    return Example(id=str(row.get("id", row_id)), question=question, answer=gold, meta={"solution": solution})


class GSM8K(Task):
    """GSM8K from local files (jsonl or a ``to_tfds`` directory)."""

    name = "gsm8k"

    def __init__(self, path: str | Path | None = None, on_error: str = "raise", prompts: Any = None) -> None:
        super().__init__()
        self.path = Path(path) if path else None
        self.on_error = check_on_error(on_error)
        self.prompts = resolve_prompts("gsm8k", prompts)

    def _load(self, split: str) -> LoadResult:
        if self.path is None:
            raise ValueError("gsm8k needs path= (a jsonl file, a directory, or a to_tfds dir)")
        tfds_dir = tfds_store.find_tfds_dir(self.path) if self.path.is_dir() else None
        if tfds_dir is not None:
            return _load_tfds(tfds_dir, split, self.on_error)
        return read_jsonl(resolve_split_file(self.path, split, (".jsonl",)), parse_row, self.on_error)

    def extract(self, text: str) -> str | None:
        return extract_number(text)

    def answer_key(self, text: str, example: Example) -> str | None:
        """The extracted number in canonical decimal form ("0.50", ".5" -> "0.5")."""
        value = extract_number(text)
        return normalize_number(value) if value is not None else None

    def grade(self, text: str, gold: str) -> int:
        return grade_number(text, gold)


def _load_tfds(version_dir: Path, split: str, on_error: str) -> LoadResult:
    result = LoadResult(examples=[])
    for i, row in enumerate(tfds_store.read_text_dataset(version_dir, split)):
        try:
            result.examples.append(parse_row(row, row["id"]))
        except RowError as e:
            err = DataError(version_dir / split, i + 1, str(e))
            if on_error == "raise":
                raise err from None
            result.add_error(err)
    return result


def to_tfds(path: str | Path, data_dir: str | Path, on_error: str = "raise") -> Path:
    """Store GSM8K jsonl rows as a TFDS (array_record) dataset; returns its version dir.

    ``path`` is one ``.jsonl`` file (stored as the split named by its stem, e.g. ``test``) or a
    directory whose ``*.jsonl`` files each become a split. Rows are validated first (malformed
    rows raise ``DataError`` or, with ``on_error="skip"``, are left out). Read it back with
    ``GSM8K(path=<returned dir>)`` or ``get_task("gsm8k", path=...)``.
    """
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    rows: dict[str, list[dict[str, str]]] = {}
    for file in files:
        loaded = read_jsonl(file, parse_row, on_error)
        rows[file.stem] = [
            {"id": ex.id, "question": ex.question, "answer": ex.meta["solution"]} for ex in loaded.examples
        ]
    if not rows:
        raise FileNotFoundError(f"no .jsonl files at {p}")
    return tfds_store.write_text_dataset(TFDS_NAME, rows, TFDS_FIELDS, data_dir)
