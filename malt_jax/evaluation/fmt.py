"""Markdown cells and tables of the run report: numbers, intervals, p-values, seconds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["is_nan", "fmt_float", "fmt_ci", "fmt_p", "fmt_int", "fmt_seconds", "fmt_meta", "cell", "md_table"]


def is_nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_float(x: Any, digits: int = 4, sign: bool = False) -> str:
    if x is None or is_nan(x):
        return "n/a"
    return f"{float(x):{'+' if sign else ''}.{digits}f}"


def fmt_ci(lo: Any, hi: Any) -> str:
    if lo is None or hi is None or is_nan(lo) or is_nan(hi):
        return "n/a"
    return f"[{float(lo):.4f}, {float(hi):.4f}]"


def fmt_p(p: Any) -> str:
    if p is None or is_nan(p):
        return "n/a"
    p = float(p)
    return f"{p:.2e}" if 0.0 < p < 1e-4 else f"{p:.4f}"


def fmt_int(x: Any) -> str:
    if x is None or is_nan(x):
        return "n/a"
    return str(int(x))


def fmt_seconds(s: Any) -> str:
    try:
        return f"{float(s):.1f} s"
    except (TypeError, ValueError):
        return str(s)


def fmt_meta(key: str, value: Any) -> str:
    if key == "wall_times" or key.startswith("wall"):
        if isinstance(value, Mapping):
            return ", ".join(f"{k}: {fmt_seconds(v)}" for k, v in value.items()) or "n/a"
        return fmt_seconds(value)
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out
