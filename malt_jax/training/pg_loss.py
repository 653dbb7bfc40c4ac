"""Clipped policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO) for one role's sampled completions.

Per completion token ``t`` of sequence ``b`` with advantage ``A_b`` (one per sequence, e.g. from
:func:`malt_jax.credit.advantages.tree_advantages`):

* ratio ``r = exp(logp - old_logp)`` (``old_logp``: the behaviour policy that sampled the tokens);
* clipped surrogate ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` (PPO; DAPO's
  "clip-higher" when ``clip_eps_high`` differs from ``clip_eps``);
* KL penalty to the reference policy with the k3 estimator
  ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, zero iff ``ref == logp``), weight ``kl_coef``.

Token values are aggregated to a scalar by ``loss_agg``:

* ``"token_mean"``: sum over all completion tokens of the batch / their number (DAPO; TRL "bnpo");
* ``"seq_mean"``: mean over each sequence's tokens, then mean over sequences (GRPO; TRL "grpo");
* ``"seq_sum_norm"``: sum over all completion tokens / (sequences * T) with ``T`` the padded
  length, a constant normaliser (Dr. GRPO; TRL "dr_grpo"): pad to the generation budget.

Rows without any completion token (batch padding) count in no average. The KL metric uses the
same aggregation as the loss, so ``loss == pg_loss + kl_coef * kl`` exactly.

Pure and ``jit``-able (the options are Python values: close over them or mark them static).
Inputs are upcast to float32 (float64 inputs stay float64, for gradient checks); masked
positions may hold any value (``-inf``, NaN): they are replaced before use, so they reach
neither the loss nor its gradient. Alignment as in :mod:`malt_jax.training.losses`:
``logp[b, t]`` is the log-probability of completion token ``t`` (see
:func:`~malt_jax.training.losses.token_logps`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["LOSS_AGGREGATIONS", "pg_loss", "token_entropy"]

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution at each position (computed in float32).

    Args:
        logits: Float[Array, "B T V"]
    Returns:
        Float32[Array, "B T"]; pass as ``pg_loss(..., entropy=...)`` to log the ``entropy`` metric.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def _positive(name: str, value: object, allow_zero: bool = False) -> None:
    """Checks a Python-number option (traced values are not checked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, jax.Array):
            return
        raise ValueError(f"pg_loss: {name} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"pg_loss: {name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def pg_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    mask: jax.Array,
    adv: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    loss_agg: str = "token_mean",
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss of one role over a batch of sampled completions.

    Args:
        logp:     Float[Array, "B T"] per-token log-probs under the current policy (differentiated).
        old_logp: Float[Array, "B T"] | None; the behaviour policy's log-probs (no gradient). None:
            on-policy, a single update per sample (``stop_gradient(logp)``, ratio 1).
        ref_logp: Float[Array, "B T"] | None; the reference policy's log-probs (no gradient). None:
            no KL term (``kl_coef`` must be 0) and no ``kl`` metric.
        mask:     Num[Array, "B T"], 1 on completion tokens, 0 on prompt / padding (fractional
            values act as token weights).
        adv:      Float[Array, "B"] per-sequence advantages (no gradient).
        clip_eps: > 0; the ratio is clipped to ``[1 - clip_eps, 1 + clip_eps_high]``.
        clip_eps_high: > 0 or None (= ``clip_eps``); DAPO's clip-higher, e.g. 0.28.
        kl_coef:  >= 0, weight of the k3 KL penalty (GRPO's beta).
        loss_agg: one of :data:`LOSS_AGGREGATIONS` (see the module docstring).
        entropy:  optional Float[Array, "B T"] per-token entropies (:func:`token_entropy`) for the
            ``entropy`` metric; the per-token log-probs alone do not determine it.
    Returns:
        (loss: Float32[], metrics) with TRL / Tunix names: ``loss``, ``pg_loss``, ``kl`` (with a
        reference), ``clip_ratio`` (share of completion tokens whose clipped branch is active,
        i.e. with zero gradient), ``clip_ratio/low_mean`` (r < 1 - eps_low and A < 0),
        ``clip_ratio/high_mean`` (r > 1 + eps_high and A > 0), ``completion_length`` (mean
        tokens per sequence), ``advantage_mean`` (per sequence) and ``entropy`` (when given).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"pg_loss: loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {loss_agg!r}")
    _positive("clip_eps", clip_eps)
    if clip_eps_high is not None:
        _positive("clip_eps_high", clip_eps_high)
    _positive("kl_coef", kl_coef, allow_zero=True)
    if ref_logp is None and (isinstance(kl_coef, jax.Array) or kl_coef != 0):
        raise ValueError(f"pg_loss: kl_coef={kl_coef!r} needs ref_logp (None given)")
    if logp.ndim != 2 or mask.shape != logp.shape:
        raise ValueError(f"pg_loss: logp and mask must both be [B, T], got {logp.shape} and {mask.shape}")
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy)):
        if other is not None and other.shape != logp.shape:
            raise ValueError(f"pg_loss: {name} shape {other.shape} != logp shape {logp.shape}")
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"pg_loss: adv must be [B] = {logp.shape[:1]}, got {adv.shape}")

    f32 = jnp.promote_types(logp.dtype, jnp.float32)  # bf16 -> float32; float64 stays
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    w = mask.astype(f32)
    valid = w > 0
    lp = jnp.where(valid, logp.astype(f32), 0.0)
    old = jax.lax.stop_gradient(lp if old_logp is None else jnp.where(valid, old_logp.astype(f32), 0.0))
    a = jax.lax.stop_gradient(adv.astype(f32))[:, None]

    lengths = w.sum(-1)  # [B]
    rows = lengths > 0
    n_rows = jnp.maximum(rows.sum().astype(f32), 1.0)
    n_tokens = jnp.maximum(w.sum(), 1e-8)

    def agg(x: jax.Array) -> jax.Array:
        xw = jnp.where(valid, x, 0.0) * w
        if loss_agg == "token_mean":
            return xw.sum() / n_tokens
        if loss_agg == "seq_mean":
            per_seq = xw.sum(-1) / jnp.maximum(lengths, 1e-8)
            return jnp.where(rows, per_seq, 0.0).sum() / n_rows
        return xw.sum() / (n_rows * logp.shape[1])  # seq_sum_norm

    def token_mean(x: jax.Array) -> jax.Array:
        return (jnp.where(valid, x, 0.0) * w).sum() / n_tokens

    ratio = jnp.exp(lp - old)
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a)
    pg = agg(-surrogate)
    loss = pg
    metrics: dict[str, jax.Array] = {}
    if ref_logp is not None:
        ref = jax.lax.stop_gradient(jnp.where(valid, ref_logp.astype(f32), 0.0))
        d = ref - lp
        kl = agg(jnp.exp(d) - d - 1.0)
        loss = pg + kl_coef * kl
        metrics["kl"] = kl

    ratio_ng = jax.lax.stop_gradient(ratio)
    low = ((ratio_ng < 1.0 - eps_low) & (a < 0)).astype(f32)
    high = ((ratio_ng > 1.0 + eps_high) & (a > 0)).astype(f32)
    metrics.update(
        {
            "loss": loss,
            "pg_loss": pg,
            "clip_ratio": token_mean(low + high),
            "clip_ratio/low_mean": token_mean(low),
            "clip_ratio/high_mean": token_mean(high),
            "completion_length": lengths.sum() / n_rows,
            "advantage_mean": jnp.where(rows, a[:, 0], 0.0).sum() / n_rows,
        }
    )
    if entropy is not None:
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy.astype(f32)))
    return loss, {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
