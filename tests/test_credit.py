"""Tests for malt_jax.credit.values: value iteration, labels, SFT sets and DPO pairs."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.credit import values as credit
from malt_jax.credit.values import assign_credit, dpo_pairs, sft_indices, summary
from malt_jax.roles import NAMES


def _worked_example() -> np.ndarray:
    # One question, one generator, three verifiers, three refiner outputs each.
    return np.array([[[[1, 1, 0], [1, 0, 0], [0, 0, 0]]]], dtype=np.float32)  # [1, 1, 3, 3]


def _as_set(a: np.ndarray) -> set:
    return {tuple(map(tuple, p)) if p.ndim == 2 else tuple(p) for p in a}


def test_worked_example_values_and_labels():
    cv = assign_credit(_worked_example())
    chex.assert_shape(cv.leaf, (1, 1, 3, 3))
    chex.assert_shape(cv.verifier, (1, 1, 3))
    chex.assert_shape(cv.generator, (1, 1))
    chex.assert_type([cv.leaf, cv.verifier, cv.generator], jnp.float32)
    chex.assert_type([cv.leaf_label, cv.verifier_label, cv.generator_label], bool)
    np.testing.assert_allclose(cv.verifier[0, 0], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(cv.generator[0, 0], 3 / 9, rtol=1e-6)
    np.testing.assert_array_equal(cv.verifier_label[0, 0], [True, False, False])
    assert not bool(cv.generator_label[0, 0])


def test_worked_example_datasets():
    cv = assign_credit(_worked_example())
    # Verifier pairs: (v1, v2), (v1, v3).
    vp = dpo_pairs(cv, "V")
    chex.assert_shape(vp, (2, 2, 3))
    assert _as_set(vp) == {((0, 0, 0), (0, 0, 1)), ((0, 0, 0), (0, 0, 2))}
    np.testing.assert_array_equal(sft_indices(cv, "verifier"), [[0, 0, 0]])
    # Generator excluded from SFT; no G pairs (single g).
    assert sft_indices(cv, "G").shape == (0, 2)
    assert dpo_pairs(cv, "generator").shape == (0, 2, 2)
    # Refiner pairs: under v1 (r1,r3),(r2,r3); under v2 (r1,r2),(r1,r3); v3 none.
    rp = dpo_pairs(cv, "R")
    chex.assert_shape(rp, (4, 2, 4))
    assert _as_set(rp) == {
        ((0, 0, 0, 0), (0, 0, 0, 2)),
        ((0, 0, 0, 1), (0, 0, 0, 2)),
        ((0, 0, 1, 0), (0, 0, 1, 1)),
        ((0, 0, 1, 0), (0, 0, 1, 2)),
    }
    np.testing.assert_array_equal(sft_indices(cv, "refiner"), [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    # Exact order: grouped by parent, (pos, neg) lexicographic within a parent.
    np.testing.assert_array_equal(rp[:, 0, 2:], [[0, 0], [0, 1], [1, 0], [1, 0]])
    np.testing.assert_array_equal(rp[:, 1, 2:], [[0, 2], [0, 2], [1, 1], [1, 2]])
    s = summary(cv)
    assert s["verifier/sft"] == 1 and s["verifier/dpo_pairs"] == 2
    assert s["refiner/sft"] == 3 and s["refiner/dpo_pairs"] == 4
    assert s["generator/sft"] == 0 and s["generator/dpo_pairs"] == 0
    assert s["refiner/positive_rate"] == pytest.approx(3 / 9)
    assert s["verifier/positive_rate"] == pytest.approx(1 / 3)
    assert s["generator/nodes"] == 1 and s["questions"] == 1


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_uniform_trees_have_no_pairs(fill):
    cv = assign_credit(np.full((2, 3, 2, 2), fill, np.float32))
    for role in NAMES:
        d = credit.role_depth(role)
        assert dpo_pairs(cv, role).shape == (0, 2, d)
        k = sft_indices(cv, role).shape[0]
        total = int(np.prod(cv.mask(role).shape))
        assert k == (total if fill == 1.0 else 0)
    s = summary(cv)
    assert all(s[f"{r}/dpo_pairs"] == 0 for r in NAMES)
    assert s["generator/positive_rate"] == fill


def test_exact_half_is_negative_strict_threshold():
    # n=2, m=2, l=2; v values 0.5 and 1.0 / 0.5 and 0.5; g values 0.75 / 0.5.
    r = np.array([[[[1, 0], [1, 1]], [[0, 1], [1, 0]]]], np.float32)
    cv = assign_credit(r)
    np.testing.assert_array_equal(cv.verifier[0], [[0.5, 1.0], [0.5, 0.5]])
    np.testing.assert_array_equal(cv.generator[0], [0.75, 0.5])
    np.testing.assert_array_equal(cv.verifier_label[0], [[False, True], [False, False]])
    np.testing.assert_array_equal(cv.generator_label[0], [True, False])
    np.testing.assert_array_equal(dpo_pairs(cv, "V"), [[[0, 0, 1], [0, 0, 0]]])
    np.testing.assert_array_equal(dpo_pairs(cv, "G"), [[[0, 0], [0, 1]]])
    # Configurable threshold: with 0.4 every 0.5 becomes positive.
    cv4 = assign_credit(r, threshold=0.4)
    assert bool(cv4.verifier_label.all()) and bool(cv4.generator_label.all())
    assert cv4.threshold == 0.4


def test_mask_handling():
    r = np.array([[[[1, 0, 0], [0, 0, 0], [1, 1, 1]]]], np.float32)  # [1,1,3,3]
    m = np.array([[[[1, 0, 0], [0, 0, 0], [1, 1, 1]]]], bool)
    # v1: only leaf 0 valid (reward 1) -> 1.0; v2 fully masked -> invalid; v3 -> 1.0
    cv = assign_credit(r, m)
    np.testing.assert_array_equal(cv.verifier_mask[0, 0], [True, False, True])
    np.testing.assert_allclose(cv.verifier[0, 0, [0, 2]], [1.0, 1.0])
    np.testing.assert_allclose(cv.generator[0, 0], 1.0)  # mean over valid verifiers only
    assert not bool(cv.verifier_label[0, 0, 1])
    # Masked leaves never appear as negatives or positives.
    assert dpo_pairs(cv, "R").shape == (0, 2, 4)
    assert dpo_pairs(cv, "V").shape == (0, 2, 3)  # invalid v2 is not a negative
    np.testing.assert_array_equal(sft_indices(cv, "R"), [[0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 2, 1], [0, 0, 2, 2]])
    # A masked leaf with reward 1 is not counted.
    m2 = np.ones_like(m)
    m2[0, 0, 0, 0] = False
    cv2 = assign_credit(r, m2)
    np.testing.assert_allclose(cv2.verifier[0, 0, 0], 0.0)
    assert not bool(cv2.leaf_label[0, 0, 0, 0])
    s = summary(cv2)
    assert s["refiner/nodes"] == 8 and s["refiner/sft"] == 3
    # Fully masked question: all nodes invalid.
    cv3 = assign_credit(r, np.zeros_like(m))
    assert not bool(cv3.generator_mask.any())
    assert np.isnan(summary(cv3)["generator/positive_rate"])


def test_pair_cap_and_seed_determinism():
    rng = np.random.default_rng(0)
    r = (rng.random((4, 3, 4, 6)) < 0.5).astype(np.float32)
    cv = assign_credit(r)
    full = dpo_pairs(cv, "R")
    full_set = _as_set(full)
    for cap in (0, 1, 2, 3):
        a = dpo_pairs(cv, "R", max_pairs_per_parent=cap, seed=7)
        b = dpo_pairs(cv, "R", max_pairs_per_parent=cap, seed=7)
        np.testing.assert_array_equal(a, b)
        assert _as_set(a) <= full_set
        # Per-parent count is min(cap, pos*neg).
        parents = {}
        for p in a:
            parents.setdefault(tuple(p[0, :3]), 0)
            parents[tuple(p[0, :3])] += 1
            np.testing.assert_array_equal(p[0, :3], p[1, :3])  # siblings
            assert cv.leaf_label[tuple(p[0])] and not cv.leaf_label[tuple(p[1])]
        pos = np.asarray(cv.leaf_label).sum(-1)
        expect = np.minimum(pos * (6 - pos), cap)
        assert len(a) == expect.sum() == summary(cv, cap)["refiner/dpo_pairs"]
        assert all(v <= cap for v in parents.values())
    # Different seeds choose differently somewhere; cap >= all combos gives everything.
    a7 = dpo_pairs(cv, "R", max_pairs_per_parent=2, seed=7)
    a8 = dpo_pairs(cv, "R", max_pairs_per_parent=2, seed=8)
    assert not np.array_equal(a7, a8)
    np.testing.assert_array_equal(dpo_pairs(cv, "R", max_pairs_per_parent=9, seed=3), full)
    assert len(full) == summary(cv)["refiner/dpo_pairs"]
    # The choice for a parent does not depend on the other questions in the batch
    # (all-zero trees in q0, q1 produce no pairs; q2 keeps its coordinates).
    other = np.concatenate([np.zeros_like(r[:2]), r[2:3]])
    a_q2 = dpo_pairs(assign_credit(other), "R", max_pairs_per_parent=2, seed=7)
    assert len(a_q2) > 0
    np.testing.assert_array_equal(a_q2, a7[a7[:, 0, 0] == 2])
    with pytest.raises(ValueError):
        dpo_pairs(cv, "R", max_pairs_per_parent=-1)


def _reference(r: np.ndarray, m: np.ndarray, thr: float):
    """Per-question Python-loop reference."""
    Q, n, mm, l = r.shape
    V = np.zeros((Q, n, mm))
    Vm = np.zeros((Q, n, mm), bool)
    G = np.zeros((Q, n))
    Gm = np.zeros((Q, n), bool)
    for q, i in itertools.product(range(Q), range(n)):
        vs = []
        for j in range(mm):
            leaves = [r[q, i, j, k] for k in range(l) if m[q, i, j, k]]
            if leaves:
                V[q, i, j] = sum(leaves) / len(leaves)
                Vm[q, i, j] = True
                vs.append(V[q, i, j])
        if vs:
            G[q, i] = sum(vs) / len(vs)
            Gm[q, i] = True
    return V, Vm, G, Gm


def test_vmap_matches_python_loop_reference():
    rng = np.random.default_rng(1)
    r = (rng.random((5, 3, 3, 4)) < 0.6).astype(np.float32)
    m = rng.random(r.shape) < 0.8
    thr = 0.5
    cv = assign_credit(r, m, threshold=thr)
    V, Vm, G, Gm = _reference(r, m, thr)
    np.testing.assert_allclose(cv.verifier, V, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cv.generator, G, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(cv.verifier_mask, Vm)
    np.testing.assert_array_equal(cv.generator_mask, Gm)
    np.testing.assert_array_equal(cv.verifier_label, (V > thr) & Vm)
    np.testing.assert_array_equal(cv.generator_label, (G > thr) & Gm)
    np.testing.assert_array_equal(cv.leaf_label, (r > thr) & m)
    # Reference pair enumeration for V.
    ref_pairs = set()
    for q, i in itertools.product(range(5), range(3)):
        for a, b in itertools.product(range(3), range(3)):
            if Vm[q, i, a] and Vm[q, i, b] and V[q, i, a] > thr and not V[q, i, b] > thr:
                ref_pairs.add(((q, i, a), (q, i, b)))
    assert _as_set(dpo_pairs(cv, "V")) == ref_pairs
    # Per-question calls agree with the batched call.
    for q in range(5):
        cq = assign_credit(r[q : q + 1], m[q : q + 1], threshold=thr)
        np.testing.assert_allclose(cq.generator[0], cv.generator[q], rtol=1e-6)


def test_jit_and_dtypes():
    r = jnp.array(_worked_example()).astype(jnp.int32)  # int rewards accepted
    f = jax.jit(lambda x: assign_credit(x, threshold=0.5))
    cv = f(r)
    chex.assert_type(cv.verifier, jnp.float32)
    chex.assert_tree_all_finite((cv.leaf, cv.verifier, cv.generator))
    np.testing.assert_allclose(cv.verifier[0, 0], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    # Bool rewards, explicit mask, inside jit, pytree round-trip through jax.tree.map.
    cv_b = jax.jit(assign_credit)(jnp.asarray(_worked_example() > 0), jnp.ones((1, 1, 3, 3), bool))
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), cv_b), jax.tree.map(lambda x: x.astype(jnp.float32), cv)
    )
    with pytest.raises(ValueError):
        assign_credit(jnp.zeros((3, 3, 3)))
    with pytest.raises(ValueError):
        assign_credit(jnp.zeros((1, 1, 3, 3)), jnp.ones((1, 1, 3, 2), bool))


def test_roles_by_letter_or_name():
    cv = assign_credit(_worked_example())
    for letter, name in zip("GVR", NAMES):
        assert credit.role_depth(letter.lower()) == credit.role_depth(name)
        np.testing.assert_array_equal(cv.labels(letter), cv.labels(name.capitalize()))
    with pytest.raises(ValueError, match="unknown role"):
        credit.role_depth("critic")
