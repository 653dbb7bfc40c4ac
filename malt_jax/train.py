"""LoRA training of one MALT role: SFT on positive trajectories, then DPO on preference pairs.

Design
------
* The base model is frozen and passed to every step separately; only the adapter (``lora.py``)
  is differentiated and optimised. ``TrainState = (step, adapter, opt_state)``.
* One call of :func:`sft_step` / :func:`dpo_step` is one optimizer update. ``batch_size``
  counts examples (pairs for DPO) per update; with ``grad_accum = A`` the batch is split into
  ``A`` microbatches that run sequentially under ``lax.scan`` and whose gradients are summed.
  Losses are normalised by the *whole* batch's token count (SFT) or pair weight (DPO), so the
  accumulated step equals a step on the union batch.
* Optimizer (:func:`make_optimizer`): global-norm clipping, then AdamW with linear warmup and
  cosine decay to 0. The schedule values live in the optimizer state, so one compiled step
  serves every stage and role.
* NaN/Inf guard: the step applies the update only when loss and gradient norm are finite
  (``jnp.where`` on the state inside the jitted step); the host then raises
  :class:`NonFiniteError` naming the role and step. The state returned is the unchanged one,
  so no bad update ever reaches a checkpoint.
* DPO reference: ``train_cfg.dpo_reference`` is ``"sft"`` (the role's adapter as it was when
  DPO started, i.e. after SFT, as in the MALT paper) or ``"base"`` (no adapter). Either way no
  second model copy is held: :func:`reference_logps` runs ONE jitted, gradient-free pass over
  the whole DPO dataset before training and the per-pair reference log-probs are fed to
  :func:`dpo_step` with each batch (and stored in DPO checkpoints, so resuming is exact).
* Sharding: with a mesh, :class:`Stepper` jits the step with ``in_shardings``/``out_shardings``:
  base params by ``sharding.param_shardings`` (fsdp over embed, tensor over heads/ffn), adapter
  and its optimizer moments by the LoRA shardings, scalars replicated, batches split over
  ``data`` x ``fsdp``.
* Epoch selection: ``sft_epochs`` / ``dpo_epochs`` are maxima. Given held-out examples,
  :func:`heldout_metrics` scores them without gradients before the first update and after every
  epoch; each stage keeps its best adapter by held-out loss and stops early after
  ``early_stop_patience`` epochs without improvement. The warmup is ``warmup_ratio`` of the
  stage's (maximum) number of updates.
* :func:`train_role` is the host driver: stages, progress bar, checkpoints every
  ``checkpoint_every`` steps and at stage ends, exact resume from the latest checkpoint; it
  returns a :class:`RoleTraining` (adapters, per-step history, per-epoch records).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from malt_jax import data as data_lib
from malt_jax.checkpoint import Checkpointer, flatten_named
from malt_jax.config import LoraConfig, ModelConfig, TrainConfig, to_dict
from malt_jax.data import DPOExample, SFTExample
from malt_jax.distributed import fetch, put
from malt_jax.losses import dpo_loss, sequence_logps, sft_loss
from malt_jax.model.llama import (Params, causal_positions, forward, forward_from, hidden_at, init_params, lm_head,
                                  lora_first_layer)
from malt_jax.model.lora import adapter_shapes, init_lora, lora_scale
from malt_jax.sharding import batch_sharding, mesh_context, param_shardings

__all__ = [
    "TrainState",
    "NonFiniteError",
    "make_optimizer",
    "warmup_cosine",
    "warmup_steps",
    "ScheduleState",
    "sft_step",
    "dpo_step",
    "reference_logps",
    "state_shardings",
    "Stepper",
    "train_role",
    "RoleTraining",
    "heldout_metrics",
]

log = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/Inf; the offending update was not applied.

    ``state`` holds the (unchanged) training state, ``metrics`` the step's metrics.
    """

    def __init__(self, message: str, state: Any = None, metrics: dict | None = None):
        super().__init__(message)
        self.state = state
        self.metrics = metrics


@flax.struct.dataclass
class TrainState:
    """Trainable state of one role: update counter, LoRA adapter, optimizer state."""

    step: jax.Array
    adapter: Params
    opt_state: optax.OptState

    @classmethod
    def create(cls, adapter: Params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter))


# ----------------------------------------------------------------------------------------------
# optimizer


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

    count: jax.Array  # int32, updates applied
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


def make_optimizer(train_cfg: TrainConfig, total_steps: int,
                   learning_rate: float | None = None) -> optax.GradientTransformation:
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


def _current_lr(opt_state: Any) -> jax.Array:
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState)):
        if isinstance(node, ScheduleState):
            return node.learning_rate
    return jnp.zeros((), jnp.float32)


# ----------------------------------------------------------------------------------------------
# the steps


