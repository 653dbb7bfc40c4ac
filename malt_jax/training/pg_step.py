"""The jitted policy-gradient update of one role's LoRA adapter (online multi-agent GRPO,
``malt-jax rl``) and the gradient-free per-token log-probs it needs (behaviour / reference policy).

A batch is one role's sampled rows of one iteration, packed as SFT rows are
(:func:`pg_batch`: ``data.pack_sft`` rows, prompt = the node's context, completion = its sampled
tokens, plus the completion index of ``data.completion_index``), with one advantage per row.
:func:`pg_step` is one optimizer update on the whole batch, run in ``accum`` microbatches
(``steps._accumulate``: ``lax.scan``, gradients summed) whose losses are re-weighted so that the
accumulated update equals the update on the whole batch for every ``loss_agg`` (tokens for
``token_mean``, rows for the per-sequence aggregations); the NaN/Inf guard and the optimizer
update are the SFT / DPO steps' (``steps._apply``).

With a mesh (:func:`compiled_pg_step`'s ``mesh``) the step is jitted with explicit
``in_shardings`` / ``out_shardings`` as the SFT / DPO ``Stepper`` is: base params by
``sharding.param_shardings`` (fsdp over embed, tensor over heads / ffn / vocab), the adapter and
its Adam moments by the LoRA shardings (``stepper.state_shardings``), metrics replicated, and
every per-row array of the batch split over ``data`` x ``fsdp`` (:func:`place_pg_batch`: the same
host batch on every process, so it runs as one SPMD program over several ``jax.distributed``
processes); the log-prob passes read their rows placed the same way.

Log-probs ``[B, C]`` are those of the completion positions (``C`` = the batch's scored width),
the layout of ``pg_loss``'s ``logp`` / ``old_logp`` / ``ref_logp``. Logits are divided by the
sampling ``temperature`` first (as TRL's GRPO trainer does), so the policy trained, its ratios and
its KL are those of the distribution the sampler drew from (top-k / top-p truncation aside).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from malt_jax.config import ModelConfig
from malt_jax.model.llama import Params, abstract_params
from malt_jax.parallel.distributed import fetch, put
from malt_jax.parallel.sharding import batch_sharding, param_shardings
from malt_jax.training import data as data_lib
from malt_jax.training.data import SFTExample
from malt_jax.training.losses import token_logps
from malt_jax.training.pg_loss import pg_loss, token_entropy
from malt_jax.training.stepper import state_shardings
from malt_jax.training.steps import TrainState, _accumulate, _apply, scored_logits

__all__ = [
    "PGConfig",
    "PG_KEYS",
    "pg_batch",
    "pg_step",
    "place_pg_batch",
    "pg_signature",
    "pg_batch_shardings",
    "compiled_pg_step",
    "completion_logps",
    "batch_logps",
]

Metrics = dict[str, jax.Array]

# the per-row arrays of a policy-gradient batch: data.pack_sft's rows with the completion index,
# the advantages [B] and, where used, the behaviour / reference log-probs [B, C]
PG_KEYS = ("tokens", "targets", "loss_mask", "comp_index", "comp_valid", "adv", "old", "ref")
# metrics aggregated like the loss, per completion token, and per sequence
_LOSS_LIKE = ("loss", "pg_loss", "kl")
_PER_ROW = ("completion_length", "advantage_mean")


class PGConfig(NamedTuple):
    """The static options of a compiled :func:`pg_step` (its jit key)."""

    clip_eps: float
    kl_coef: float
    loss_agg: str
    accum: int  # microbatches per update (rows / micro_batch)
    temperature: float = 1.0  # the sampling temperature (> 0): logits / temperature


def pg_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    adv: np.ndarray,
    micro_batch: int,
    max_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Packs ``(prompt, completion)`` token rows with their advantages ``adv`` [N] into a batch
    of ``ceil(N / micro_batch) * micro_batch`` rows (padding rows: no completion token, weight
    0); keys ``tokens``, ``targets``, ``loss_mask`` [B, T], ``comp_index``, ``comp_valid``
    [B, C], ``adv`` [B]."""
    n = len(rows)
    if len(adv) != n:
        raise ValueError(f"pg_batch: {n} rows but {len(adv)} advantages")
    size = -(-max(n, 1) // micro_batch) * micro_batch
    exs: list[SFTExample | None] = [SFTExample(p, c) for p, c in rows]
    batch = data_lib.pack_sft(exs + [None] * (size - n), max_len, pad_id)
    out = {k: batch[k] for k in ("tokens", "targets", "loss_mask")}
    out["comp_index"], out["comp_valid"] = data_lib.completion_index(out["loss_mask"])
    out["adv"] = np.zeros(size, np.float32)
    out["adv"][:n] = np.asarray(adv, np.float32)
    return out


def _scored(
    base: Params, adapter: Params | None, rows: dict, cfg: ModelConfig, scale: float, temperature: float
) -> tuple:
    logits, targets, mask = scored_logits(base, adapter, rows, cfg, scale)
    if temperature != 1.0:
        logits = logits.astype(jnp.float32) / temperature
    return logits, token_logps(logits, targets), mask


@functools.partial(jax.jit, static_argnames=("cfg", "scale", "temperature"))
def completion_logps(
    base: Params, adapter: Params | None, rows: dict, *, cfg: ModelConfig, scale: float, temperature: float = 1.0
) -> jax.Array:
    """Per-token log-probs [R, C] of ``rows``' completion positions (0 where masked), of the
    logits divided by ``temperature``."""
    _, lp, mask = _scored(base, adapter, rows, cfg, scale, temperature)
    return jnp.where(mask > 0, lp, 0.0)


def batch_logps(
    base: Params,
    adapter: Params | None,
    batch: dict,
    micro_batch: int,
    cfg: ModelConfig,
    scale: float,
    temperature: float = 1.0,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """:func:`completion_logps` of a :func:`pg_batch` (``adapter=None``: the base model), in
    chunks of ``micro_batch`` rows (with ``mesh``: placed on it, split over ``data`` x ``fsdp``;
    ``base`` / ``adapter`` already on it); host array [B, C], the same on every process."""
    keys = ("tokens", "targets", "loss_mask", "comp_index", "comp_valid")
    B = batch["tokens"].shape[0]
    out = []
    for lo in range(0, B, micro_batch):
        rows = place_pg_batch({k: np.asarray(batch[k][lo : lo + micro_batch]) for k in keys}, mesh)
        lp = completion_logps(base, adapter, rows, cfg=cfg, scale=scale, temperature=temperature)
        out.append(np.asarray(fetch(lp)))
    return np.concatenate(out)


def _pg_micro(
    adapter: Params, mb: dict, *, base: Params, totals: jax.Array, cfg: ModelConfig, scale: float, pc: PGConfig
) -> tuple[jax.Array, Metrics]:
    logits, lp, mask = _scored(base, adapter, mb, cfg, scale, pc.temperature)
    loss, m = pg_loss(
        lp,
        mb.get("old"),
        mb.get("ref"),
        mask,
        mb["adv"],
        clip_eps=pc.clip_eps,
        kl_coef=pc.kl_coef,
        loss_agg=pc.loss_agg,
        entropy=token_entropy(logits),
    )
    w = mask.astype(jnp.float32)
    f_tok = w.sum() / totals[0]  # this microbatch's share of the batch's tokens / rows
    f_row = (w.sum(-1) > 0).sum().astype(jnp.float32) / totals[1]
    f_loss = f_tok if pc.loss_agg == "token_mean" else f_row

    def share(k: str) -> jax.Array:
        return f_loss if k in _LOSS_LIKE else f_row if k in _PER_ROW else f_tok

    return loss * f_loss, {k: v * share(k) for k, v in m.items()}


def pg_step(
    base: Params,
    state: TrainState,
    batch: dict,
    *,
    cfg: ModelConfig,
    scale: float,
    pc: PGConfig,
    update: optax.TransformUpdateFn,
) -> tuple[TrainState, Metrics]:
    """One clipped policy-gradient update (``training.pg_loss``) of ``state.adapter``.

    Args:
      base: frozen base params; state: the role's TrainState.
      batch: :func:`pg_batch` output (rows a multiple of ``pc.accum``), optionally with ``old``
        (behaviour log-probs [B, C]; absent = on-policy, ratio 1) and ``ref`` (reference log-probs
        [B, C]; needed when ``pc.kl_coef > 0``, and for the ``kl`` metric).
    Returns:
      (new state, unchanged if the loss or gradient norm is non-finite; metrics with TRL names:
      loss, pg_loss, kl, clip_ratio, clip_ratio/low_mean, clip_ratio/high_mean,
      completion_length, advantage_mean, entropy, grad_norm, learning_rate, finite).
    """
    w = batch["loss_mask"].astype(jnp.float32)
    totals = jnp.stack([jnp.maximum(w.sum(), 1e-8), jnp.maximum((w.sum(-1) > 0).sum().astype(jnp.float32), 1.0)])
    mb = {k: batch[k] for k in PG_KEYS if k in batch}
    loss_fn = functools.partial(_pg_micro, base=base, totals=totals, cfg=cfg, scale=scale, pc=pc)
    loss, metrics, grads = _accumulate(loss_fn, state.adapter, mb, pc.accum)
    return _apply(state, loss, metrics, grads, update)


def place_pg_batch(batch: dict, mesh: Mesh | None) -> dict:
    """The :data:`PG_KEYS` arrays of a host batch, with a mesh placed on it with the leading (row)
    axis split over ``data`` x ``fsdp`` (replicated when the rows do not split evenly). Every
    process must pass the same host batch (as every process of a multi-host run samples the
    same trees); without a mesh the host arrays, unchanged."""
    keys = [k for k in PG_KEYS if k in batch]
    if mesh is None:
        return {k: batch[k] for k in keys}
    return {k: put(np.asarray(batch[k]), batch_sharding(mesh, np.ndim(batch[k]), np.shape(batch[k]))) for k in keys}


def pg_signature(batch: dict) -> tuple[tuple[str, int, int], ...]:
    """``(key, rows, ndim)`` of every :data:`PG_KEYS` array of a batch: what the shardings of a
    compiled :func:`pg_step` depend on (widths may vary from call to call)."""
    return tuple((k, int(np.shape(batch[k])[0]), int(np.ndim(batch[k]))) for k in PG_KEYS if k in batch)


def pg_batch_shardings(mesh: Mesh, signature: tuple[tuple[str, int, int], ...]) -> dict:
    """NamedShardings of a batch of this :func:`pg_signature`: rows over ``data`` x ``fsdp``."""
    return {k: batch_sharding(mesh, ndim, (rows,) + (1,) * (ndim - 1)) for k, rows, ndim in signature}


@functools.lru_cache(maxsize=16)
def compiled_pg_step(
    cfg: ModelConfig,
    scale: float,
    pc: PGConfig,
    update: optax.TransformUpdateFn,
    mesh: Mesh | None = None,
    state_abs: Any = None,
    signature: tuple[tuple[str, int, int], ...] = (),
) -> Any:
    """:func:`pg_step` jitted for these static options (cached: roles share compilations).

    With ``mesh`` (then ``state_abs``: the TrainState's abstract tree wrapped as
    ``stepper._Hashable``, and ``signature``: the batch's :func:`pg_signature`) it is jitted with
    explicit shardings, as the SFT / DPO ``Stepper`` is (see the module docstring): call it with the
    base params and state placed by ``param_shardings`` / ``state_shardings`` and the batch by
    :func:`place_pg_batch`."""
    part = functools.partial(pg_step, cfg=cfg, scale=scale, pc=pc, update=update)
    if mesh is None:
        return jax.jit(part)
    st_sh = state_shardings(state_abs.tree, mesh)
    in_sh = (param_shardings(abstract_params(cfg), mesh), st_sh, pg_batch_shardings(mesh, signature))
    return jax.jit(part, in_shardings=in_sh, out_shardings=(st_sh, NamedSharding(mesh, P())))
