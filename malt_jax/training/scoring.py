"""Gradient-free passes of one role's model over a dataset, in jitted batches of ``batch_size //
grad_accum`` rows: the DPO reference log-probs (:func:`reference_logps`), held-out metrics for
epoch selection (:func:`heldout_metrics`), and the hidden states of the frozen layers below the
adapter (:class:`HiddenCache`).

The DPO reference (``train.dpo_reference``: the role's adapter when DPO starts, or the base model)
is scored ONCE, before training, so no second model copy is held; the per-pair log-probs are fed
to the DPO step with each batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from malt_jax.config import ModelConfig, TrainConfig
from malt_jax.model.llama import Params, hidden_at
from malt_jax.parallel.distributed import fetch, put
from malt_jax.parallel.sharding import batch_sharding
from malt_jax.training import data as data_lib
from malt_jax.training.data import DPOExample, SFTExample
from malt_jax.training.losses import dpo_loss, sequence_logps, sft_loss
from malt_jax.training.steps import KEY_BLOCKS, Metrics, StepConfig, scored_logits

__all__ = ["batch_logps", "batch_rows", "HiddenCache", "reference_logps", "heldout_metrics"]


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def batch_logps(base: Params, adapter: Params | None, rows: dict, *, cfg: ModelConfig, scale: float) -> jax.Array:
    """Summed completion log-probs [R] of ``rows`` (see ``ROW_KEYS``)."""
    return sequence_logps(*scored_logits(base, adapter, rows, cfg, scale))


def batch_rows(batch: dict, mesh: Mesh | None) -> dict:
    """A packed batch's per-row arrays (``ROW_KEYS``) with the completion index, placed on the mesh."""
    rows = {k: batch[k] for k in ("tokens", "targets", "loss_mask")}
    rows["comp_index"], rows["comp_valid"] = data_lib.completion_index(batch["loss_mask"])
    if mesh is not None:
        rows = {k: put(a, batch_sharding(mesh, a.ndim, a.shape)) for k, a in rows.items()}
    return rows


class HiddenCache:
    """Per-example hidden states entering layer ``layer`` (the adapter's first), computed once
    per training stage: the frozen layers below never depend on the adapter.

    ``rows(idx, T)`` assembles a batch's ``hidden`` [R, T, dim] for example indices ``idx``
    (``-1`` = padding row; DPO: rows 2i / 2i+1 = pair i's chosen / rejected, or with
    ``shared_prompt`` row i = pair i's ``data.pack_dpo_shared`` row), row by row equal to
    running those layers on the packed batch (right padding).
    """

    def __init__(
        self,
        base: Params,
        examples: Sequence[Any],
        cfg: ModelConfig,
        train_cfg: TrainConfig,
        layer: int,
        pad_id: int = 0,
        shared_prompt: bool = False,
    ):
        self.layer, self.dim, self.dtype = layer, cfg.dim, np.dtype(cfg.dtype)
        dpo = any(isinstance(e, DPOExample) for e in examples)
        shared = dpo and shared_prompt
        self.per_row = 2 if dpo and not shared else 1
        chunk = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
        self.rows_of: list[np.ndarray] = []
        fn = jax.jit(functools.partial(hidden_at, key_blocks=KEY_BLOCKS), static_argnames=("cfg", "layer"))
        for start in range(0, len(examples), chunk):
            part = list(examples[start : start + chunk])
            batch = data_lib.pack(
                part + [None] * (chunk - len(part)), train_cfg.max_seq_len, pad_id, shared_prompt=shared
            )
            if shared:
                pos, seg = batch["positions"], batch["segments"]
                h = fetch(fn(base, batch["tokens"], cfg=cfg, layer=layer, positions=pos, segments=seg))
                lengths = (seg != data_lib.SEG_PAD).sum(axis=1)
            else:
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


