"""MALT credit assignment: value iteration over the generator -> verifier -> refiner tree.

For every training question a tree is sampled: ``n`` generator answers ``g``, ``m`` verifier
critiques ``v`` per ``g`` and ``l`` refiner outputs ``r`` per ``v``. Leaf rewards
``R[q, i, j, k]`` (shape ``[Q, n, m, l]``) are propagated upwards ("global pooling", MALT
section 3):

* ``V(r) = R``                      (leaf value)
* ``V(v) = mean_k V(r_k)``          (over the *valid* leaves of ``v``)
* ``V(g) = mean_j V(v_j)``          (over the *valid* verifiers of ``g``)

A node is labelled positive iff ``value > threshold`` (strict; default 0.5). Leaves masked out
(failed / missing samples) are absent from the means; a verifier with no valid leaf, or a
generator with no valid verifier, is itself invalid (``*_mask`` false, label false) and never
appears in SFT sets or DPO pairs.

Array code (:func:`assign_credit`) is pure JAX, ``jit``-able and ``vmap``-ed over questions. The
dataset builders (:func:`sft_indices`, :func:`dpo_pairs`, :func:`summary`) run on host with
NumPy because their outputs have data-dependent lengths.

Tree coordinates: a generator is ``(q, i)`` (``d=2``), a verifier ``(q, i, j)`` (``d=3``) and a
refiner output ``(q, i, j, k)`` (``d=4``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.parallel.distributed import fetch
from malt_jax.roles import NAMES, role_name

__all__ = [
    "CreditValues",
    "assign_credit",
    "role_depth",
    "sft_indices",
    "dpo_pairs",
    "summary",
]

_DEPTH = {name: level + 2 for level, name in enumerate(NAMES)}  # coordinates of a node: (q, i[, j[, k]])


@flax.struct.dataclass
class CreditValues:
    """Node values, labels and validity masks for a batch of ``Q`` trees.

    Shapes (jaxtyping style):
        leaf:            Float[Array, "Q n m l"]   leaf rewards (0 where masked)
        verifier:        Float[Array, "Q n m"]     V(v)
        generator:       Float[Array, "Q n"]       V(g)
        leaf_label:      Bool[Array, "Q n m l"]    reward > threshold (and valid)
        verifier_label:  Bool[Array, "Q n m"]      V(v) > threshold (and valid)
        generator_label: Bool[Array, "Q n"]        V(g) > threshold (and valid)
        leaf_mask / verifier_mask / generator_mask: Bool, same shapes; node is present.
    """

    leaf: jax.Array
    verifier: jax.Array
    generator: jax.Array
    leaf_label: jax.Array
    verifier_label: jax.Array
    generator_label: jax.Array
    leaf_mask: jax.Array
    verifier_mask: jax.Array
    generator_mask: jax.Array
    threshold: float = flax.struct.field(pytree_node=False, default=0.5)

    def values(self, role: str) -> jax.Array:
        return getattr(self, _FIELD[role_name(role)])

    def labels(self, role: str) -> jax.Array:
        return getattr(self, _FIELD[role_name(role)] + "_label")

    def mask(self, role: str) -> jax.Array:
        return getattr(self, _FIELD[role_name(role)] + "_mask")


_FIELD = {"generator": "generator", "verifier": "verifier", "refiner": "leaf"}


def role_depth(role: str) -> int:
    """Number of tree coordinates of a node of ``role`` (G: 2, V: 3, R: 4)."""
    return _DEPTH[role_name(role)]


def _tree_values(rewards: jax.Array, mask: jax.Array, threshold: float) -> tuple[jax.Array, ...]:
    """Value iteration for one question's tree.

    Args:
        rewards: Float[Array, "n m l"]
        mask:    Bool[Array, "n m l"]
    Returns:
        (leaf [n,m,l], verifier [n,m], generator [n], leaf_mask, verifier_mask, generator_mask)
    """
    leaf = jnp.where(mask, rewards, 0.0)
    n_leaf = mask.sum(-1)  # [n, m]
    v_mask = n_leaf > 0
    v_val = leaf.sum(-1) / jnp.maximum(n_leaf, 1).astype(leaf.dtype)
    n_ver = v_mask.sum(-1)  # [n]
    g_mask = n_ver > 0
    g_val = jnp.where(v_mask, v_val, 0.0).sum(-1) / jnp.maximum(n_ver, 1).astype(leaf.dtype)
    return leaf, v_val, g_val, mask, v_mask, g_mask


@functools.partial(jax.jit, static_argnames=("threshold",))
def assign_credit(rewards: jax.Array, mask: jax.Array | None = None, threshold: float = 0.5) -> CreditValues:
    """Propagate leaf rewards up the tree (MALT global pooling) and label nodes.

    Args:
        rewards: Num[Array, "Q n m l"] leaf rewards (typically in {0, 1}; bool/int accepted).
        mask:    Bool[Array, "Q n m l"] | None; False marks failed / missing leaves.
        threshold: static; a node is positive iff value > threshold (strict).
    Returns:
        :class:`CreditValues` with float32 values and boolean labels / masks.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 4:
        raise ValueError(f"rewards must have shape [Q, n, m, l], got {rewards.shape}")
    rewards = rewards.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(rewards.shape, dtype=bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != rewards.shape:
            raise ValueError(f"mask shape {mask.shape} != rewards shape {rewards.shape}")
        mask = mask.astype(bool)
    per_q = functools.partial(_tree_values, threshold=threshold)
    leaf, ver, gen, lm, vm, gm = jax.vmap(per_q)(rewards, mask)
    return CreditValues(
        leaf=leaf,
        verifier=ver,
        generator=gen,
        leaf_label=(leaf > threshold) & lm,
        verifier_label=(ver > threshold) & vm,
        generator_label=(gen > threshold) & gm,
        leaf_mask=lm,
        verifier_mask=vm,
        generator_mask=gm,
        threshold=threshold,
    )


# ----------------------------------------------------------------------------------------------
# Host-side dataset builders.
# ----------------------------------------------------------------------------------------------


def _host(values: CreditValues, role: str) -> tuple[np.ndarray, np.ndarray]:
    labels = fetch(values.labels(role)).astype(bool)
    valid = fetch(values.mask(role)).astype(bool)
    return labels, valid


def sft_indices(values: CreditValues, role: str) -> np.ndarray:
    """Coordinates of the positive (SFT) nodes of ``role``.

    Returns:
        Int[np.ndarray, "K d"] in lexicographic order, ``d`` = :func:`role_depth` (G 2, V 3, R 4).
    """
    labels, valid = _host(values, role)
    return np.argwhere(labels & valid).astype(np.int64).reshape(-1, role_depth(role))


def _check_cap(max_pairs_per_parent: int | None) -> None:
    if max_pairs_per_parent is not None and (
        isinstance(max_pairs_per_parent, bool)
        or not isinstance(max_pairs_per_parent, (int, np.integer))
        or max_pairs_per_parent < 0
    ):
        raise ValueError(f"max_pairs_per_parent must be None or an int >= 0, got {max_pairs_per_parent!r}")


def dpo_pairs(
    values: CreditValues,
    role: str,
    max_pairs_per_parent: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(chosen, rejected) sibling pairs for DPO.

    Siblings share a parent: refiner outputs under the same ``(q, i, j)``, verifier critiques
    under the same ``(q, i)``, generator answers under the same ``q``. Every valid positive x
    valid negative combination is a pair; with ``max_pairs_per_parent`` set, at most that many
    are kept per parent, chosen without replacement by a generator seeded from
    ``(seed, *parent)`` -- so the choice for a parent does not depend on the rest of the batch.

    Returns:
        Int[np.ndarray, "P 2 d"]: ``[:, 0]`` chosen and ``[:, 1]`` rejected coordinates,
        grouped by parent in lexicographic order, pairs within a parent in (pos, neg) order.
    """
    _check_cap(max_pairs_per_parent)
    d = role_depth(role)
    labels, valid = _host(values, role)
    pos = labels & valid
    neg = ~labels & valid
    n_pairs = pos.sum(-1) * neg.sum(-1)  # per parent
    out: list[np.ndarray] = []
    for parent in zip(*np.nonzero(n_pairs)):
        p_idx = np.flatnonzero(pos[parent])
        n_idx = np.flatnonzero(neg[parent])
        combos = np.stack(np.meshgrid(p_idx, n_idx, indexing="ij"), -1).reshape(-1, 2)
        if max_pairs_per_parent is not None and len(combos) > max_pairs_per_parent:
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, *map(int, parent)])
            keep = np.sort(rng.choice(len(combos), size=max_pairs_per_parent, replace=False))
            combos = combos[keep]
        if len(combos) == 0:
            continue
        prefix = np.broadcast_to(np.asarray(parent, dtype=np.int64), (len(combos), 2, d - 1))
        out.append(np.concatenate([prefix, combos[:, :, None].astype(np.int64)], axis=-1))
    if not out:
        return np.zeros((0, 2, d), dtype=np.int64)
    return np.concatenate(out, axis=0)


def summary(values: CreditValues, max_pairs_per_parent: int | None = None) -> dict[str, Any]:
    """Per-role statistics for reports.

    Keys per role ``X`` in (generator, verifier, refiner): ``X/nodes`` (valid nodes),
    ``X/positive_rate`` (positives / valid nodes, NaN if none), ``X/sft`` (SFT examples),
    ``X/dpo_pairs`` (pairs with the given cap, same count :func:`dpo_pairs` returns),
    ``X/mean_value``; plus ``threshold`` and ``questions``.
    """
    _check_cap(max_pairs_per_parent)
    out: dict[str, Any] = {"threshold": float(values.threshold), "questions": int(values.generator.shape[0])}
    for role in NAMES:
        labels, valid = _host(values, role)
        vals = fetch(values.values(role)).astype(np.float64)
        pos = labels & valid
        neg = ~labels & valid
        n_valid = int(valid.sum())
        n_pos = int(pos.sum())
        per_parent = pos.sum(-1).astype(np.int64) * neg.sum(-1).astype(np.int64)
        if max_pairs_per_parent is not None:
            per_parent = np.minimum(per_parent, max_pairs_per_parent)
        out[f"{role}/nodes"] = n_valid
        out[f"{role}/positive_rate"] = n_pos / n_valid if n_valid else float("nan")
        out[f"{role}/mean_value"] = float(vals[valid].mean()) if n_valid else float("nan")
        out[f"{role}/sft"] = n_pos
        out[f"{role}/dpo_pairs"] = int(per_parent.sum())
    return out
