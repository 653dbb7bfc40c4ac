"""Training losses: masked SFT cross-entropy and DPO (sigmoid / IPO) as TRL defines them.

All functions are pure and ``jit``-able; every loss returns ``(loss, metrics)`` where ``metrics``
is a flat dict of float32 scalars. Log-probabilities are computed in float32 whatever the
logits dtype (bf16 logits are upcast before the log-softmax).

Alignment convention: ``targets[b, t]`` is the token that ``logits[b, t]`` predicts, i.e. the
caller has already shifted (``targets = tokens[:, 1:]``, ``logits = model(tokens)[:, :-1]``).
``loss_mask[b, t]`` is 1 for completion tokens that count and 0 for prompt / padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_logps", "sequence_logps", "sft_loss", "dpo_loss", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of each target token.

    Args:
        logits:  Float[Array, "B T V"] (any float dtype; computed in float32)
        targets: Int[Array, "B T"]
    Returns:
        Float32[Array, "B T"]
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logps(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Sum of completion-token log-probabilities per sequence.

    Args:
        logits: Float[Array, "B T V"]; targets: Int[Array, "B T"]; loss_mask: Num[Array, "B T"]
    Returns:
        Float32[Array, "B"]
    """
    lp = token_logps(logits, targets)
    return jnp.sum(jnp.where(loss_mask > 0, lp, 0.0) * loss_mask.astype(jnp.float32), axis=-1)


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy, mean over counted (completion) tokens.

    Args:
        logits: Float[Array, "B T V"]; targets: Int[Array, "B T"];
        loss_mask: Num[Array, "B T"] (1 = completion token that counts, 0 = prompt / padding;
            fractional values act as token weights).
    Returns:
        (loss: Float32[], metrics: {"loss", "n_tokens", "accuracy"})
    """
    w = loss_mask.astype(jnp.float32)
    lp = token_logps(logits, targets)
    # ``where`` so that non-finite values at masked positions cannot leak in as 0 * inf = nan.
    nll = jnp.where(w > 0, -lp, 0.0) * w
    n_tokens = w.sum()
    denom = jnp.maximum(n_tokens, 1e-8)
    loss = nll.sum() / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    accuracy = (correct * w).sum() / denom
    return loss, {"loss": loss, "n_tokens": n_tokens, "accuracy": accuracy}


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.2,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
    rpo_alpha: float = 0.0,
    chosen_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO loss exactly as TRL's ``DPOTrainer.dpo_loss`` (``sigmoid`` and ``ipo``).

    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``;
    sigmoid: ``-logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps``;
    ipo: ``(logits - 1 / (2 * beta)) ** 2`` (label smoothing ignored, as in TRL).

    Args:
        *_logps: Float[Array, "B"] summed completion log-probabilities.
        weights: optional Num[Array, "B"]; per-example weight (0 for padding rows). Loss and
            metrics are weight-averaged; without it a plain mean.
        rpo_alpha: weight of the chosen completions' negative log-likelihood added to the loss
            (TRL's ``rpo_alpha``, RPO: arXiv 2404.19733), per pair normalised by its
            ``chosen_tokens`` (Num[Array, "B"], required when ``rpo_alpha > 0``); it keeps DPO
            from lowering the chosen answers' likelihood along with the rejected ones'.
    Returns:
        (loss: Float32[], metrics) with TRL names "rewards/chosen", "rewards/rejected",
        "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "loss"
        (and "nll_loss" with ``rpo_alpha > 0``).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    f32 = jnp.float32
    pc, pr = policy_chosen_logps.astype(f32), policy_rejected_logps.astype(f32)
    rc, rr = ref_chosen_logps.astype(f32), ref_rejected_logps.astype(f32)
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = (
            -jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
        )
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))

    w = jnp.ones_like(losses) if weights is None else weights.astype(f32)
    denom = jnp.maximum(w.sum(), 1e-8)

    def wmean(x: jax.Array) -> jax.Array:
        return (jnp.where(w > 0, x, 0.0) * w).sum() / denom

    loss = wmean(losses)
    extra = {}
    if rpo_alpha > 0:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: rpo_alpha > 0 needs chosen_tokens (the chosen completions' token counts)")
        nll = wmean(-pc / jnp.maximum(chosen_tokens.astype(f32), 1.0))
        loss = loss + rpo_alpha * nll
        extra["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics = {
        "loss": loss,
        "rewards/chosen": wmean(chosen_rewards),
        "rewards/rejected": wmean(rejected_rewards),
        "rewards/accuracies": wmean((chosen_rewards > rejected_rewards).astype(f32)),
        "rewards/margins": wmean(chosen_rewards - rejected_rewards),
        "logps/chosen": wmean(jax.lax.stop_gradient(pc)),
        "logps/rejected": wmean(jax.lax.stop_gradient(pr)),
        **extra,
    }
    return loss, metrics
