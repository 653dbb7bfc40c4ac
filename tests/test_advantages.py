"""Tests for malt_jax.credit.advantages: per-role group-relative advantages of G -> V -> R trees."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import ConfigError
from malt_jax.credit.advantages import (
    BASELINES,
    NORMALIZATIONS,
    AdvantageConfig,
    group_advantages,
    tree_advantages,
)
from malt_jax.roles import NAMES

CONFIGS = [AdvantageConfig(baseline=b, normalize=z, eps=1e-6) for b, z in itertools.product(BASELINES, NORMALIZATIONS)]
IDS = [f"{c.baseline}-{c.normalize}" for c in CONFIGS]


# ----------------------------------------------------------------------------------------------
# An independent reference: plain Python loops over the tree, float64.
# ----------------------------------------------------------------------------------------------


def _ref_group(xs: list[float], cfg: AdvantageConfig) -> list[float]:
    """Advantages of one group of valid members (len >= 2), written from the definitions."""
    k = len(xs)
    mean = sum(xs) / k
    std = (sum((x - mean) ** 2 for x in xs) / (k - 1)) ** 0.5
    out = []
    for i, x in enumerate(xs):
        others = [y for j, y in enumerate(xs) if j != i]
        base = mean if cfg.baseline == "mean" else sum(others) / len(others)
        a = x - base
        if cfg.normalize == "std":
            a = a / (std + cfg.eps)
        out.append(a)
    return out


def _ref_level(values: np.ndarray, valid: np.ndarray, cfg: AdvantageConfig) -> np.ndarray:
    """Groups along the last axis; invalid members and groups of < 2 valid members get 0."""
    adv = np.zeros(values.shape)
    for parent in np.ndindex(values.shape[:-1]):
        idx = [k for k in range(values.shape[-1]) if valid[parent + (k,)]]
        if len(idx) < 2:
            continue
        for k, a in zip(idx, _ref_group([float(values[parent + (k,)]) for k in idx], cfg)):
            adv[parent + (k,)] = a
    return adv


def _reference(rewards: np.ndarray, mask: np.ndarray, cfg: AdvantageConfig) -> dict[str, np.ndarray]:
    q_, n_, m_, l_ = rewards.shape
    ver = np.zeros((q_, n_, m_))
    ver_ok = np.zeros((q_, n_, m_), bool)
    gen = np.zeros((q_, n_))
    gen_ok = np.zeros((q_, n_), bool)
    for q, i in itertools.product(range(q_), range(n_)):
        for j in range(m_):
            leaves = [float(rewards[q, i, j, k]) for k in range(l_) if mask[q, i, j, k]]
            if leaves:
                ver[q, i, j], ver_ok[q, i, j] = sum(leaves) / len(leaves), True
        vs = [ver[q, i, j] for j in range(m_) if ver_ok[q, i, j]]
        if vs:
            gen[q, i], gen_ok[q, i] = sum(vs) / len(vs), True
    return {
        "refiner": _ref_level(rewards, mask, cfg),
        "verifier": _ref_level(ver, ver_ok, cfg),
        "generator": _ref_level(gen, gen_ok, cfg),
        "refiner_mask": mask,
        "verifier_mask": ver_ok,
        "generator_mask": gen_ok,
    }


def _tree(seed: int, shape=(3, 4, 3, 2), binary: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if binary:
        return (rng.random(shape) < 0.5).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "float"])
def test_matches_reference_on_random_trees(cfg, binary):
    shape = (3, 4, 3, 2)
    for seed in range(3):
        rewards = _tree(seed, shape, binary)
        out = tree_advantages(rewards, config=cfg)
        ref = _reference(rewards.astype(np.float64), np.ones(shape, bool), cfg)
        chex.assert_shape(out.generator, shape[:2])
        chex.assert_shape(out.verifier, shape[:3])
        chex.assert_shape(out.refiner, shape)
        chex.assert_type([out.generator, out.verifier, out.refiner], jnp.float32)
        chex.assert_type([out.generator_mask, out.verifier_mask, out.refiner_mask], bool)
        for role in NAMES:
            np.testing.assert_allclose(out.advantages(role), ref[role], rtol=1e-4, atol=1e-5, err_msg=role)
            np.testing.assert_array_equal(out.mask(role), True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_reference_with_a_mask(cfg):
    shape = (2, 3, 4, 3)
    rng = np.random.default_rng(7)
    rewards = _tree(11, shape, binary=False)
    mask = rng.random(shape) < 0.6
    mask[0, 0] = False  # a whole answer missing: the generator node is invalid
    mask[1, 1, :, 1:] = False  # every verifier of (1, 1) has a single leaf: no refiner baseline
    mask[1, 2, 1:] = False  # (1, 2) has one valid critique: no verifier baseline
    mask[1, 2, 0, :2] = True
    out = tree_advantages(rewards, mask, config=cfg)
    ref = _reference(rewards.astype(np.float64), mask, cfg)
    for role in NAMES:
        np.testing.assert_array_equal(out.mask(role), ref[role + "_mask"], err_msg=role)
        np.testing.assert_allclose(out.advantages(role), ref[role], rtol=1e-4, atol=1e-5, err_msg=role)
        assert not np.any(np.asarray(out.advantages(role))[~ref[role + "_mask"]])
    assert not bool(out.generator_mask[0, 0])
    np.testing.assert_array_equal(out.refiner[1, 1], 0.0)
    np.testing.assert_array_equal(out.verifier[1, 2], 0.0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_jit_and_eager_agree(cfg):
    rewards = _tree(3, binary=False)
    jitted = jax.jit(lambda r: tree_advantages(r, config=cfg))(rewards)
    with jax.disable_jit():
        eager = tree_advantages(rewards, config=cfg)
    for role in NAMES:
        np.testing.assert_allclose(jitted.advantages(role), eager.advantages(role), rtol=1e-5, atol=1e-6)
    for key, value in eager.metrics.items():
        np.testing.assert_allclose(jitted.metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_identical_leaves_give_the_generator_mean_of_all_its_leaves():
    rewards = _tree(5, (2, 3, 2, 4), binary=True)
    out = tree_advantages(rewards, config=AdvantageConfig(normalize="none"))
    g_value = rewards.mean(axis=(2, 3))
    np.testing.assert_allclose(out.generator, g_value - g_value.mean(-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("dim", ["n", "m", "l"])
def test_a_group_of_one_is_refused_naming_the_dimension(dim):
    shape = {"n": (2, 1, 3, 3), "m": (2, 3, 1, 3), "l": (2, 3, 3, 1)}[dim]
    with pytest.raises(ValueError, match=rf"^{dim}=1: .*tree dimension {dim}.*no baseline is possible"):
        tree_advantages(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="no baseline is possible"):
        group_advantages(np.zeros((4, 1), np.float32))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[Q, n, m, l\]"):
        tree_advantages(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        tree_advantages(np.zeros((1, 2, 2, 2)), np.ones((1, 2, 2, 3), bool))
    with pytest.raises(TypeError, match="AdvantageConfig"):
        tree_advantages(np.zeros((1, 2, 2, 2)), config="mean")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"baseline": "median"}, "baseline"),
        ({"baseline": "LOO"}, "baseline"),
        ({"normalize": "z"}, "normalize"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-6}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": "1e-6"}, "eps"),
    ],
)
def test_bad_options_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^advantage\.{field}: expected ") as info:
        AdvantageConfig(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_is_frozen_and_hashable():
    cfg = AdvantageConfig()
    assert (cfg.baseline, cfg.normalize) == ("mean", "std")
    assert hash(cfg) == hash(AdvantageConfig())
    with pytest.raises(AttributeError):
        cfg.baseline = "loo"  # type: ignore[misc]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "float"])
def test_group_sums_and_the_leave_one_out_identity(binary):
    """Mean baseline: each group's advantages sum to 0. Leave-one-out without normalisation:
    A_i = x_i - mean(others) sums to S - (K S - S) / (K - 1) = 0 too, and equals K / (K - 1)
    times the mean-baseline advantage."""
    rewards = _tree(21, (4, 5, 3, 4), binary)
    mean_adv = tree_advantages(rewards, config=AdvantageConfig("mean", "none"))
    loo_adv = tree_advantages(rewards, config=AdvantageConfig("loo", "none"))
    for role, k in zip(NAMES, (5, 3, 4)):
        a_mean, a_loo = np.asarray(mean_adv.advantages(role)), np.asarray(loo_adv.advantages(role))
        np.testing.assert_allclose(a_mean.sum(-1), 0.0, atol=1e-5, err_msg=role)
        np.testing.assert_allclose(a_loo.sum(-1), 0.0, atol=1e-5, err_msg=role)
        np.testing.assert_allclose(a_loo, k / (k - 1) * a_mean, rtol=1e-5, atol=1e-6, err_msg=role)
    # std-normalised mean-baseline advantages of a group with signal have (sample) std 1
    norm = np.asarray(tree_advantages(rewards, config=AdvantageConfig("mean", "std", eps=1e-9)).refiner)
    raw_std = rewards.std(-1, ddof=1)
    np.testing.assert_allclose(norm.std(-1, ddof=1)[raw_std > 0], 1.0, rtol=1e-4)
    np.testing.assert_array_equal(norm[raw_std == 0], 0.0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_identical_members_get_exactly_zero(cfg):
    """0.1 is not exact in float32: mean(0.1, 0.1, 0.1) - 0.1 != 0, which the std division would
    turn into a visible advantage; identical members are detected exactly instead."""
    for v in (0.1, 1 / 3, 0.7, -2.3):
        adv, metrics = group_advantages(np.full((2, 3), v, np.float32), config=cfg)
        np.testing.assert_array_equal(adv, 0.0)
        assert float(metrics["group/frac_reward_zero_std"]) == 1.0
        assert float(metrics["group/reward_std"]) == 0.0


def test_metrics():
    # Q=1, n=2, m=2, l=2: answer 0 all correct, answer 1 one correct leaf.
    rewards = np.array([[[[1, 1], [1, 1]], [[1, 0], [0, 0]]]], np.float32)
    out = tree_advantages(rewards)
    m = {k: float(v) for k, v in out.metrics.items()}
    # refiner groups: [1,1] [1,1] [1,0] [0,0] -> 3 of 4 without variance
    assert m["refiner/frac_reward_zero_std"] == pytest.approx(0.75)
    assert m["refiner/reward_mean"] == pytest.approx(5 / 8)
    assert m["refiner/reward_std"] == pytest.approx(np.std([1, 0], ddof=1) / 4)
    assert m["refiner/groups"] == 4
    # verifier values [1, 1] and [0.5, 0]: one of two groups without variance
    assert m["verifier/frac_reward_zero_std"] == pytest.approx(0.5)
    assert m["verifier/reward_mean"] == pytest.approx(2.5 / 4)
    # generator values [1, 0.25]
    assert m["generator/frac_reward_zero_std"] == 0.0
    assert m["generator/reward_mean"] == pytest.approx(1.25 / 2)
    assert m["generator/reward_std"] == pytest.approx(np.std([1, 0.25], ddof=1))
    assert m["generator/advantage_abs_mean"] == pytest.approx(np.abs(np.asarray(out.generator)).mean())
    assert set(m) == {f"{r}/{k}" for r in NAMES for k in _METRIC_NAMES}


_METRIC_NAMES = ("reward_mean", "reward_std", "frac_reward_zero_std", "advantage_abs_mean", "groups")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_group_helper_is_the_refiner_level(cfg):
    rewards = _tree(9, (2, 2, 3, 5), binary=False)
    adv, metrics = group_advantages(rewards.reshape(-1, 5), config=cfg)
    chex.assert_shape(adv, (12, 5))
    np.testing.assert_allclose(adv.reshape(rewards.shape), tree_advantages(rewards, config=cfg).refiner, atol=1e-6)
    assert set(metrics) == {f"group/{k}" for k in _METRIC_NAMES}