def reference_logps(
    base: Params,
    adapter: Params | None,
    examples: Sequence[DPOExample],
    cfg: ModelConfig,
    train_cfg: TrainConfig,
    scale: float,
    mesh: Mesh | None = None,
    pad_id: int = 0,
) -> np.ndarray:
    """Summed completion log-probs ``[N, 2]`` (chosen, rejected) of every pair under the reference
    policy (``adapter=None``: the base model). Runs once, without gradients, in batches of
    ``batch_size // grad_accum`` pairs."""
    rows = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
    out = np.zeros((len(examples), 2), np.float32)
    for start in range(0, len(examples), rows):
        chunk = list(examples[start : start + rows])
        batch = data_lib.pack_dpo(chunk + [None] * (rows - len(chunk)), train_cfg.max_seq_len, pad_id)
        lp = fetch(batch_logps(base, adapter, batch_rows(batch, mesh), cfg=cfg, scale=scale)).reshape(rows, 2)
        out[start : start + len(chunk)] = lp[: len(chunk)]
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def _batch_sft_sums(base: Params, adapter: Params | None, rows: dict, *, cfg: ModelConfig, scale: float) -> jax.Array:
    """[summed weighted NLL, summed weighted correct tokens, token weight, correct tokens, tokens]
    of one SFT batch (the last two unweighted counts)."""
    logits, targets, mask = scored_logits(base, adapter, rows, cfg, scale)
    loss, m = sft_loss(logits, targets, mask)
    n = m["n_tokens"]
    scored = mask > 0
    right = scored & (jnp.argmax(logits, axis=-1) == targets)
    return jnp.stack([loss * n, m["accuracy"] * n, n, right.sum().astype(n.dtype), scored.sum().astype(n.dtype)])


def _sft_heldout(
    base: Params,
    adapter: Params | None,
    examples: Sequence[SFTExample],
    cfg: ModelConfig,
    train_cfg: TrainConfig,
    scale: float,
    mesh: Mesh | None,
    pad_id: int,
) -> dict[str, float]:
    rows = max(train_cfg.batch_size // max(train_cfg.grad_accum, 1), 1)
    sums = np.zeros(5, np.float64)
    for start in range(0, len(examples), rows):
        chunk = list(examples[start : start + rows])
        batch = data_lib.pack_sft(chunk + [None] * (rows - len(chunk)), train_cfg.max_seq_len, pad_id)
        sums += fetch(_batch_sft_sums(base, adapter, batch_rows(batch, mesh), cfg=cfg, scale=scale)).astype(np.float64)
    n = max(sums[2], 1e-8)
    return {
        "loss": float(sums[0] / n),
        "accuracy": float(sums[1] / n),
        "n_tokens": float(sums[2]),
        "correct_tokens": int(round(sums[3])),
        "tokens": int(round(sums[4])),
    }


@functools.partial(jax.jit, static_argnames=("sc",))
def _dpo_metrics(policy: jax.Array, ref: jax.Array, weights: jax.Array, *, sc: StepConfig) -> Metrics:
    _, m = dpo_loss(
        policy[:, 0],
        policy[:, 1],
        ref[:, 0],
        ref[:, 1],
        beta=sc.dpo_beta,
        loss_type=sc.dpo_loss,
        label_smoothing=sc.label_smoothing,
        weights=weights,
    )
    # the unweighted count behind the (pair-weighted) rewards/accuracies: as dpo_loss computes it
    chosen = sc.dpo_beta * (policy[:, 0].astype(jnp.float32) - ref[:, 0].astype(jnp.float32))
    rejected = sc.dpo_beta * (policy[:, 1].astype(jnp.float32) - ref[:, 1].astype(jnp.float32))
    return {**m, "rewards/accurate_pairs": ((chosen > rejected) & (weights > 0)).sum()}


def heldout_metrics(
    kind: str,
    base: Params,
    adapter: Params | None,
    examples: Sequence[Any],
    cfg: ModelConfig,
    train_cfg: TrainConfig,
    scale: float,
    mesh: Mesh | None = None,
    pad_id: int = 0,
    ref_logps: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of ``adapter`` on a held-out set, without gradients (jitted, in batches of
    ``batch_size // grad_accum`` like :func:`reference_logps`).

    ``kind="sft"``: ``loss`` (token-weighted mean cross-entropy over completion tokens, example
    weights included, as the SFT step normalises it) and token ``accuracy`` (weighted alike),
    with the unweighted counts ``correct_tokens`` / ``tokens``. ``kind="dpo"``: the pair-weighted
    mean DPO ``loss`` and the TRL metrics ``rewards/accuracies``, ``rewards/margins``,
    ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``, ``logps/rejected``, with the
    unweighted counts ``rewards/accurate_pairs`` (pairs whose chosen reward is above the
    rejected one) / ``pairs``; ``ref_logps`` [N, 2] are the pairs' reference log-probs
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
    m = _dpo_metrics(
        jnp.asarray(policy), jnp.asarray(ref_logps, jnp.float32), jnp.asarray(weights), sc=StepConfig.of(train_cfg)
    )
    out = {k: float(v) for k, v in fetch(m).items()}
    out["rewards/accurate_pairs"] = int(out["rewards/accurate_pairs"])
    out["pairs"] = len(examples)
    return out
