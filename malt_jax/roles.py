"""The three MALT roles, in tree order: generator G (level 0), verifier V (1), refiner R (2).

The one place the roles are named. Letters key run-directory files (``G_sft.jsonl``,
``adapters/V.safetensors``), sampled arrays (``R_tokens``) and adapter tuples; full names key
credit statistics (``verifier/positive_rate``), role prompts and training logs.
"""

from __future__ import annotations

__all__ = ["ROLES", "NAMES", "ROLE_NAMES", "role_name", "role_letter", "as_role_name"]

ROLES = ("G", "V", "R")
NAMES = ("generator", "verifier", "refiner")
ROLE_NAMES = dict(zip(ROLES, NAMES))  # {"G": "generator", "V": "verifier", "R": "refiner"}
_BY_ALIAS = {**{r.lower(): n for r, n in ROLE_NAMES.items()}, **{n: n for n in NAMES}}


def as_role_name(role: object) -> str | None:
    """The full name of ``role`` (a letter or a name, any case, surrounding spaces ignored), or
    None when it names no role."""
    return _BY_ALIAS.get(str(role).strip().lower())


def role_name(role: object) -> str:
    """``"G"/"V"/"R"`` or the full name (any case) -> ``"generator"|"verifier"|"refiner"``."""
    name = as_role_name(role)
    if name is None:
        raise ValueError(f"unknown role {role!r}; expected one of {NAMES} or G/V/R")
    return name


def role_letter(role: object) -> str:
    """``"generator"`` (or ``"g"``, ...) -> ``"G"``; the letter of :func:`role_name`."""
    return ROLES[NAMES.index(role_name(role))]