def _microbatches(tree: Any, accum: int) -> Any:
    """[B, ...] -> [A, B // A, ...]; microbatch ``i`` holds rows ``i, i + A, ...`` so that every
    device shard of the batch axis contributes evenly to every microbatch."""

    def split(x: jax.Array) -> jax.Array:
        B = x.shape[0]
        return jnp.swapaxes(x.reshape(B // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def _accumulate(loss_fn: Any, adapter: Params, batch: Any, accum: int) -> tuple[jax.Array, Metrics, Params]:
    """Sums ``value_and_grad(loss_fn)`` over ``accum`` microbatches (``lax.scan``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(adapter, batch)
        return loss, metrics, grads
    micro = _microbatches(batch, accum)
    first = jax.tree.map(lambda x: x[0], micro)
    (l_shape, m_shape) = jax.eval_shape(loss_fn, adapter, first)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), zeros(m_shape), jax.tree.map(jnp.zeros_like, adapter))

    def body(carry: Any, mb: Any) -> tuple[Any, None]:
        l_acc, m_acc, g_acc = carry
        (loss, metrics), grads = grad_fn(adapter, mb)
        return (l_acc + loss, jax.tree.map(jnp.add, m_acc, metrics), jax.tree.map(jnp.add, g_acc, grads)), None

    (loss, metrics, grads), _ = jax.lax.scan(body, init, micro)
    return loss, metrics, grads


class _StepCfg(NamedTuple):
    """The few TrainConfig fields a compiled step depends on (its static jit key)."""

    grad_accum: int
    dpo_beta: float
    dpo_loss: str
    label_smoothing: float

    @classmethod
    def of(cls, t: TrainConfig) -> "_StepCfg":
        return cls(max(int(t.grad_accum), 1), float(t.dpo_beta), t.dpo_loss, float(t.label_smoothing))


def _apply(state: TrainState, loss: jax.Array, metrics: Metrics, grads: Params,
           update: optax.TransformUpdateFn) -> tuple[TrainState, Metrics]:
    """Optimizer update, applied only when loss and gradient norm are finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    new = TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite,
               "learning_rate": _current_lr(opt_state)}
    return new, metrics


# Arrays of a batch with one entry per row: tokens / targets / loss_mask [R, T] (data.pack_*),
# optionally comp_index / comp_valid [R, C] (data.completion_index: only these positions are
# scored, so the LM head runs on the completion tokens alone) and hidden [R, T, dim] (the hidden
# states entering the adapter's first layer, precomputed once: the frozen layers below do not
# run at every step).
ROW_KEYS = ("tokens", "targets", "loss_mask", "comp_index", "comp_valid", "hidden")


def _scored_logits(base: Params, adapter: Params | None, rows: dict, cfg: ModelConfig,
                   scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits, targets, mask) at the scored positions of ``rows`` (see ``ROW_KEYS``): every
    position, or the completion positions ``comp_index`` (same losses: the others have mask 0)."""
    B, T = rows["tokens"].shape
    if "hidden" in rows:
        x = forward_from(base, rows["hidden"], cfg, lora_first_layer(cfg, adapter), lora=adapter, lora_scale=scale)
    else:
        x, _ = forward(base, rows["tokens"], causal_positions(B, T), cfg, lora=adapter, lora_scale=scale,
                       return_hidden=True)
    targets, mask = rows["targets"], rows["loss_mask"]
    if "comp_index" in rows:
        idx = rows["comp_index"]
        x = jnp.take_along_axis(x, idx[..., None], axis=1)
        targets = jnp.take_along_axis(targets, idx, axis=1)
        mask = jnp.take_along_axis(mask, idx, axis=1) * rows["comp_valid"]
    return lm_head(base, x, cfg), targets, mask


def _sft_micro(adapter: Params, mb: dict, *, base: Params, total: jax.Array, cfg: ModelConfig,
               scale: float) -> tuple[jax.Array, Metrics]:
    logits, targets, mask = _scored_logits(base, adapter, mb, cfg, scale)
    loss, m = sft_loss(logits, targets, mask)
    frac = m["n_tokens"] / total  # re-weights the microbatch mean into the whole-batch mean
    return loss * frac, {"accuracy": m["accuracy"] * frac, "n_tokens": m["n_tokens"]}


def sft_step(base: Params, state: TrainState, batch: dict, *, cfg: ModelConfig, train_cfg: TrainConfig,
             optimizer: optax.GradientTransformation, scale: float) -> tuple[TrainState, Metrics]:
    """One SFT update (masked next-token cross-entropy on completion tokens); jit-compiled.

    Args:
      base: frozen base params (never differentiated).
      state: the role's TrainState.
      batch: ``data.pack_sft`` output: tokens/targets int32[B, T], loss_mask f32[B, T], weights f32[B].
      scale: LoRA scale (alpha / rank).
    Returns:
      (new state — unchanged if the loss/grad norm is non-finite, metrics: loss, accuracy,
      n_tokens, grad_norm, learning_rate, finite).
    """
    return _sft_step(base, state, batch, cfg=cfg, sc=_StepCfg.of(train_cfg), update=optimizer.update,
                     scale=float(scale))


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "update", "scale"))
def _sft_step(base: Params, state: TrainState, batch: dict, *, cfg: ModelConfig, sc: _StepCfg,
              update: optax.TransformUpdateFn, scale: float) -> tuple[TrainState, Metrics]:
    total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1e-8)
    mb = {k: batch[k] for k in ROW_KEYS if k in batch}
    loss_fn = functools.partial(_sft_micro, base=base, total=total, cfg=cfg, scale=scale)
    loss, metrics, grads = _accumulate(loss_fn, state.adapter, mb, sc.grad_accum)
    return _apply(state, loss, metrics, grads, update)


def _pairs(batch: dict, ref_logps: jax.Array) -> dict:
    """Interleaved [2B, ...] rows -> [B, 2, ...] pairs (so microbatching keeps pairs whole)."""
    B = batch["weights"].shape[0]
    out = {k: batch[k].reshape(B, 2, *batch[k].shape[1:]) for k in ROW_KEYS if k in batch}
    out["weights"] = batch["weights"]
    out["ref"] = ref_logps.reshape(B, 2)
    return out


def _dpo_micro(adapter: Params, mb: dict, *, base: Params, total: jax.Array, cfg: ModelConfig,
               scale: float, sc: _StepCfg) -> tuple[jax.Array, Metrics]:
    b = mb["tokens"].shape[0]
    rows = {k: mb[k].reshape(2 * b, *mb[k].shape[2:]) for k in ROW_KEYS if k in mb}
    lp = sequence_logps(*_scored_logits(base, adapter, rows, cfg, scale)).reshape(b, 2)
    w = mb["weights"].astype(jnp.float32)
    loss, m = dpo_loss(lp[:, 0], lp[:, 1], mb["ref"][:, 0], mb["ref"][:, 1], beta=sc.dpo_beta,
                       loss_type=sc.dpo_loss, label_smoothing=sc.label_smoothing, weights=w)
    frac = w.sum() / total
    m = {k: v * frac for k, v in m.items() if k != "loss"}
    return loss * frac, m


def dpo_step(base: Params, state: TrainState, batch: dict, ref_logps: jax.Array, *, cfg: ModelConfig,
             train_cfg: TrainConfig, optimizer: optax.GradientTransformation,
             scale: float) -> tuple[TrainState, Metrics]:
    """One DPO update (``train_cfg.dpo_loss``, ``beta = train_cfg.dpo_beta``); jit-compiled.

    Args:
      batch: ``data.pack_dpo`` output (interleaved chosen/rejected rows [2B, T], weights [B]).
      ref_logps: f32[2B] reference log-probs of the same rows (see :func:`reference_logps`).
    Returns:
      (new state, metrics with TRL names: loss, rewards/chosen, rewards/rejected,
      rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, grad_norm, ...).
    """
    return _dpo_step(base, state, batch, ref_logps, cfg=cfg, sc=_StepCfg.of(train_cfg),
                     update=optimizer.update, scale=float(scale))


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "update", "scale"))
def _dpo_step(base: Params, state: TrainState, batch: dict, ref_logps: jax.Array, *, cfg: ModelConfig,
              sc: _StepCfg, update: optax.TransformUpdateFn, scale: float) -> tuple[TrainState, Metrics]:
    total = jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1e-8)
    loss_fn = functools.partial(_dpo_micro, base=base, total=total, cfg=cfg, scale=scale, sc=sc)
    loss, metrics, grads = _accumulate(loss_fn, state.adapter, _pairs(batch, ref_logps), sc.grad_accum)
    return _apply(state, loss, metrics, grads, update)


# ----------------------------------------------------------------------------------------------
# reference log-probs (one no-grad pass)


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def _batch_logps(base: Params, adapter: Params | None, rows: dict, *, cfg: ModelConfig, scale: float) -> jax.Array:
    """Summed completion log-probs [R] of ``rows`` (see ``ROW_KEYS``)."""
    return sequence_logps(*_scored_logits(base, adapter, rows, cfg, scale))


def _rows(batch: dict, mesh: Mesh | None, hidden: "HiddenCache | None" = None,
          idx: np.ndarray | None = None) -> dict:
    """A packed batch's per-row arrays with the completion index (and the cached hidden states
    of examples ``idx``), placed on the mesh."""
    rows = {k: batch[k] for k in ("tokens", "targets", "loss_mask")}
    rows["comp_index"], rows["comp_valid"] = data_lib.completion_index(batch["loss_mask"])
    if hidden is not None:
        rows["hidden"] = hidden.rows(idx, batch["tokens"].shape[1])
    if mesh is not None:
        rows = {k: put(a, batch_sharding(mesh, a.ndim, a.shape)) for k, a in rows.items()}
    return rows


class HiddenCache:
    """Per-example hidden states entering layer ``layer`` (the adapter's first), computed once
    per training stage: the frozen layers below never depend on the adapter.

    ``rows(idx, T)`` assembles a batch's ``hidden`` [R, T, dim] for example indices ``idx``
    (``-1`` = padding row; DPO: rows 2i / 2i+1 = pair i's chosen / rejected), row by row equal to
    running those layers on the packed batch (causal rows, right padding).
    """

    def __init__(self, base: Params, examples: Sequence[Any], cfg: ModelConfig, train_cfg: TrainConfig, layer: int,
                 pad_id: int = 0):
        self.layer, self.dim, self.dtype = layer, cfg.dim, np.dtype(cfg.dtype)
        self.per_row = 2 if any(isinstance(e, DPOExample) for e in examples) else 1
        chunk = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
        self.rows_of: list[np.ndarray] = []
        fn = jax.jit(hidden_at, static_argnames=("cfg", "layer"))
        for start in range(0, len(examples), chunk):
            part = list(examples[start:start + chunk])
            batch = data_lib.pack(part + [None] * (chunk - len(part)), train_cfg.max_seq_len, pad_id)
            h = fetch(fn(base, batch["tokens"], cfg=cfg, layer=layer))
            lengths = _scored_length(batch["loss_mask"])
            for r in range(len(part) * self.per_row):
                self.rows_of.append(h[r, : lengths[r]])

    def rows(self, idx: np.ndarray, T: int) -> np.ndarray:
        out = np.zeros((len(idx) * self.per_row, T, self.dim), self.dtype)
        for i, e in enumerate(idx):
            if e < 0:
                continue
            for j in range(self.per_row):
                h = self.rows_of[e * self.per_row + j]
                out[i * self.per_row + j, : len(h)] = h[:T]
        return out


def _scored_length(loss_mask: np.ndarray) -> np.ndarray:
    """Per row, one past its last scored position (0 for a row without any)."""
    m = np.asarray(loss_mask) > 0
    last = m.shape[1] - np.argmax(m[:, ::-1], axis=1)
    return np.where(m.any(axis=1), last, 0)


def reference_logps(base: Params, adapter: Params | None, examples: Sequence[DPOExample], cfg: ModelConfig,
                    train_cfg: TrainConfig, scale: float, mesh: Mesh | None = None,
                    pad_id: int = 0) -> np.ndarray:
    """Summed completion log-probs ``[N, 2]`` (chosen, rejected) of every pair under the reference
    policy (``adapter=None``: the base model). Runs once, without gradients, in batches of
    ``batch_size // grad_accum`` pairs."""
    rows = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
    out = np.zeros((len(examples), 2), np.float32)
    for start in range(0, len(examples), rows):
        chunk = list(examples[start:start + rows])
        batch = data_lib.pack_dpo(chunk + [None] * (rows - len(chunk)), train_cfg.max_seq_len, pad_id)
        lp = fetch(_batch_logps(base, adapter, _rows(batch, mesh), cfg=cfg, scale=scale)).reshape(rows, 2)
        out[start:start + len(chunk)] = lp[:len(chunk)]
    return out


# ----------------------------------------------------------------------------------------------
# held-out evaluation (no gradients)


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def _batch_sft_sums(base: Params, adapter: Params | None, rows: dict, *, cfg: ModelConfig, scale: float) -> jax.Array:
    """[summed weighted NLL, summed weighted correct tokens, token weight] of one SFT batch."""
    loss, m = sft_loss(*_scored_logits(base, adapter, rows, cfg, scale))
    n = m["n_tokens"]
    return jnp.stack([loss * n, m["accuracy"] * n, n])


def _sft_heldout(base: Params, adapter: Params | None, examples: Sequence[SFTExample], cfg: ModelConfig,
                 train_cfg: TrainConfig, scale: float, mesh: Mesh | None, pad_id: int) -> dict[str, float]:
    rows = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
    sums = np.zeros(3, np.float64)
    for start in range(0, len(examples), rows):
        chunk = list(examples[start:start + rows])
        batch = data_lib.pack_sft(chunk + [None] * (rows - len(chunk)), train_cfg.max_seq_len, pad_id)
        sums += fetch(_batch_sft_sums(base, adapter, _rows(batch, mesh), cfg=cfg, scale=scale)).astype(np.float64)
    n = max(sums[2], 1e-8)
    return {"loss": float(sums[0] / n), "accuracy": float(sums[1] / n), "n_tokens": float(sums[2])}


@functools.partial(jax.jit, static_argnames=("sc",))
def _dpo_metrics(policy: jax.Array, ref: jax.Array, weights: jax.Array, *, sc: _StepCfg) -> Metrics:
    _, m = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=sc.dpo_beta, loss_type=sc.dpo_loss,
                    label_smoothing=sc.label_smoothing, weights=weights)
    return m


def heldout_metrics(kind: str, base: Params, adapter: Params | None, examples: Sequence[Any],
                    cfg: ModelConfig, train_cfg: TrainConfig, scale: float, mesh: Mesh | None = None,
                    pad_id: int = 0, ref_logps: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of ``adapter`` on a held-out set, without gradients (jitted, in batches of
    ``batch_size // grad_accum`` like :func:`reference_logps`).

    ``kind="sft"``: ``loss`` (token-weighted mean cross-entropy over completion tokens, example
    weights included, as the SFT step normalises it) and token ``accuracy``. ``kind="dpo"``:
    the pair-weighted mean DPO ``loss`` and the TRL metrics ``rewards/accuracies``,
    ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``,
    ``logps/rejected``; ``ref_logps`` [N, 2] are the pairs' reference log-probs
    (:func:`reference_logps` of the training reference).
    """
    if kind == "sft":
        return _sft_heldout(base, adapter, examples, cfg, train_cfg, scale, mesh, pad_id)
    if kind != "dpo":
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
    if ref_logps is None:
        raise ValueError("held-out DPO metrics need the reference log-probs (ref_logps)")
    policy = reference_logps(base, adapter, examples, cfg, train_cfg, scale, mesh, pad_id)
    weights = np.asarray([float(ex.weight) for ex in examples], np.float32)
    m = _dpo_metrics(jnp.asarray(policy), jnp.asarray(ref_logps, jnp.float32), jnp.asarray(weights),
                     sc=_StepCfg.of(train_cfg))
    return {k: float(v) for k, v in fetch(m).items()}


# ----------------------------------------------------------------------------------------------
# sharding + host-side runner


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for a TrainState: the adapter by the LoRA rules, optimizer moments like the
    adapter leaf they mirror (matched by key-path suffix and shape), everything else replicated."""
    rep = NamedSharding(mesh, P())
    ad_sh = param_shardings(state.adapter, mesh, lora=True)
    by_name = {name: (sh, tuple(np.shape(leaf))) for (name, sh), (_, leaf) in
               zip(flatten_named(ad_sh)[0], flatten_named(state.adapter)[0])}

    def opt_leaf(path: Any, leaf: Any) -> NamedSharding:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for ad_name, (sh, shape) in by_name.items():
            if (name == ad_name or name.endswith("/" + ad_name)) and tuple(np.shape(leaf)) == shape:
                return sh
        return rep

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state)
    return TrainState(step=rep, adapter=ad_sh, opt_state=opt_sh)


def _batch_shardings(kind: str, rows: int, mesh: Mesh, keys: Sequence[str] = ("tokens", "targets", "loss_mask")) -> tuple:
    rows2 = 2 * rows if kind == "dpo" else rows
    b = {k: batch_sharding(mesh, 3 if k == "hidden" else 2, (rows2, 1, 1)[: 3 if k == "hidden" else 2])
         for k in ROW_KEYS if k in keys}
    b["weights"] = batch_sharding(mesh, 1, (rows,))
    if kind == "dpo":
        return b, batch_sharding(mesh, 1, (rows2,))
    return (b,)


@functools.lru_cache(maxsize=32)
def _compiled(kind: str, cfg: ModelConfig, lora_cfg: LoraConfig, sc: _StepCfg, batch_size: int,
              update: optax.TransformUpdateFn, abstract_state: Any, mesh: Mesh | None, donate: bool,
              keys: tuple[str, ...] = ("tokens", "targets", "loss_mask")) -> Any:
    """The jitted (and, with a mesh, sharded) step; cached so stages/roles share compilations."""
    fn = _sft_step if kind == "sft" else _dpo_step
    part = functools.partial(fn, cfg=cfg, sc=sc, update=update, scale=lora_scale(lora_cfg))
    donate_argnums = (1,) if donate else ()
    if mesh is None:
        return jax.jit(part, donate_argnums=donate_argnums)
    base_abs = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    st_sh = state_shardings(abstract_state.tree, mesh)
    in_sh = (param_shardings(base_abs, mesh), st_sh, *_batch_shardings(kind, batch_size, mesh, keys))
    return jax.jit(part, in_shardings=in_sh, out_shardings=(st_sh, NamedSharding(mesh, P())),
                   donate_argnums=donate_argnums)


class _Hashable:
    """Wraps an abstract pytree so it can key an lru_cache (by structure, shapes and dtypes)."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashable) and self._key == other._key


class Stepper:
    """A compiled (optionally sharded) SFT or DPO step plus the host-side NaN/Inf guard.

    ``stepper(base, state, batch[, ref_logps]) -> (state, metrics as Python floats)``; raises
    :class:`NonFiniteError` (naming ``role``, the stage and the step) instead of returning a
    non-finite update. With ``mesh``, inputs are placed on it (base/state should already be
    sharded as :func:`state_shardings` / ``param_shardings`` say, e.g. via :meth:`place`).
    """

    def __init__(self, kind: str, cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
                 optimizer: optax.GradientTransformation, mesh: Mesh | None = None, role: str = "role",
                 donate: bool = False):
        if kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
        if train_cfg.batch_size % max(train_cfg.grad_accum, 1):
            raise ValueError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                             f"train.grad_accum={train_cfg.grad_accum} (batch_size counts examples per update)")
        self.kind, self.role, self.mesh, self.optimizer = kind, role, mesh, optimizer
        self.cfg, self.lora_cfg, self.train_cfg = cfg, lora_cfg, train_cfg
        ad_abs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), adapter_shapes(cfg, lora_cfg),
                              is_leaf=lambda t: isinstance(t, tuple))
        self._state_abs = _Hashable(jax.eval_shape(lambda a: TrainState.create(a, optimizer), ad_abs))
        self._donate = donate

    def place(self, base: Params, state: TrainState) -> tuple[Params, TrainState]:
        """Puts base params and state on the mesh with the step's shardings (without a mesh: on
        the default device, committed, so fresh and restored states hit the same compilation)."""
        if self.mesh is None:
            dev = jax.devices()[0]
            return jax.device_put(base, dev), jax.device_put(state, dev)
        return put(base, param_shardings(base, self.mesh)), put(state, state_shardings(state, self.mesh))

    def _step_and_args(self, batch: dict, ref_logps: Any) -> tuple[Any, list[Any]]:
        if "comp_index" not in batch and isinstance(batch["loss_mask"], np.ndarray):
            # host batches only: a batch already placed as a global array (multi-host) may not be
            # fetchable here, and is scored at every position (the same losses)
            batch = dict(batch)
            batch["comp_index"], batch["comp_valid"] = data_lib.completion_index(batch["loss_mask"])
        keys = tuple(k for k in ROW_KEYS if k in batch)
        fn = _compiled(self.kind, self.cfg, self.lora_cfg, _StepCfg.of(self.train_cfg), self.train_cfg.batch_size,
                       self.optimizer.update, self._state_abs, self.mesh, self._donate, keys)
        args: list[Any] = [batch] if self.kind == "sft" else [batch, ref_logps]
        if self.mesh is not None:
            args = [put(a, s) for a, s in zip(args, _batch_shardings(
                self.kind, self.train_cfg.batch_size, self.mesh, keys))]
        return fn, args

    def lower(self, base: Params, state: TrainState, batch: dict, ref_logps: Any = None) -> Any:
        """The step lowered for these inputs (``jax.stages.Lowered``: ``.compile()``,
        ``.as_text()``, shardings, memory analysis), exactly as :meth:`__call__` runs it."""
        fn, args = self._step_and_args(batch, ref_logps)
        with mesh_context(self.mesh):
            return fn.lower(base, state, *args)

    def __call__(self, base: Params, state: TrainState, batch: dict,
                 ref_logps: Any = None) -> tuple[TrainState, dict[str, float]]:
        """One update. ``batch``: ``data.pack_*`` output, optionally with the ``ROW_KEYS`` extras
        (``comp_index``/``comp_valid`` are added here to a host batch that lacks them)."""
        fn, args = self._step_and_args(batch, ref_logps)
        step = int(fetch(state.step))
        with mesh_context(self.mesh):  # the model's activation constraints follow the mesh
            new_state, metrics = fn(base, state, *args)
        host = {k: float(v) for k, v in fetch(metrics).items()}
        if not host.pop("finite"):
            raise NonFiniteError(
                f"role {self.role!r}: non-finite {self.kind.upper()} loss at step {step} "
                f"(loss={host['loss']}, grad_norm={host['grad_norm']}); the update was NOT applied and the "
                "last checkpoint is intact. Lower the learning rate or check the batch for bad values.",
                state=new_state, metrics=host)
        return new_state, host


# ----------------------------------------------------------------------------------------------
# the driver


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:12]


def _n_tokens(examples: Sequence[Any], max_len: int) -> int:
    n = 0
    for ex in examples:
        if ex is None:
            continue
        if isinstance(ex, DPOExample):
            n += min(len(ex.prompt) + len(ex.chosen), max_len) + min(len(ex.prompt) + len(ex.rejected), max_len)
        else:
            n += min(len(ex.prompt) + len(ex.completion), max_len)
    return n


@dataclasses.dataclass
class _Stage:
    name: str
    examples: list
    heldout: list
    epochs: int  # the maximum
    learning_rate: float

    def steps_per_epoch(self, batch_size: int) -> int:
        return data_lib.num_batches(len(self.examples), batch_size)

    def total(self, batch_size: int) -> int:
        return self.epochs * self.steps_per_epoch(batch_size) if self.examples else 0


@dataclasses.dataclass
class RoleTraining:
    """What :func:`train_role` returns.

    Attributes:
      adapter: the final adapter (the selected DPO adapter, or the selected SFT adapter when no
        DPO stage ran; the fresh adapter, equal to the base model, when nothing was trained).
      sft_adapter: the selected SFT adapter (the initial adapter if no SFT stage ran).
      history: one dict of float metrics per optimizer step (plus ``stage``, ``step`` = the
        stage's update count, ``epoch`` = 0-based epoch of the step, ``tokens_per_s``).
      epochs: one dict per (stage, epoch) in run order, epoch 0 = before the first update:
        ``stage``, ``epoch`` (epochs completed), ``step``, ``learning_rate`` (of the epoch's last
        update), ``train/loss`` (mean over the epoch's steps), held-out ``heldout/loss`` and
        ``heldout/accuracy`` (SFT) or ``heldout/rewards/{accuracies,margins,chosen,rejected}``
        (DPO), for DPO also ``train/rewards/{accuracies,margins}``; ``None`` where not measured
        (epoch 0's train values, held-out values without a held-out set); ``best`` marks the
        epoch whose adapter the stage returned.
      trained: False when no stage ran (no data): the adapter then equals the base model.
      counts: ``{"sft", "sft_heldout", "dpo", "dpo_heldout"}`` example / pair counts.
    """

    adapter: Params
    sft_adapter: Params
    history: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    trained: bool
    counts: dict[str, int]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _better(loss: float | None, best: float | None) -> bool:
    """Strictly better held-out loss (ties keep the earlier epoch; NaN never wins over a number)."""
    if best is None:
        return True
    if loss is None or not math.isfinite(loss):
        return False
    return not math.isfinite(best) or loss < best


def train_role(
    base: Params,
    cfg: ModelConfig,
    lora_cfg: LoraConfig,
    train_cfg: TrainConfig,
    sft_examples: Sequence[SFTExample] | None,
    dpo_examples: Sequence[DPOExample] | None,
    role: str,
    ckpt_dir: str | Path,
    mesh: Mesh | None = None,
    progress: bool = True,
    *,
    pad_id: int = 0,
    stop_after_steps: int | None = None,
    sft_heldout: Sequence[SFTExample] | None = None,
    dpo_heldout: Sequence[DPOExample] | None = None,
) -> RoleTraining:
    """Trains one role's adapter: up to ``sft_epochs`` of SFT, then up to ``dpo_epochs`` of DPO.

    Epoch selection: with a held-out set for a stage (``sft_heldout`` / ``dpo_heldout``; split by
    question by the caller, so no prompt is shared with the training examples), the held-out
    set is evaluated without gradients before the first update (epoch 0) and after every epoch
    (:func:`heldout_metrics`); the stage returns the adapter of its best epoch by held-out loss
    (SFT cross-entropy / DPO loss; ties -> the earlier epoch; epoch 0 -> the adapter the stage
    started from) and stops after ``early_stop_patience`` epochs without improvement (0 = run
    every epoch). DPO starts from the selected SFT adapter, and its held-out reference log-probs
    come from the same reference as training. Without a held-out set every epoch runs and the
    last adapter is kept. The learning-rate schedule always spans the maximum epochs.

    A stage without data is skipped with a log message; a role with neither SFT examples nor
    DPO pairs is not trained at all: a WARNING says it keeps the base model and the fresh
    adapter (LoRA ``b = 0``, i.e. exactly the base model) is returned with ``trained=False``.

    Checkpoints (``ckpt_dir``) are written every ``checkpoint_every`` steps and at the end of
    each stage; they hold the training state, the stage's best adapter so far, the epoch records
    and the patience counter (and for DPO the selected SFT adapter and the reference log-probs),
    so that a rerun on a directory holding a checkpoint of this role resumes exactly.
    ``stop_after_steps`` stops after that many updates in this call without saving (simulates a
    preemption; for tests).

    Returns:
      :class:`RoleTraining`.
    Raises:
      NonFiniteError on NaN/Inf; ValueError for a checkpoint that cannot be resumed exactly.
    """
    from tqdm.auto import tqdm

    sft, dpo = list(sft_examples or []), list(dpo_examples or [])
    sft_ho, dpo_ho = list(sft_heldout or []), list(dpo_heldout or [])
    counts = {"sft": len(sft), "sft_heldout": len(sft_ho), "dpo": len(dpo), "dpo_heldout": len(dpo_ho)}
    key = jax.random.fold_in(jax.random.key(train_cfg.seed), zlib.crc32(role.encode()) & 0x7FFFFFFF)
    adapter = init_lora(cfg, lora_cfg, key)  # b = 0: equals the base model
    if not sft and not dpo:
        log.warning(
            "role %r: no positive trajectories (0 SFT examples) and no DPO pairs, so there is nothing to "
            "train on: it keeps the base model (untrained adapter). To train it, make the task easier, use "
            "more training questions, or draw more samples per question (larger tree n/m/l or a higher "
            "temperature).", role)
        return RoleTraining(adapter=adapter, sft_adapter=adapter, history=[], epochs=[], trained=False,
                            counts=counts)
    B = train_cfg.batch_size
    scale = lora_scale(lora_cfg)
    patience = int(train_cfg.early_stop_patience)
    stages = [_Stage("sft", sft, sft_ho, train_cfg.sft_epochs, train_cfg.learning_rate),
              _Stage("dpo", dpo, dpo_ho, train_cfg.dpo_epochs, train_cfg.dpo_learning_rate)]
    trained = any(st.total(B) > 0 for st in stages)
    base = put(base, param_shardings(base, mesh) if mesh is not None else jax.devices()[0])
    sft_adapter = adapter
    common_meta = {"role": role, "model_hash": _hash(cfg), "lora": to_dict(lora_cfg),
                   "train_hash": _hash(train_cfg)}

    ckpt = Checkpointer(ckpt_dir)
    history: list[dict[str, Any]] = []
    epochs_log: list[dict[str, Any]] = []
    global_step, resume_stage, resume_step = 0, 0, 0
    meta: dict | None = None
    if ckpt.latest_step() is not None:
        meta = ckpt.metadata()
        if meta.get("role") != role:
            raise ValueError(f"{ckpt_dir}: checkpoint belongs to role {meta.get('role')!r}, not {role!r}")
        if "epochs" not in meta:
            raise ValueError(f"{ckpt_dir}: checkpoint was written by an older malt-jax (no epoch records); "
                             "it cannot be resumed. Use a fresh checkpoint directory.")
        resume_stage = [s.name for s in stages].index(meta["stage"])
        resume_step = int(meta["stage_step"])
        global_step = int(meta["global_step"])
        history = list(meta.get("history", []))
        epochs_log = [dict(r) for r in meta["epochs"]]
        st = stages[resume_stage]
        if (meta["n_examples"] != len(st.examples) or meta["stage_total"] != st.total(B)
                or meta.get("n_heldout", 0) != len(st.heldout)):
            raise ValueError(
                f"{ckpt_dir}: the checkpoint's {st.name} stage had {meta['n_examples']} examples / "
                f"{meta.get('n_heldout', 0)} held-out / {meta['stage_total']} steps, now {len(st.examples)} / "
                f"{len(st.heldout)} / {st.total(B)}; it cannot be resumed exactly. Use a fresh checkpoint "
                "directory.")
        log.info("%s: resuming %s at step %d/%d from %s", role, st.name, resume_step, st.total(B), ckpt_dir)

    def interrupted() -> RoleTraining:
        return RoleTraining(adapter=state.adapter, sft_adapter=sft_adapter, history=history,
                            epochs=epochs_log, trained=trained, counts=counts)

    steps_this_call = 0
    try:
        for si, st in enumerate(stages):
            if si < resume_stage:
                continue
            total = st.total(B)
            if total == 0:
                log.warning("%s: skipping %s stage (%s)", role, st.name,
                            "no examples" if not st.examples else f"{st.name}_epochs = 0")
                continue
            optimizer = make_optimizer(train_cfg, total, st.learning_rate)
            stepper = Stepper(st.name, cfg, lora_cfg, train_cfg, optimizer, mesh=mesh, role=role, donate=False)
            _, state = stepper.place({}, TrainState.create(adapter, optimizer))
            ref = ho_ref = None
            best, best_epoch, best_loss, bad, done = state.adapter, 0, None, 0, False
            start = 0
            if meta is not None and si == resume_stage:
                target: dict[str, Any] = {"state": state, "best_adapter": state.adapter}
                if st.name == "dpo":
                    target["sft_adapter"] = state.adapter
                    target["ref_logps"] = np.zeros((len(st.examples), 2), np.float32)
                    if st.heldout:
                        target["heldout_ref_logps"] = np.zeros((len(st.heldout), 2), np.float32)
                sh = None
                if mesh is not None:
                    st_sh = state_shardings(state, mesh)
                    sh = {"state": st_sh, "best_adapter": st_sh.adapter}
                    if st.name == "dpo":
                        sh["sft_adapter"] = st_sh.adapter
                        sh["ref_logps"] = NamedSharding(mesh, P())
                        if st.heldout:
                            sh["heldout_ref_logps"] = NamedSharding(mesh, P())
                restored, _ = ckpt.restore(target, step=global_step, shardings=sh)  # checks shapes
                if meta.get("model_hash", common_meta["model_hash"]) != common_meta["model_hash"]:
                    raise ValueError(f"{ckpt_dir}: checkpoint was trained on another model config (hash "
                                     f"{meta.get('model_hash')}, this model is {common_meta['model_hash']}); "
                                     "use a fresh checkpoint directory")
                state, best = restored["state"], restored["best_adapter"]
                if st.name == "dpo":
                    sft_adapter = restored["sft_adapter"]
                    ref = fetch(restored["ref_logps"])
                    if st.heldout:
                        ho_ref = fetch(restored["heldout_ref_logps"])
                start = resume_step
                best_epoch, best_loss = int(meta["best_epoch"]), meta["best_loss"]
                bad, done = int(meta["bad_epochs"]), bool(meta["stage_done"])
            if st.name == "dpo" and ref is None:
                ref_adapter = None if train_cfg.dpo_reference == "base" else state.adapter
                ref = reference_logps(base, ref_adapter, st.examples, cfg, train_cfg, scale, mesh, pad_id)
                if st.heldout:
                    ho_ref = reference_logps(base, ref_adapter, st.heldout, cfg, train_cfg, scale, mesh, pad_id)

            def end_of_epoch(e: int, k: int) -> None:
                """Epoch record (held-out metrics of the current adapter), best adapter, patience."""
                nonlocal best, best_epoch, best_loss, bad, done
                steps = [h for h in history if h["stage"] == st.name and h["epoch"] == e - 1] if e else []
                rec: dict[str, Any] = {"stage": st.name, "epoch": e, "step": k,
                                       "learning_rate": steps[-1]["learning_rate"] if steps else None,
                                       "train/loss": _mean([h["loss"] for h in steps])}
                names = (("loss", "accuracy") if st.name == "sft" else
                         ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"))
                if st.name == "dpo":
                    for n in ("rewards/accuracies", "rewards/margins"):
                        rec[f"train/{n}"] = _mean([h[n] for h in steps])
                hm = (heldout_metrics(st.name, base, state.adapter, st.heldout, cfg, train_cfg, scale, mesh,
                                      pad_id, ref_logps=ho_ref) if st.heldout else {})
                for n in names:
                    rec[f"heldout/{n}"] = hm.get(n)
                if not st.heldout:
                    best, best_epoch = state.adapter, e  # all epochs run, the last one is kept
                elif _better(rec["heldout/loss"], best_loss):
                    best, best_epoch, best_loss, bad = state.adapter, e, rec["heldout/loss"], 0
                else:
                    bad += 1
                    done = patience > 0 and bad >= patience
                epochs_log.append(rec)
                for r in epochs_log:
                    if r["stage"] == st.name:
                        r["best"] = r["epoch"] == best_epoch
                log.info("%s/%s epoch %d: train loss %s, held-out loss %s%s", role, st.name, e,
                         "n/a" if rec["train/loss"] is None else f"{rec['train/loss']:.4f}",
                         "n/a" if rec["heldout/loss"] is None else f"{rec['heldout/loss']:.4f}",
                         f" (no improvement for {bad} epoch(s), stopping)" if done else "")

            spe = st.steps_per_epoch(B)
            k = start
            if k == 0:
                end_of_epoch(0, 0)
            # The layers below the adapter are frozen and do not depend on it: their output for
            # every training example is computed once per stage instead of at every step.
            first = cfg.n_layers - lora_cfg.top_layers if 0 < lora_cfg.top_layers < cfg.n_layers else 0
            frozen = HiddenCache(base, st.examples, cfg, train_cfg, first, pad_id) if first and k < total and not done \
                else None
            bar = tqdm(total=total, initial=k, desc=f"{role}/{st.name}", disable=not progress)
            try:
                while k < total and not done:
                    epoch, b0 = divmod(k, spe)
                    for _, idx, batch in data_lib.batches(st.examples, B, train_cfg.max_seq_len, train_cfg.seed,
                                                          epoch, start=b0, pad_id=pad_id):
                        if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                            return interrupted()
                        t0 = time.perf_counter()
                        if frozen is not None:
                            batch = {**batch, "hidden": frozen.rows(idx, batch["tokens"].shape[1])}
                        if st.name == "dpo":
                            # reference log-probs of this batch's pairs, interleaved like its rows
                            r = np.where((idx >= 0)[:, None], ref[np.maximum(idx, 0)], 0.0).astype(np.float32)
                            state, m = stepper(base, state, batch, r.reshape(-1))
                        else:
                            state, m = stepper(base, state, batch)
                        dt = max(time.perf_counter() - t0, 1e-9)
                        exs = data_lib.gather(st.examples, idx)
                        k += 1
                        global_step += 1
                        steps_this_call += 1
                        m.update(stage=st.name, step=k, epoch=epoch,
                                 tokens_per_s=_n_tokens(exs, train_cfg.max_seq_len) / dt)
                        history.append(m)
                        bar.update(1)
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                        if k % spe == 0:
                            end_of_epoch(k // spe, k)
                        if k % max(train_cfg.checkpoint_every, 1) == 0 or k == total or done:
                            e2, b2 = divmod(k, spe)
                            tree: dict[str, Any] = {"state": state, "best_adapter": best}
                            if st.name == "dpo":
                                tree["sft_adapter"] = sft_adapter
                                tree["ref_logps"] = ref
                                if st.heldout:
                                    tree["heldout_ref_logps"] = ho_ref
                            ckpt.save(global_step, tree, {
                                **common_meta, "stage": st.name, "stage_step": k, "stage_total": total,
                                "epoch": e2, "batch_in_epoch": b2, "global_step": global_step,
                                "n_examples": len(st.examples), "n_heldout": len(st.heldout),
                                "history": history, "epochs": epochs_log, "best_epoch": best_epoch,
                                "best_loss": best_loss, "bad_epochs": bad, "stage_done": done or k == total})
                        if done:
                            break
            finally:
                bar.close()
            if st.heldout:
                log.info("%s/%s: selected epoch %d of %d run (held-out loss %.4f)", role, st.name, best_epoch,
                         k // spe, best_loss)
            adapter = best
            if st.name == "sft":
                sft_adapter = adapter
    finally:
        ckpt.close()
    return RoleTraining(adapter=adapter, sft_adapter=sft_adapter, history=history, epochs=epochs_log,
                        trained=trained, counts=counts)
