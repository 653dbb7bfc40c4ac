"""The optimizer of LoRA training: global-norm clipping, then AdamW with linear warmup and cosine
decay to 0 (:func:`make_optimizer`).

The schedule's numbers (peak, warmup, total) live in the optimizer *state* (:class:`ScheduleState`),
not in closures, so one compiled step serves every stage and role whatever their learning rate
and length. Gradient accumulation happens inside the step (``steps.py``), not here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from malt_jax.config import TrainConfig

__all__ = [
    "warmup_cosine",
    "optax_schedule",
    "ScheduleState",
    "scale_by_warmup_cosine",
    "warmup_steps",
    "make_optimizer",
    "current_lr",
]


def warmup_cosine(count: jax.Array, peak: jax.Array, warmup: jax.Array, total: jax.Array) -> jax.Array:
    """Learning rate of update ``count`` (0-based): linear warmup ``peak * (count+1) / warmup``
    for ``count < warmup``, then cosine decay from ``peak`` towards 0 over the remaining
    ``total - warmup`` updates (the last update keeps a small positive rate)."""
    t = jnp.asarray(count, jnp.float32)
    warm = peak * (t + 1.0) / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((t - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return jnp.where(t < warmup, warm, peak * 0.5 * (1.0 + jnp.cos(math.pi * progress)))


def optax_schedule(peak: float, warmup: int, total: int) -> optax.Schedule:
    """:func:`warmup_cosine` written with optax's own schedules (linear warmup from ``peak /
    warmup`` joined to ``optax.cosine_decay_schedule``); tests check that ``make_optimizer``
    equals ``optax.chain(optax.clip_by_global_norm(c), optax.adamw(optax_schedule(...)))``. The
    project keeps the schedule's numbers in the optimizer state instead of this closure so that
    one compiled step serves every stage and role."""
    cosine = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=0.0)
    if warmup <= 0:
        return cosine
    warm = optax.linear_schedule(peak / warmup, peak, max(warmup - 1, 1))
    return optax.join_schedules([warm, cosine], [warmup])


class ScheduleState(NamedTuple):
    """Schedule parameters live in the optimizer *state* (not in closures), so one compiled
    step serves every stage and role whatever their learning rate and length."""

    # int32, updates applied. The field shadows tuple.count, which mypy rejects; the name is the
    # optimizer state's key in checkpoints (as in optax's own states), so it stays.
    count: jax.Array  # type: ignore[assignment]
    peak: jax.Array  # f32
    warmup: jax.Array  # f32
    total: jax.Array  # f32
    learning_rate: jax.Array  # f32, rate of the last update (for logging)


def scale_by_warmup_cosine() -> optax.GradientTransformation:
    """``updates * -warmup_cosine(count, ...)`` with the schedule read from :class:`ScheduleState`."""

    def init(params: Any) -> ScheduleState:
        z = jnp.zeros((), jnp.float32)
        return ScheduleState(jnp.zeros((), jnp.int32), z, z, z, z)

    def update(updates: Any, state: ScheduleState, params: Any = None) -> tuple[Any, ScheduleState]:
        lr = warmup_cosine(state.count, state.peak, state.warmup, state.total)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, state._replace(count=state.count + 1, learning_rate=lr)

    return optax.GradientTransformation(init, update)


@functools.lru_cache(maxsize=16)
def _base_optimizer(grad_clip: float, weight_decay: float) -> optax.GradientTransformation:
    # = optax.adamw (scale_by_adam -> decoupled weight decay -> scale by -lr), after clipping.
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip and grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        scale_by_warmup_cosine(),
    )


@functools.lru_cache(maxsize=16)
def _jitted_init(grad_clip: float, weight_decay: float) -> Any:
    return jax.jit(_base_optimizer(grad_clip, weight_decay).init)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup length of a stage of ``total_steps`` updates: ``ceil(warmup_ratio * total_steps)``,
    at least 1 when the ratio is > 0, and at most ``total_steps - 1`` so the cosine decay runs."""
    if warmup_ratio <= 0 or total_steps <= 1:
        return 0
    w = math.ceil(warmup_ratio * total_steps - 1e-9)  # 0.1 * 30 is 3.0000000000000004
    return int(min(max(w, 1), total_steps - 1))


def make_optimizer(
    train_cfg: TrainConfig, total_steps: int, learning_rate: float | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip``) + AdamW (``weight_decay``) with linear warmup
    (:func:`warmup_steps` of ``warmup_ratio`` and ``total_steps``) and cosine decay over
    ``total_steps`` updates, peak ``learning_rate`` (default ``train_cfg.learning_rate``).

    Gradient accumulation is done inside the step (``grad_accum`` microbatches per update), not
    by the optimizer. The schedule values are written into the state by ``init``; ``update`` is
    shared by all optimizers with the same ``grad_clip``/``weight_decay`` (no recompiles).
    """
    lr = train_cfg.learning_rate if learning_rate is None else learning_rate
    warmup = warmup_steps(float(train_cfg.warmup_ratio), int(total_steps))
    base = _base_optimizer(float(train_cfg.grad_clip), float(train_cfg.weight_decay))
    base_init = _jitted_init(float(train_cfg.grad_clip), float(train_cfg.weight_decay))

    def init(params: Any) -> Any:
        *rest, sched = base_init(params)
        f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return (*rest, sched._replace(peak=f(lr), warmup=f(warmup), total=f(total_steps)))

    return optax.GradientTransformation(init, base.update)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate of the last update, read from the :class:`ScheduleState` in ``opt_state``."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState)):
        if isinstance(node, ScheduleState):
            return node.learning_rate
    return jnp.zeros((), jnp.float32)
