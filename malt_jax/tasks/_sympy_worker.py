"""Sandboxed sympy equivalence worker (run as ``python -m malt_jax.tasks._sympy_worker``).

Reads one JSON request per line ``{"a": infix, "b": infix}`` and answers ``{"equal": bool}``.
Inputs are re-parsed by the whitelisted ``exprparse`` grammar (never ``eval``/``parse_expr``);
the address space is capped, and the parent kills the process when a request overruns.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys


def _limit_memory(mb: int) -> None:
    limit = mb * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):  # pragma: no cover - platform dependent
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def check(a: str, b: str) -> bool:
    """True when sympy proves the two whitelisted expressions equal."""
    import sympy

    from malt_jax.tasks.exprparse import parse, to_sympy

    try:
        diff = sympy.simplify(to_sympy(parse(a), sympy) - to_sympy(parse(b), sympy))
        if diff == 0:
            return True
        if not diff.free_symbols:
            return diff.equals(0) is True
        return False
    except (Exception, MemoryError, RecursionError):
        return False


def main() -> None:
    _limit_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
    import sympy  # noqa: F401  (warm the import before announcing readiness)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            equal = check(str(req["a"]), str(req["b"]))
        except (ValueError, KeyError, TypeError):
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
