"""Tasks layer: data loading, role prompts, answer extraction and grading behind one interface.

Use ``get_task(name, path=None, **options)`` for ``"gsm8k"``, ``"math"``, ``"csqa"`` and the
embedded ``"synthetic"`` arithmetic; every task has ``name``, ``prompts`` (``RolePrompts``),
``load(split)``, ``extract(text)``, ``grade(text, gold)`` and ``grade_example(text, example)``.

Layer 3: may import ``malt_jax.roles`` and ``malt_jax.config``; no JAX model code.
"""

from malt_jax.tasks.base import (
    DataError,
    Example,
    LoadResult,
    Task,
    split_examples,
    train_eval_sets,
)
from malt_jax.tasks.prompts import RolePrompts, default_prompts, role_messages
from malt_jax.tasks.registry import TASKS, get_task, task_options

__all__ = [
    "DataError",
    "Example",
    "LoadResult",
    "RolePrompts",
    "TASKS",
    "Task",
    "default_prompts",
    "get_task",
    "role_messages",
    "split_examples",
    "task_options",
    "train_eval_sets",
]
