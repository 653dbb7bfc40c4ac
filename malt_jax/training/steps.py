"""The pure SFT and DPO update steps of one role's LoRA adapter (the Stepper jits them).

* The base model is frozen and passed to every step separately; only the adapter is
  differentiated and optimised. ``TrainState = (step, adapter, opt_state)``.
* One call is one optimizer update of ``batch_size`` examples (pairs for DPO). With
  ``grad_accum = A`` the batch is split into ``A`` microbatches that run sequentially under
  ``lax.scan`` and whose gradients are summed; losses are normalised by the *whole* batch's
  token count (SFT) or pair weight (DPO), so the accumulated step equals a step on the union batch.
* NaN/Inf guard: the update is applied only when loss and gradient norm are finite (``jnp.where``
  on the state); the metrics say ``finite``, and the host raises (``stepper.Stepper``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from malt_jax.config import LoraConfig, ModelConfig, TrainConfig
from malt_jax.model.llama import Params, causal_positions, forward, forward_from, lm_head, lora_first_layer
from malt_jax.model.lora import abstract_adapter
from malt_jax.training.losses import dpo_loss, sequence_logps, sft_loss
from malt_jax.training.optim import current_lr

__all__ = [
    "TrainState",
    "abstract_state",
    "ROW_KEYS",
    "SHARED_KEYS",
    "StepConfig",
    "scored_logits",
    "shared_scored_logits",
    "sft_step",
    "dpo_step",
]

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Trainable state of one role: update counter, LoRA adapter, optimizer state."""

    step: Any  # int32 [] (a ShapeDtypeStruct in abstract_state, a Sharding in stepper.state_shardings)
    adapter: Params
    opt_state: optax.OptState

    @classmethod
    def create(cls, adapter: Params, optimizer: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter))


def abstract_state(cfg: ModelConfig, lora_cfg: LoraConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState of a fresh adapter as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda a: TrainState.create(a, optimizer), abstract_adapter(cfg, lora_cfg))


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


class StepConfig(NamedTuple):
    """The few TrainConfig fields a compiled step depends on (its static jit key)."""

    grad_accum: int
    dpo_beta: float
    dpo_loss: str
    label_smoothing: float
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, t: TrainConfig) -> StepConfig:
        return cls(
            max(int(t.grad_accum), 1), float(t.dpo_beta), t.dpo_loss, float(t.label_smoothing), float(t.rpo_alpha)
        )


def _apply(
    state: TrainState, loss: jax.Array, metrics: Metrics, grads: Params, update: optax.TransformUpdateFn
) -> tuple[TrainState, Metrics]:
    """Optimizer update, applied only when loss and gradient norm are finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    new = TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "learning_rate": current_lr(opt_state),
    }
    return new, metrics


# Arrays of a batch with one entry per row: tokens / targets / loss_mask [R, T] (data.pack_*),
# optionally comp_index / comp_valid [R, C] (data.completion_index: only these positions are
# scored, so the LM head runs on the completion tokens alone) and hidden [R, T, dim] (the hidden
# states entering the adapter's first layer, precomputed once: the frozen layers below do not
# run at every step).
ROW_KEYS = ("tokens", "targets", "loss_mask", "comp_index", "comp_valid", "hidden")
# Arrays of a shared-prompt DPO batch (data.pack_dpo_shared), one entry per pair: tokens /
# positions / segments [B, T], score_index / score_targets / score_mask [B, 2, C], optionally
# hidden [B, T, dim] (as above, of the packed rows).
SHARED_KEYS = ("tokens", "positions", "segments", "score_index", "score_targets", "score_mask", "hidden")


# The attention's query blocks of the rows trained and scored here (``llama.attention``): every
# ``data.pack_*`` layout places a token's visible tokens at or before it, so block i needs only the
# keys up to its end. 4 blocks compute 5/8 of the dense scores (a 30-layer LoRA DPO step of
# bench/dpo_vs_trl.py's shapes 2-3 % faster; more blocks make the matmuls too small).
KEY_BLOCKS = 4


def _final_hidden(base: Params, adapter: Params | None, rows: dict, cfg: ModelConfig, scale: float) -> jax.Array:
    """Final hidden states [R, T, dim] of ``rows``: from the frozen layers' ``hidden`` when given,
    with the rows' ``positions`` / ``segments`` when given (shared-prompt rows), else causal."""
    B, T = rows["tokens"].shape
    pos, seg = rows.get("positions", causal_positions(B, T)), rows.get("segments")
    kw = dict(lora=adapter, lora_scale=scale, positions=pos, segments=seg, key_blocks=KEY_BLOCKS)
    if "hidden" in rows:
        return forward_from(base, rows["hidden"], cfg, lora_first_layer(cfg, adapter), **kw)
    x, _ = forward(base, rows["tokens"], cfg=cfg, return_hidden=True, **kw)
    return x


def scored_logits(
    base: Params, adapter: Params | None, rows: dict, cfg: ModelConfig, scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits, targets, mask) at the scored positions of ``rows`` (see ``ROW_KEYS``): every
    position, or the completion positions ``comp_index`` (same losses: the others have mask 0)."""
    x = _final_hidden(base, adapter, rows, cfg, scale)
    targets, mask = rows["targets"], rows["loss_mask"]
    if "comp_index" in rows:
        idx = rows["comp_index"]
        x = jnp.take_along_axis(x, idx[..., None], axis=1)
        targets = jnp.take_along_axis(targets, idx, axis=1)
        mask = jnp.take_along_axis(mask, idx, axis=1) * rows["comp_valid"]
    return lm_head(base, x, cfg), targets, mask


def shared_scored_logits(
    base: Params, adapter: Params | None, rows: dict, cfg: ModelConfig, scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [2b, C, V], targets [2b, C], mask [2b, C]) of ``b`` shared-prompt pair rows (see
    ``SHARED_KEYS``); rows ``2i`` / ``2i + 1`` score pair ``i``'s chosen / rejected completion,
    as ``scored_logits`` does for ``data.pack_dpo``'s interleaved rows."""
    b = rows["tokens"].shape[0]
    x = _final_hidden(base, adapter, rows, cfg, scale)
    x = jnp.take_along_axis(x, rows["score_index"].reshape(b, -1)[..., None], axis=1)
    x = x.reshape(2 * b, -1, x.shape[-1])
    return lm_head(base, x, cfg), rows["score_targets"].reshape(2 * b, -1), rows["score_mask"].reshape(2 * b, -1)


