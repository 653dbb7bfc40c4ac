"""Tests for malt_jax.training.losses against independent NumPy formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.training.losses import dpo_loss, sequence_logps, sft_loss, token_logps

B, T, V = 3, 5, 7


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mx = x.max(-1, keepdims=True)
    return x - mx - np.log(np.exp(x - mx).sum(-1, keepdims=True))


def np_logsigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[0, 2:] = 1  # prompt of 2, completion of 3
    mask[1, 1:4] = 1  # padded tail
    mask[2, :] = 1
    return logits, targets, mask


def test_token_logps_matches_numpy():
    logits, targets, _ = _data()
    lp = token_logps(jnp.asarray(logits), jnp.asarray(targets))
    chex.assert_shape(lp, (B, T))
    chex.assert_type(lp, jnp.float32)
    ref = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)


def test_sft_loss_matches_numpy_masked_ce():
    logits, targets, mask = _data(1)
    loss, m = jax.jit(sft_loss)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    chex.assert_shape(loss, ())
    ref_lp = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    ref = -(ref_lp * mask).sum() / mask.sum()
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(m["n_tokens"], mask.sum())
    np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)
    # Accuracy = 1 when the targets are the argmax.
    _, m2 = sft_loss(jnp.asarray(logits), jnp.asarray(logits.argmax(-1)), jnp.asarray(mask))
    np.testing.assert_allclose(m2["accuracy"], 1.0)
    # sequence_logps = sum of counted token logps.
    sl = sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    chex.assert_shape(sl, (B,))
    np.testing.assert_allclose(sl, (ref_lp * mask).sum(-1), rtol=1e-5, atol=1e-5)


def test_masked_positions_are_irrelevant():
    logits, targets, mask = _data(2)
    base, _ = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    base_seq = sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    l2 = logits.copy()
    t2 = targets.copy()
    off = mask == 0
    l2[off] = np.random.default_rng(9).normal(size=l2[off].shape) * 100
    l2[0, 0, 0] = np.inf  # even non-finite garbage at a masked position
    t2[off] = 0
    new, _ = sft_loss(jnp.asarray(l2), jnp.asarray(t2), jnp.asarray(mask))
    new_seq = sequence_logps(jnp.asarray(l2), jnp.asarray(t2), jnp.asarray(mask))
    np.testing.assert_allclose(new, base, rtol=1e-6)
    np.testing.assert_allclose(new_seq, base_seq, rtol=1e-6)
    # Gradient w.r.t. masked logits is zero.
    g = jax.grad(lambda x: sft_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0])(jnp.asarray(logits))
    assert float(jnp.abs(g[jnp.asarray(off)]).max()) == 0.0


def test_bf16_logits():
    logits, targets, mask = _data(3)
    lb = jnp.asarray(logits, jnp.bfloat16)
    lp = token_logps(lb, jnp.asarray(targets))
    chex.assert_type(lp, jnp.float32)
    ref = np.take_along_axis(np_log_softmax(np.asarray(lb.astype(jnp.float32))), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
    loss, m = sft_loss(lb, jnp.asarray(targets), jnp.asarray(mask))
    chex.assert_type(loss, jnp.float32)
    chex.assert_tree_all_finite(m)
    chex.assert_shape(sequence_logps(lb, jnp.asarray(targets), jnp.asarray(mask)), (B,))


def _np_dpo(pc, pr, rc, rr, beta, loss_type, eps, w=None):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -np_logsigmoid(beta * logits) * (1 - eps) - np_logsigmoid(-beta * logits) * eps
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    w = np.ones_like(losses) if w is None else np.asarray(w, np.float64)

    def mean(x):
        return (x * w).sum() / w.sum()

    return {
        "loss": mean(losses),
        "rewards/chosen": mean(cr),
        "rewards/rejected": mean(rj),
        "rewards/accuracies": mean((cr > rj).astype(np.float64)),
        "rewards/margins": mean(cr - rj),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }


def _logps(seed, n=6):
    rng = np.random.default_rng(seed)
    return [(-rng.random(n) * 40).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.2, 0.0), ("sigmoid", 0.1, 0.0), ("sigmoid", 0.2, 0.15), ("ipo", 0.2, 0.0), ("ipo", 0.5, 0.0)],
)
def test_dpo_matches_numpy(loss_type, beta, eps):
    pc, pr, rc, rr = _logps(4)
    loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref = _np_dpo(pc, pr, rc, rr, beta, loss_type, eps)
    assert set(m) == set(ref)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5, atol=1e-6)
    for k, v in ref.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_dpo_extreme_logits_stable():
    pc = jnp.array([0.0, -5000.0])
    pr = jnp.array([-5000.0, 0.0])
    z = jnp.zeros(2)
    loss, m = dpo_loss(pc, pr, z, z, beta=0.5)
    chex.assert_tree_all_finite((loss, m))
    ref = _np_dpo(pc, pr, z, z, 0.5, "sigmoid", 0.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)


def test_dpo_weights_ignore_padded_rows():
    pc, pr, rc, rr = _logps(5)
    w = np.array([1, 1, 1, 0, 0, 1], np.float32)
    loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), weights=jnp.asarray(w))
    keep = w > 0
    ref = _np_dpo(pc[keep], pr[keep], rc[keep], rr[keep], 0.2, "sigmoid", 0.0)
    for k, v in ref.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    # Garbage (even nan) in padded rows does not matter.
    pc2 = pc.copy()
    pc2[~keep] = np.nan
    loss2, _ = dpo_loss(*map(jnp.asarray, (pc2, pr, rc, rr)), weights=jnp.asarray(w))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    # Fractional weights: weighted mean.
    wf = np.array([0.5, 1, 2, 0, 1, 1], np.float32)
    _, mf = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), weights=jnp.asarray(wf), loss_type="ipo")
    reff = _np_dpo(pc, pr, rc, rr, 0.2, "ipo", 0.0, wf)
    for k, v in reff.items():
        np.testing.assert_allclose(mf[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_gradient_sign(loss_type):
    pc, pr, rc, rr = map(jnp.asarray, _logps(6))

    def f(pc_, pr_):
        return dpo_loss(pc_, pr_, rc, rr, beta=0.2, loss_type=loss_type)[0]

    gc, gr = jax.jit(jax.grad(f, argnums=(0, 1)))(pc, pr)
    # Increasing chosen logp lowers the loss; increasing rejected logp raises it (IPO: only
    # while the margin is below the 1/(2 beta) target).
    if loss_type == "sigmoid":
        assert bool((gc < 0).all()) and bool((gr > 0).all())
    else:
        below = ((pc - pr) - (rc - rr)) < 1 / (2 * 0.2)
        assert bool((gc[below] < 0).all()) and bool((gr[below] > 0).all())
    np.testing.assert_allclose(gc, -gr, rtol=1e-6)
    l0 = f(pc, pr)
    l1 = f(pc + 0.01 * jnp.where((pc - pr) - (rc - rr) < 2.5, 1.0, 0.0), pr)
    assert float(l1) < float(l0)
    # Metrics carry no gradient.
    gm = jax.grad(lambda x: dpo_loss(x, pr, rc, rr)[1]["rewards/margins"])(pc)
    np.testing.assert_array_equal(gm, 0.0)


def test_dpo_zero_logits_sigmoid_is_log2():
    z = jnp.zeros(4)
    loss, m = dpo_loss(z, z, z, z)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.0)
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, loss_type="hinge")


def test_rpo_adds_the_chosen_completions_per_token_nll():
    """rpo_alpha > 0: loss = DPO loss + alpha * weighted mean of -logp(chosen) / its token count
    (TRL's rpo_alpha); alpha 0 is plain DPO; the NLL term's gradient raises the chosen log-prob."""
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 3, 5), jnp.float32) for _ in range(4))
    n = jnp.asarray([4, 7, 1, 9, 3], jnp.float32)
    w = jnp.asarray([1.0, 0.5, 2.0, 0.0, 1.0])
    plain, m0 = dpo_loss(pc, pr, rc, rr, beta=0.2, weights=w)
    with_rpo, m1 = dpo_loss(pc, pr, rc, rr, beta=0.2, weights=w, rpo_alpha=0.7, chosen_tokens=n)
    keep = np.asarray(w) > 0
    nll = float(np.sum((-np.asarray(pc) / np.asarray(n) * np.asarray(w))[keep]) / np.asarray(w).sum())
    assert float(m1["nll_loss"]) == pytest.approx(nll, rel=1e-5)
    assert float(with_rpo) == pytest.approx(float(plain) + 0.7 * nll, rel=1e-5)
    assert "nll_loss" not in m0 and float(dpo_loss(pc, pr, rc, rr, beta=0.2, weights=w, rpo_alpha=0.0)[0]) == float(
        plain
    )
    g0 = jax.grad(lambda c: dpo_loss(c, pr, rc, rr, beta=0.2, weights=w)[0])(pc)
    g1 = jax.grad(lambda c: dpo_loss(c, pr, rc, rr, beta=0.2, weights=w, rpo_alpha=0.7, chosen_tokens=n)[0])(pc)
    expected = np.where(keep, -0.7 * np.asarray(w) / np.asarray(n) / np.asarray(w).sum(), 0.0)
    np.testing.assert_allclose(np.asarray(g1 - g0), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pc, pr, rc, rr, rpo_alpha=0.5)
