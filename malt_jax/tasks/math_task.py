"""MATH (Hendrycks et al. 2021): competition problems with LaTeX answers.

Two layouts are read:

* the original release: one JSON object per file (``problem``, ``level``, ``type``,
  ``solution``) under ``<root>/<split>/<subject>/<n>.json``; gold = content of the last
  ``\\boxed{}``/``\\fbox{}`` in ``solution`` (nested braces handled);
* MATH-500 style JSON lines (``problem``, ``answer``, ``solution``, ``subject``, ``level``,
  ``unique_id``); gold = ``answer``.

(Module named ``math_task`` so it does not shadow the standard library's ``math``.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from malt_jax.tasks import exprparse
from malt_jax.tasks.base import Example, LoadResult, Task, check_on_error
from malt_jax.tasks.dataio import (
    SPLIT_ALIASES,
    RowError,
    read_json_files,
    read_jsonl,
    require,
    resolve_split_file,
)
from malt_jax.tasks.grading import MAX_ITEMS, _structure, extract_math, grade_math
from malt_jax.tasks.latex import MAX_ANSWER_CHARS, last_boxed, latex_to_infix, normalize_math
from malt_jax.tasks.prompts import resolve_prompts
from malt_jax.tasks.symbolic import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

_META_KEYS = ("level", "type", "subject", "unique_id")
_ALL_SPLIT_NAMES = {alias for aliases in SPLIT_ALIASES.values() for alias in aliases}


def parse_row(row: Mapping[str, Any], row_id: str) -> Example:
    """One MATH problem (either layout) -> ``Example``."""
    problem = require(row, "problem").strip()
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        gold = row["answer"].strip()
    else:
        gold = last_boxed(require(row, "solution")) or ""
        if not gold.strip():
            raise RowError("no 'answer' field and no \\boxed{} answer in 'solution'")
    meta = {k: row[k] for k in _META_KEYS if k in row}
    if isinstance(row.get("solution"), str):
        meta["solution"] = row["solution"]
    return Example(id=str(row.get("unique_id", row_id)), question=problem, answer=gold.strip(), meta=meta)


class MATH(Task):
    """MATH from a per-problem JSON tree or a MATH-500 style jsonl file/directory."""

    name = "math"

    def __init__(
        self,
        path: str | Path | None = None,
        on_error: str = "raise",
        prompts: Any = None,
        symbolic: bool = True,
        symbolic_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.path = Path(path) if path else None
        self.on_error = check_on_error(on_error)
        self.prompts = resolve_prompts("math", prompts)
        self.symbolic = bool(symbolic)
        self.symbolic_timeout = float(symbolic_timeout)

    def _load(self, split: str) -> LoadResult:
        if self.path is None:
            raise ValueError("math needs path= (a MATH directory tree or a jsonl file)")
        p = self.path
        if p.is_file():
            return read_jsonl(p, parse_row, self.on_error)
        if (p / split).is_dir():
            return read_json_files(p / split, parse_row, self.on_error)
        if any(p.glob("*.jsonl")):
            return read_jsonl(resolve_split_file(p, split, (".jsonl",)), parse_row, self.on_error)
        split_dirs = [d.name for d in p.iterdir() if d.is_dir() and d.name in _ALL_SPLIT_NAMES]
        if split_dirs:
            raise FileNotFoundError(f"{p}: no split {split!r} (found {sorted(split_dirs)})")
        if not p.is_dir():
            raise FileNotFoundError(f"data path {p} does not exist")
        return read_json_files(p, parse_row, self.on_error)

    def extract(self, text: str) -> str | None:
        return extract_math(text)

    def grade(self, text: str, gold: str) -> int:
        return grade_math(text, gold, self.symbolic, self.symbolic_timeout)

    def answer_key(self, text: str, example: Example) -> str | None:
        """``math_answer_key`` of the extracted answer (``\\frac12``, ``1/2``, ``0.5`` -> ``"1/2"``)."""
        answer = extract_math(text)
        return math_answer_key(answer) if answer is not None else None


def math_answer_key(answer: str) -> str | None:
    """Canonical vote key of a LaTeX answer, bounded and eval-free (no sympy).

    Numeric scalars become their exact rational value (``"1/2"``, ``"3"``; ``"0.33"`` and
    ``"\\frac13"`` stay apart, as in ``math_equal``); anything else is its ``normalize_math``
    string. Bare lists and ``\\{..\\}`` sets (unordered in the grader) get their item keys
    sorted; tuples and intervals keep their brackets and order. Symbolic equivalents the grader
    proves with sympy ("2\\sqrt{2}" = "\\sqrt{8}") may get different keys.
    """
    try:
        norm = normalize_math(answer)
        if not norm:
            return None
        if len(norm) > MAX_ANSWER_CHARS:
            return norm
        kind, items = _structure(norm)
        if len(items) > MAX_ITEMS:
            return norm
        keys = [_scalar_key(x) for x in items]
    except Exception:  # noqa: BLE001 - a key never takes the pipeline down
        log.exception("math_answer_key failed; using the raw answer")
        return answer.strip() or None
    if kind == "scalar":
        return keys[0]
    if kind in ("set", "list"):
        return ",".join(sorted(keys))
    return kind[0] + ",".join(keys) + kind[1]


def _scalar_key(item: str) -> str:
    """Exact rational value of a numeric scalar as ``str(Fraction)``, else its normalised form."""
    norm = normalize_math(item)
    infix = latex_to_infix(norm)
    if infix is None:
        return norm
    try:
        node = exprparse.parse(infix)
        if not exprparse.is_numeric(node):
            return norm
        return str(exprparse.evaluate_exact(node))
    except (exprparse.ParseError, exprparse.TooBig, exprparse.Unsupported, ZeroDivisionError, ValueError):
        return norm