def _sft_micro(
    adapter: Params, mb: dict, *, base: Params, total: jax.Array, cfg: ModelConfig, scale: float
) -> tuple[jax.Array, Metrics]:
    logits, targets, mask = scored_logits(base, adapter, mb, cfg, scale)
    loss, m = sft_loss(logits, targets, mask)
    frac = m["n_tokens"] / total  # re-weights the microbatch mean into the whole-batch mean
    return loss * frac, {"accuracy": m["accuracy"] * frac, "n_tokens": m["n_tokens"]}


def sft_step(
    base: Params,
    state: TrainState,
    batch: dict,
    *,
    cfg: ModelConfig,
    sc: StepConfig,
    update: optax.TransformUpdateFn,
    scale: float,
) -> tuple[TrainState, Metrics]:
    """One SFT update: masked next-token cross-entropy on the completion tokens.

    Args:
      base: frozen base params (never differentiated).
      state: the role's TrainState.
      batch: ``data.pack_sft`` output (tokens/targets int32[B, T], loss_mask f32[B, T], weights
        f32[B]), optionally with the ``ROW_KEYS`` extras.
      sc: the step's static config; update: the optimizer's update function; scale: LoRA scale.
    Returns:
      (new state, unchanged if the loss or gradient norm is non-finite; metrics: loss, accuracy,
      n_tokens, grad_norm, learning_rate, finite).
    """
    total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1e-8)
    mb = {k: batch[k] for k in ROW_KEYS if k in batch}
    loss_fn = functools.partial(_sft_micro, base=base, total=total, cfg=cfg, scale=scale)
    loss, metrics, grads = _accumulate(loss_fn, state.adapter, mb, sc.grad_accum)
    return _apply(state, loss, metrics, grads, update)


def _pairs(batch: dict, ref_logps: jax.Array) -> dict:
    """Interleaved [2B, ...] rows -> [B, 2, ...] pairs (so microbatching keeps pairs whole);
    a shared-prompt batch has one row per pair already."""
    B = batch["weights"].shape[0]
    if "segments" in batch:
        out = {k: batch[k] for k in SHARED_KEYS if k in batch}
    else:
        out = {k: batch[k].reshape(B, 2, *batch[k].shape[1:]) for k in ROW_KEYS if k in batch}
    out["weights"] = batch["weights"]
    out["ref"] = ref_logps.reshape(B, 2)
    return out


def _dpo_micro(
    adapter: Params, mb: dict, *, base: Params, total: jax.Array, cfg: ModelConfig, scale: float, sc: StepConfig
) -> tuple[jax.Array, Metrics]:
    b = mb["tokens"].shape[0]
    if "segments" in mb:
        scored = shared_scored_logits(base, adapter, mb, cfg, scale)
    else:
        rows = {k: mb[k].reshape(2 * b, *mb[k].shape[2:]) for k in ROW_KEYS if k in mb}
        scored = scored_logits(base, adapter, rows, cfg, scale)
    lp = sequence_logps(*scored).reshape(b, 2)
    n_tokens = scored[2].astype(jnp.float32).sum(axis=-1).reshape(b, 2)
    w = mb["weights"].astype(jnp.float32)
    loss, m = dpo_loss(
        lp[:, 0],
        lp[:, 1],
        mb["ref"][:, 0],
        mb["ref"][:, 1],
        beta=sc.dpo_beta,
        loss_type=sc.dpo_loss,
        label_smoothing=sc.label_smoothing,
        weights=w,
        rpo_alpha=sc.rpo_alpha,
        chosen_tokens=n_tokens[:, 0],
    )
    frac = w.sum() / total
    m = {k: v * frac for k, v in m.items() if k != "loss"}
    return loss * frac, m


def dpo_step(
    base: Params,
    state: TrainState,
    batch: dict,
    ref_logps: jax.Array,
    *,
    cfg: ModelConfig,
    sc: StepConfig,
    update: optax.TransformUpdateFn,
    scale: float,
) -> tuple[TrainState, Metrics]:
    """One DPO update (``sc.dpo_loss``, ``beta = sc.dpo_beta``).

    Args:
      batch: ``data.pack_dpo`` output (interleaved chosen/rejected rows [2B, T], weights [B]),
        or ``data.pack_dpo_shared`` output (one row per pair, the prompt once; same losses).
      ref_logps: f32[2B] reference log-probs of the chosen/rejected completions, interleaved
        (``scoring.reference_logps``).
    Returns:
      (new state, metrics with TRL names: loss, rewards/chosen, rewards/rejected,
      rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, grad_norm, ...).
    """
    total = jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1e-8)
    loss_fn = functools.partial(_dpo_micro, base=base, total=total, cfg=cfg, scale=scale, sc=sc)
    loss, metrics, grads = _accumulate(loss_fn, state.adapter, _pairs(batch, ref_logps), sc.grad_accum)
    return _apply(state, loss, metrics, grads, update)
