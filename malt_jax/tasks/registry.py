"""Task registry: ``get_task(name, path=None, **options)`` is the pipeline's single entry point.

Options are the keyword arguments of each task class (e.g. ``on_error``, ``prompts``,
``symbolic_timeout``, or the synthetic difficulty knobs); unknown names and unknown options
are errors that list the valid choices.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from malt_jax.tasks.base import Task
from malt_jax.tasks.csqa import CSQA
from malt_jax.tasks.gsm8k import GSM8K
from malt_jax.tasks.math_task import MATH
from malt_jax.tasks.synthetic import SyntheticArithmetic

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8K,
    "math": MATH,
    "csqa": CSQA,
    "synthetic": SyntheticArithmetic,
}


def task_options(name: str) -> list[str]:
    """The option names ``get_task(name, ...)`` accepts (besides ``path``)."""
    return [p for p in inspect.signature(_task_class(name)).parameters if p != "path"]


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name]


def get_task(name: str, path: str | Path | None = None, **options: Any) -> Task:
    """Build task ``name`` reading data from ``path`` (ignored-if-empty for ``synthetic``)."""
    cls = _task_class(name)
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for task {name!r}; valid options: {valid}")
    takes_path = "path" in inspect.signature(cls).parameters
    if takes_path:
        return cls(path=path or None, **options)
    if path:
        raise ValueError(f"task {name!r} is generated and takes no path (got {str(path)!r})")
    return cls(**options)
