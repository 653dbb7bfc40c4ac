"""Per-role group-relative advantages from a tree of joint outcome rewards (multi-agent GRPO).

The tree sampler draws, per question ``q``, ``n`` generator answers, ``m`` verifier critiques of
each answer and ``l`` refinements of each critique; the joint outcome reward of a leaf
``R[q, i, j, k]`` (shape ``[Q, n, m, l]``) scores the final (refined) answer. Every role is
credited by comparing a node with its *siblings* -- the nodes that share its parent, i.e. that
saw the same input -- so each role's baseline is a group of samples of that role's policy for
one prompt, exactly GRPO's group:

* refiner  ``(q, i, j, k)``: value ``R[q, i, j, k]``, group = the ``l`` refinements of ``(q, i, j)``;
* verifier ``(q, i, j)``:    value ``V(v)`` = mean of its leaves, group = the ``m`` critiques of ``(q, i)``;
* generator ``(q, i)``:      value ``V(g)`` = mean of its verifiers' values, group = the ``n`` answers of ``q``.

Node values are those of :func:`malt_jax.credit.values.assign_credit` (MALT value iteration), so
with every leaf valid ``V(g)`` is the mean of its ``m * l`` leaves.

For a group of values ``x_1..x_K`` (valid members only, ``K`` of them):

* ``baseline="mean"`` (GRPO):            ``b = mean(x)``;  ``A_i = x_i - b``  (sums to 0 over the group)
* ``baseline="loo"`` (RLOO / MARLOO):    ``b_i = mean of the others``;  ``A_i = x_i - b_i
  = K / (K - 1) * (x_i - mean(x))``  (also sums to 0: a rescaled mean baseline)
* ``normalize="std"`` (GRPO):            ``A_i / (std(x) + eps)``, ``std`` with Bessel's
  correction (``ddof=1``, as TRL's ``torch.std``);
* ``normalize="none"`` (Dr. GRPO):       ``A_i`` unscaled.

A group whose tree dimension has size 1 has no baseline and is refused (``ValueError`` naming
``n``, ``m`` or ``l``). With a validity ``mask`` (missing / failed leaves), invalid nodes get
advantage 0, statistics run over the valid members only, and a group with fewer than two valid
members -- nothing to compare with -- gets advantage 0 for all its members, as does a group of
equal values (detected exactly, so float rounding of the mean cannot leave a residual that the
std division amplifies); both count as zero-variance groups in the metrics.

Everything is pure JAX: the per-group computation is written for one group and ``vmap``-ed over
all groups; :func:`tree_advantages` and :func:`group_advantages` are ``jit``-ed with the config
static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from malt_jax.config import ConfigError
from malt_jax.credit.values import assign_credit
from malt_jax.roles import NAMES, role_name

__all__ = [
    "BASELINES",
    "NORMALIZATIONS",
    "AdvantageConfig",
    "TreeAdvantages",
    "group_advantages",
    "tree_advantages",
]

Baseline = Literal["mean", "loo"]
Normalization = Literal["std", "none"]
BASELINES: tuple[Baseline, ...] = ("mean", "loo")
NORMALIZATIONS: tuple[Normalization, ...] = ("std", "none")
# the tree dimension that holds each role's group of siblings
_GROUP_DIM = {"generator": "n", "verifier": "m", "refiner": "l"}


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How a group of sibling values becomes advantages.

    baseline:  "mean" (GRPO group mean) or "loo" (leave-one-out mean of the others, RLOO).
    normalize: "std" (divide by the group's std + eps, GRPO) or "none" (Dr. GRPO).
    eps:       > 0, added to the std before dividing (unused with normalize="none").
    """

    baseline: Baseline = "mean"
    normalize: Normalization = "std"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ConfigError(f"advantage.baseline: expected one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"advantage.normalize: expected one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}"
            )
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ConfigError(f"advantage.eps: expected a finite number > 0, got {eps!r}")


