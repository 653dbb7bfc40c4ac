"""Tests for malt_jax.training.pg_loss: the clipped policy-gradient loss (PPO / GRPO / DAPO)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from malt_jax.credit.advantages import AdvantageConfig, group_advantages, tree_advantages
from malt_jax.training.pg_loss import LOSS_AGGREGATIONS, pg_loss, token_entropy


def _batch(seed: int = 0, b: int = 4, t: int = 6):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (b, t))).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    lengths = rng.integers(1, t + 1, b)
    lengths[-1] = 2
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    return logp, old, ref, mask, adv


def _normaliser(mask: np.ndarray, agg: str) -> np.ndarray:
    """d(loss)/d(logp[b, t]) = -adv[b] * mask[b, t] / normaliser[b, t] at ratio 1."""
    lengths = mask.sum(-1, keepdims=True)
    n_rows = (lengths > 0).sum()
    if agg == "token_mean":
        return np.full(mask.shape, mask.sum())
    if agg == "seq_mean":
        return np.broadcast_to(np.maximum(lengths, 1) * n_rows, mask.shape)
    return np.full(mask.shape, n_rows * mask.shape[1])


def test_kl_is_exactly_zero_at_the_reference():
    logp, old, _, mask, adv = _batch()
    for agg in LOSS_AGGREGATIONS:
        loss, m = pg_loss(jnp.asarray(logp), old, logp, mask, adv, kl_coef=0.5, loss_agg=agg)
        assert float(m["kl"]) == 0.0
        assert float(loss) == float(m["pg_loss"])


def test_kl_is_the_k3_estimator_and_loss_adds_it():
    logp, old, ref, mask, adv = _batch(1)
    d = ref.astype(np.float64) - logp
    k3 = np.exp(d) - d - 1
    loss, m = pg_loss(logp, old, ref, mask, adv, kl_coef=0.3, loss_agg="token_mean")
    assert float(m["kl"]) == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-5)
    assert float(m["kl"]) > 0
    assert float(loss) == pytest.approx(float(m["pg_loss"]) + 0.3 * float(m["kl"]), rel=1e-6)


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_on_policy_gradient_is_minus_adv_over_the_normaliser(agg):
    logp, _, ref, mask, adv = _batch(2)
    mask[1] = 0.0  # a padding row: no tokens, counts in no average
    expected = -adv[:, None] * mask / _normaliser(mask, agg)

    for old, kl_ref in ((logp, None), (None, None), (logp, logp)):  # explicit, implicit; KL at ref

        def f(lp, old=old, kl_ref=kl_ref):
            return pg_loss(lp, old, kl_ref, mask, adv, kl_coef=0.0 if kl_ref is None else 0.7, loss_agg=agg)

        (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
        assert float(m["clip_ratio"]) == 0.0
        assert float(m["clip_ratio/low_mean"]) == float(m["clip_ratio/high_mean"]) == 0.0
        # at ratio 1 the surrogate is -A per token: the loss is -agg(A)
        assert float(loss) == pytest.approx(float((expected * np.ones_like(logp)).sum()), rel=1e-5, abs=1e-7)


def test_aggregations_on_unequal_lengths():
    logp, old, _, mask, adv = _batch(3)
    ratio = np.exp(logp.astype(np.float64) - old)
    tok = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    want = {
        "token_mean": (tok * mask).sum() / mask.sum(),
        "seq_mean": ((tok * mask).sum(-1) / mask.sum(-1)).mean(),
        "seq_sum_norm": (tok * mask).sum() / mask.size,
    }
    for agg in LOSS_AGGREGATIONS:
        loss, m = pg_loss(logp, old, None, mask, adv, loss_agg=agg)
        assert float(loss) == pytest.approx(want[agg], rel=1e-5), agg
        assert "kl" not in m
    assert len({round(v, 6) for v in want.values()}) == 3


def _single_token_grad(ratio: float, a: float, **kw):
    old = jnp.zeros((1, 1))
    lp = jnp.log(jnp.full((1, 1), ratio))

    def f(x):
        return pg_loss(x, old, None, jnp.ones((1, 1)), jnp.array([a]), **kw)

    (_, m), g = jax.value_and_grad(f, has_aux=True)(lp)
    return float(g[0, 0]), m


@pytest.mark.parametrize(
    "ratio, a, clipped, side",
    [
        (1.5, +1.0, True, "high"),  # r > 1 + eps, A > 0: the clipped branch is the min -> no gradient
        (1.5, -1.0, False, None),  # r > 1 + eps, A < 0: unclipped (pessimistic) branch
        (0.5, -1.0, True, "low"),  # r < 1 - eps, A < 0: clipped
        (0.5, +1.0, False, None),  # r < 1 - eps, A > 0: unclipped
        (1.1, +1.0, False, None),  # inside the range
        (0.9, -1.0, False, None),
    ],
)
def test_clipping_follows_the_ppo_sign_conditions(ratio, a, clipped, side):
    g, m = _single_token_grad(ratio, a, clip_eps=0.2)
    if clipped:
        assert g == 0.0
    else:
        assert g == pytest.approx(-a * ratio, rel=1e-5)  # d(-r A)/d logp = -A r
    assert float(m["clip_ratio"]) == float(clipped)
    assert float(m["clip_ratio/high_mean"]) == float(side == "high")
    assert float(m["clip_ratio/low_mean"]) == float(side == "low")


def test_clip_higher_uses_the_separate_upper_epsilon():
    g, m = _single_token_grad(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28)  # DAPO: inside [0.8, 1.28]
    assert g == pytest.approx(-1.25, rel=1e-5) and float(m["clip_ratio"]) == 0.0
    g, _ = _single_token_grad(1.25, 1.0, clip_eps=0.2)
    assert g == 0.0
    g, _ = _single_token_grad(0.75, -1.0, clip_eps=0.2, clip_eps_high=0.28)  # the lower end stays 0.8
    assert g == 0.0


def test_masked_positions_cannot_leak_non_finite_values():
    logp, old, ref, mask, adv = _batch(4)
    bad = np.where(mask > 0, logp, -np.inf).astype(np.float32)
    bad_old = np.where(mask > 0, old, np.nan).astype(np.float32)
    bad_ref = np.where(mask > 0, ref, np.inf).astype(np.float32)

    def f(x, o, r):
        return pg_loss(x, o, r, mask, adv, kl_coef=0.1, loss_agg="seq_mean")

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(bad), bad_old, bad_ref)
    (loss2, _), g2 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), old, ref)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    np.testing.assert_allclose(g, g2)


def test_metrics_and_jit():
    logp, old, ref, mask, adv = _batch(5)
    logits = jax.random.normal(jax.random.key(0), logp.shape + (7,))
    ent = token_entropy(logits)
    f = functools.partial(pg_loss, kl_coef=0.05, clip_eps=0.2, clip_eps_high=0.28, loss_agg="seq_mean")
    loss, m = f(logp, old, ref, mask, adv, entropy=ent)
    loss_j, m_j = jax.jit(f)(logp, old, ref, mask, adv, entropy=ent)
    assert float(loss) == pytest.approx(float(loss_j), rel=1e-6)
    assert (
        set(m)
        == set(m_j)
        == {
            "loss",
            "pg_loss",
            "kl",
            "clip_ratio",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "completion_length",
            "advantage_mean",
            "entropy",
        }
    )
    assert float(m["completion_length"]) == pytest.approx(mask.sum(-1).mean())
    assert float(m["advantage_mean"]) == pytest.approx(adv.mean(), rel=1e-6)
    p = jax.nn.softmax(logits, -1)
    want_ent = (-(p * jnp.log(p)).sum(-1) * mask).sum() / mask.sum()
    assert float(m["entropy"]) == pytest.approx(float(want_ent), rel=1e-5)
    assert 0 < float(m["clip_ratio"]) < 1  # with 0.3-sd log-ratio noise some tokens are clipped


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"loss_agg": "mean"}, "loss_agg"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"clip_eps": float("inf")}, "clip_eps"),
        ({"clip_eps_high": -0.1}, "clip_eps_high"),
        ({"kl_coef": -1.0}, "kl_coef"),
    ],
)
def test_bad_options_are_refused_naming_them(kwargs, name):
    logp, old, ref, mask, adv = _batch()
    with pytest.raises(ValueError, match=rf"^pg_loss: {name} "):
        pg_loss(logp, old, ref, mask, adv, **kwargs)


def test_kl_without_a_reference_and_bad_shapes_are_refused():
    logp, old, ref, mask, adv = _batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        pg_loss(logp, old, None, mask, adv, kl_coef=0.1)
    with pytest.raises(ValueError, match="adv must be"):
        pg_loss(logp, old, ref, mask, adv[:2])
    with pytest.raises(ValueError, match="ref_logp shape"):
        pg_loss(logp, old, ref[:, :2], mask, adv)


# ----------------------------------------------------------------------------------------------
# Gradient through a tiny policy against central finite differences, in float64.
# ----------------------------------------------------------------------------------------------


def _tiny_policy_logp(w: jax.Array, feats: jax.Array, tokens: jax.Array) -> jax.Array:
    """A linear softmax policy: logits = feats @ w; log-prob of the sampled tokens."""
    logits = feats @ w  # [B, T, V]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_parameter_gradient_matches_finite_differences_in_float64(agg):
    with jax.enable_x64(True):
        b, t, d, v = 4, 5, 3, 6
        keys = jax.random.split(jax.random.key(1), 6)
        w = jax.random.normal(keys[0], (d, v), jnp.float64)
        w_old = w + 0.4 * jax.random.normal(keys[1], (d, v), jnp.float64)
        w_ref = w + 0.4 * jax.random.normal(keys[2], (d, v), jnp.float64)
        feats = jax.random.normal(keys[3], (b, t, d), jnp.float64)
        tokens = jax.random.randint(keys[4], (b, t), 0, v)
        adv = jax.random.normal(keys[5], (b,), jnp.float64)
        mask = (jnp.arange(t)[None, :] < jnp.array([5, 3, 1, 4])[:, None]).astype(jnp.float64)
        old = _tiny_policy_logp(w_old, feats, tokens)
        ref = _tiny_policy_logp(w_ref, feats, tokens)

        @jax.jit
        def loss_fn(params):
            lp = _tiny_policy_logp(params, feats, tokens)
            loss, m = pg_loss(lp, old, ref, mask, adv, clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.1, loss_agg=agg)
            return loss, m

        (loss, m), grad = jax.value_and_grad(loss_fn, has_aux=True)(w)
        assert loss.dtype == grad.dtype == jnp.float64
        ratio = np.exp(np.asarray(_tiny_policy_logp(w, feats, tokens) - old))
        live = np.asarray(mask) > 0
        # no ratio sits on a clip boundary (a kink of the loss), and both branches are exercised
        assert np.min(np.abs(ratio[live] - 0.8)) > 1e-3 and np.min(np.abs(ratio[live] - 1.28)) > 1e-3
        assert 0 < float(m["clip_ratio"]) < 1

        h = 1e-6
        steps = h * jnp.eye(d * v, dtype=jnp.float64).reshape(d * v, d, v)  # one entry of w per row
        up = jax.vmap(lambda e: loss_fn(w + e)[0])(steps)
        down = jax.vmap(lambda e: loss_fn(w - e)[0])(steps)
        fd = ((up - down) / (2 * h)).reshape(d, v)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
        assert np.abs(fd).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# End to end: a one-question bandit whose optimum is known.
# ----------------------------------------------------------------------------------------------

BANDIT_REWARDS = jnp.array([0.0, 0.0, 1.0, 0.0])  # four "answers"; only answer 2 is right


def _bandit_run(cfg: AdvantageConfig, via_tree: bool, loss_agg: str, steps: int = 150, group: int = 8):
    """GRPO on a softmax policy over the 4 answers: sample a group of answers, score them, compute
    group-relative advantages, take ``ppo_epochs`` clipped steps on the group (the behaviour
    policy fixed), with a small KL to the uniform reference policy."""
    opt = optax.adam(0.1)
    ref_logp = jnp.full((group, 1), jnp.log(0.25))
    mask = jnp.ones((group, 1))
    ppo_epochs = 2

    def logp_of(theta, answers):
        return jax.nn.log_softmax(theta)[answers][:, None]  # [B, T=1]

    def step(carry, key):
        theta, state = carry
        answers = jax.random.categorical(key, theta, shape=(group,))
        rewards = BANDIT_REWARDS[answers]
        if via_tree:  # n = group answers; every critique / refinement keeps the answer's reward
            tree = jnp.broadcast_to(rewards[None, :, None, None], (1, group, 2, 2))
            adv = tree_advantages(tree, config=cfg).generator[0]
        else:
            adv = group_advantages(rewards[None, :], config=cfg)[0][0]
        old = logp_of(theta, answers)
        for _ in range(ppo_epochs):

            def loss_fn(th, answers=answers, adv=adv, old=old):
                lp = logp_of(th, answers)
                return pg_loss(lp, old, ref_logp, mask, adv, clip_eps=0.2, kl_coef=0.01, loss_agg=loss_agg)

            grads, metrics = jax.grad(loss_fn, has_aux=True)(theta)
            updates, state = opt.update(grads, state, theta)
            theta = optax.apply_updates(theta, updates)
        return (theta, state), metrics["clip_ratio"]

    theta0 = jnp.zeros(4)
    (theta, _), clip = jax.jit(lambda k: jax.lax.scan(step, (theta0, opt.init(theta0)), jax.random.split(k, steps)))(
        jax.random.key(0)
    )
    return jax.nn.softmax(theta), clip


@pytest.mark.parametrize(
    "cfg, via_tree, loss_agg",
    [
        (AdvantageConfig("mean", "std"), True, "seq_mean"),  # GRPO, G-only tree n=8, m=l=2
        (AdvantageConfig("loo", "none"), False, "token_mean"),  # RLOO / Dr. GRPO, group helper
    ],
    ids=["grpo-tree", "rloo-group"],
)
def test_a_one_question_bandit_converges_to_the_right_answer(cfg, via_tree, loss_agg):
    probs, _ = _bandit_run(cfg, via_tree, loss_agg)
    assert float(probs[2]) > 0.9, probs
