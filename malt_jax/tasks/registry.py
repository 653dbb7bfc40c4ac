"""Task registry: ``get_task(name, path=None, **options)`` is the pipeline's single entry point.

Options are the keyword arguments of each task class (e.g. ``on_error``, ``prompts``,
``symbolic_timeout``, or the synthetic difficulty knobs); unknown names and unknown options
are errors that list the valid choices. A name of the form ``package.module:Class`` imports a
user's own :class:`Task` subclass, so ``malt-jax run`` works on tasks defined outside malt-jax.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from malt_jax.tasks.base import Task
from malt_jax.tasks.csqa import CSQA
from malt_jax.tasks.gsm8k import GSM8K
from malt_jax.tasks.math_task import MATH
from malt_jax.tasks.synthetic import SyntheticArithmetic
from malt_jax.tasks.testbed import TestbedTask

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8K,
    "math": MATH,
    "csqa": CSQA,
    "synthetic": SyntheticArithmetic,
    "testbed": TestbedTask,
}


def task_options(name: str) -> list[str]:
    """The option names ``get_task(name, ...)`` accepts (besides ``path``)."""
    cls = _task_class(name)
    params = [p for p, v in inspect.signature(cls).parameters.items() if p != "path" and v.kind != v.VAR_KEYWORD]
    return params + list(getattr(cls, "option_names", ()))


def _task_class(name: str) -> type[Task]:
    if ":" in name:
        return _import_task(name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name]


def _import_task(name: str) -> type[Task]:
    """``package.module:Class`` -> that class (a :class:`Task` subclass)."""
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"task {name!r}: cannot import {attr!r} from {module!r} ({e}); a custom task is "
            f"given as 'package.module:Class' on the Python path"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task {name!r}: {attr} is not a malt_jax.tasks.Task subclass")
    return cls


def get_task(name: str, path: str | Path | None = None, **options: Any) -> Task:
    """Build task ``name`` reading data from ``path`` (ignored-if-empty for ``synthetic``)."""
    cls = _task_class(name)
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for task {name!r}; valid options: {valid}")
    if "path" in inspect.signature(cls).parameters:
        options = {"path": path or None, **options}
    elif path:
        raise ValueError(f"task {name!r} is generated and takes no path (got {str(path)!r})")
    return cls(**options)