@flax.struct.dataclass
class TreeAdvantages:
    """Advantages of every node of ``Q`` trees, their validity masks and group metrics.

    Shapes:
        generator: Float32[Array, "Q n"];  verifier: Float32[Array, "Q n m"];
        refiner:   Float32[Array, "Q n m l"]   (0 where the node is invalid)
        generator_mask / verifier_mask / refiner_mask: Bool, same shapes; the node exists.
        metrics: flat dict of Float32[] scalars, keys ``<role>/<name>`` (see :func:`tree_advantages`).
    """

    generator: jax.Array
    verifier: jax.Array
    refiner: jax.Array
    generator_mask: jax.Array
    verifier_mask: jax.Array
    refiner_mask: jax.Array
    metrics: dict[str, jax.Array]

    def advantages(self, role: str) -> jax.Array:
        """The advantages of ``role`` (a letter or a name)."""
        return getattr(self, role_name(role))

    def mask(self, role: str) -> jax.Array:
        """Which nodes of ``role`` exist."""
        return getattr(self, role_name(role) + "_mask")


def _one_group(x: jax.Array, valid: jax.Array, config: AdvantageConfig) -> tuple[jax.Array, ...]:
    """Advantages of one group.

    Args:
        x: Float32[Array, "K"] member values; valid: Bool[Array, "K"].
    Returns:
        (adv [K], mean [], std [], count [] as float32); adv is 0 at invalid members and, with
        std 0, for a group with fewer than two valid members or with all of them equal.
    """
    w = valid.astype(x.dtype)
    count = w.sum()
    x = jnp.where(valid, x, 0.0)
    mean = x.sum() / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, x - mean, 0.0)
    # identical members are detected exactly (max == min): a rounded mean would leave them a tiny
    # residual that the std normalisation blows up
    spread = jnp.where(valid, x, -jnp.inf).max() - jnp.where(valid, x, jnp.inf).min()
    comparable = (count >= 2) & (spread > 0)
    std = jnp.where(comparable, jnp.sqrt((centred**2).sum() / jnp.maximum(count - 1.0, 1.0)), 0.0)
    # loo: x_i - (S - x_i) / (K - 1) == K / (K - 1) * (x_i - mean)
    adv = centred if config.baseline == "mean" else centred * (count / jnp.maximum(count - 1.0, 1.0))
    if config.normalize == "std":
        adv = adv / (std + config.eps)
    adv = jnp.where(valid & comparable, adv, 0.0)
    return adv, mean, std, count


def _groups(x: jax.Array, valid: jax.Array, config: AdvantageConfig) -> tuple[jax.Array, ...]:
    """:func:`_one_group` ``vmap``-ed over every leading axis (groups along the last axis)."""
    fn = functools.partial(_one_group, config=config)
    for _ in range(x.ndim - 1):
        fn = jax.vmap(fn)
    return fn(x, valid)


def _config(config: AdvantageConfig | None) -> AdvantageConfig:
    if config is None:
        return AdvantageConfig()
    if not isinstance(config, AdvantageConfig):
        raise TypeError(f"config must be an AdvantageConfig, got {type(config).__name__}")
    return config


def _check_group_size(shape: tuple[int, ...], dim: str, where: str) -> None:
    if shape[-1] < 2:
        raise ValueError(
            f"{dim}={shape[-1]}: the {where} have a single member, so no baseline is possible; sample {dim} >= 2"
        )


def _as_inputs(values: jax.Array, mask: jax.Array | None, ndim: int | None) -> tuple[jax.Array, jax.Array]:
    values = jnp.asarray(values)
    if ndim is not None and values.ndim != ndim:
        raise ValueError(f"rewards must have shape [Q, n, m, l], got {values.shape}")
    if values.ndim < 1:
        raise ValueError(f"values must have a group axis (shape [..., K]), got a scalar {values.shape}")
    values = values.astype(jnp.float32)
    if mask is None:
        return values, jnp.ones(values.shape, dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} != rewards shape {values.shape}")
    return values, mask.astype(bool)


def _metrics(
    prefix: str, x: jax.Array, valid: jax.Array, adv: jax.Array, std: jax.Array, count: jax.Array
) -> dict[str, jax.Array]:
    """``<prefix>/reward_mean`` (over valid nodes), ``reward_std`` (mean group std),
    ``frac_reward_zero_std`` (share of non-empty groups without signal: std 0 or < 2 members),
    ``advantage_abs_mean`` (over valid nodes) and ``groups`` (non-empty groups)."""
    w = valid.astype(jnp.float32)
    n_nodes = jnp.maximum(w.sum(), 1.0)
    present = count > 0
    n_groups = present.sum().astype(jnp.float32)
    g_denom = jnp.maximum(n_groups, 1.0)
    return {
        f"{prefix}/reward_mean": jnp.where(valid, x, 0.0).sum() / n_nodes,
        f"{prefix}/reward_std": jnp.where(present, std, 0.0).sum() / g_denom,
        f"{prefix}/frac_reward_zero_std": (present & (std == 0)).sum().astype(jnp.float32) / g_denom,
        f"{prefix}/advantage_abs_mean": jnp.abs(adv).sum() / n_nodes,
        f"{prefix}/groups": n_groups,
    }


@functools.partial(jax.jit, static_argnames=("config",))
def group_advantages(
    values: jax.Array, mask: jax.Array | None = None, config: AdvantageConfig | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Group-relative advantages along the last axis (one GRPO group per row).

    Args:
        values: Num[Array, "... K"] rewards of ``K`` samples for the same prompt (K >= 2).
        mask:   Bool[Array, "... K"] | None; False marks samples that do not exist.
        config: static :class:`AdvantageConfig` (None: the defaults, GRPO's mean / std).
    Returns:
        (Float32[Array, "... K"] advantages, metrics with the keys of :func:`tree_advantages`
        prefixed ``group/``).
    """
    config = _config(config)
    x, valid = _as_inputs(values, mask, None)
    _check_group_size(x.shape, "K", "groups along the last axis")
    adv, _, std, count = _groups(x, valid, config)
    return adv, _metrics("group", x, valid, adv, std, count)


@functools.partial(jax.jit, static_argnames=("config",))
def tree_advantages(
    rewards: jax.Array, mask: jax.Array | None = None, config: AdvantageConfig | None = None
) -> TreeAdvantages:
    """Per-role group-relative advantages of ``Q`` G -> V -> R trees of joint outcome rewards.

    Args:
        rewards: Num[Array, "Q n m l"] leaf rewards (1/0 correct, or any float); n, m, l >= 2.
        mask:    Bool[Array, "Q n m l"] | None; False marks missing / failed leaves (None: all
            valid). A verifier with no valid leaf and a generator with no valid verifier are
            invalid themselves, as in :func:`~malt_jax.credit.values.assign_credit`.
        config:  static :class:`AdvantageConfig` (None: the defaults, GRPO's mean / std).
    Returns:
        :class:`TreeAdvantages`; ``metrics`` holds per role ``X`` in (generator, verifier,
        refiner): ``X/reward_mean`` (mean node value), ``X/reward_std`` (mean of the groups'
        stds), ``X/frac_reward_zero_std`` (groups that carry no signal), ``X/advantage_abs_mean``
        and ``X/groups`` (groups with a valid member).
    Raises:
        ValueError: wrong shapes, or n, m or l equal to 1 (a group of one has no baseline).
    """
    config = _config(config)
    x, valid = _as_inputs(rewards, mask, 4)
    for role in reversed(NAMES):  # report the innermost offending dimension first: l, m, n
        dim = _GROUP_DIM[role]
        _check_group_size(x.shape[: 2 + NAMES.index(role)], dim, f"{role} groups along tree dimension {dim}")
    values = assign_credit(x, valid)
    out: dict[str, jax.Array] = {}
    metrics: dict[str, jax.Array] = {}
    for role in NAMES:
        node, node_mask = values.values(role), values.mask(role)
        adv, _, std, count = _groups(node, node_mask, config)
        out[role], out[role + "_mask"] = adv, node_mask
        metrics.update(_metrics(role, node, node_mask, adv, std, count))
    return TreeAdvantages(**out, metrics=metrics)
