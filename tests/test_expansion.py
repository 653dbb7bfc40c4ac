"""Tree expansion: prefix-extended / forked caches give exactly the naive re-prefill samples."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import ModelConfig, SamplingConfig
from malt_jax.model import llama
from malt_jax.sampling import decode as sampling, expansion

CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def setup():
    params = llama.init_params(CFG, jax.random.key(0), std=0.25)
    rng = np.random.default_rng(0)
    qs = [rng.integers(3, 256, k).tolist() for k in (5, 9)]
    x, lens = sampling.pad_batch(qs, bucket=8)
    turns = (jnp.asarray([1, 7, 8, 9]), jnp.asarray([1, 10, 11]))
    return params, jnp.asarray(x), jnp.asarray(lens), turns


def _spec(mode, **kw):
    base = dict(
        n=2,
        m=2,
        l=3,
        max_new=(6, 5, 4),
        sampling=SamplingConfig(temperature=1.0),
        stop=sampling.StopCriteria(stop_ids=(2,)),
        mode=mode,
    )
    base.update(kw)
    return expansion.ExpansionSpec(**base)


def _run(setup, mode, adapters=(None, None, None), **kw):
    params, x, lens, turns = setup
    return expansion.expand(params, adapters, x, lens, turns, sampling.row_keys(11, 2), cfg=CFG, spec=_spec(mode, **kw))


def test_tree_shapes(setup):
    t = _run(setup, "extend")
    chex.assert_shape(t.tokens[0], (2, 2, 6))
    chex.assert_shape(t.tokens[1], (2, 2, 2, 5))
    chex.assert_shape(t.tokens[2], (2, 2, 2, 3, 4))
    chex.assert_shape(t.lengths[2], (2, 2, 2, 3))
    # siblings differ (they have their own keys)
    r = np.asarray(t.tokens[2])
    assert not all(np.array_equal(r[0, 0, 0, 0], r[0, 0, 0, k]) for k in (1, 2))


def test_extend_fork_naive_agree(setup):
    a, b, c = (_run(setup, m) for m in ("extend", "fork", "naive"))
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(a.tokens[level]), np.asarray(c.tokens[level]))
        np.testing.assert_array_equal(np.asarray(b.tokens[level]), np.asarray(c.tokens[level]))
        np.testing.assert_allclose(np.asarray(a.logps[level]), np.asarray(c.logps[level]), atol=2e-4)


def _leaf_key(q, path, fans=(2, 2, 3)):
    key = sampling.row_keys(11, 2)[q]
    for fan, idx in zip(fans, path):
        key = expansion._child_keys(key[None], fan)[idx]
    return jax.random.fold_in(key, 0xA11CE)


def _generate(params, ctx, key, n):
    xs, ls = sampling.pad_batch([ctx], bucket=8)
    out = sampling.generate(
        params,
        jnp.asarray(xs),
        jnp.asarray(ls),
        key[None],
        cfg=CFG,
        sampling=SamplingConfig(temperature=1.0),
        stop=sampling.StopCriteria(stop_ids=(2,)),
        max_new_tokens=n,
    )
    return sampling.trim(out)[0]


def test_tree_rows_equal_flat_generation_of_full_context(setup):
    """Each refiner leaf equals a plain generate() on its full context with the leaf's key."""
    params, x, lens, turns = setup
    spec = _spec("extend")
    t = expansion.expand(params, (None,) * 3, x, lens, turns, sampling.row_keys(11, 2), cfg=CFG, spec=spec)
    q, i, j, k = 1, 1, 0, 2
    g = np.asarray(t.tokens[0][q, i])[: int(t.lengths[0][q, i])].tolist()
    v = np.asarray(t.tokens[1][q, i, j])[: int(t.lengths[1][q, i, j])].tolist()
    ctx = np.asarray(x[q])[: int(lens[q])].tolist() + g + turns[0].tolist() + v + turns[1].tolist()
    want = np.asarray(t.tokens[2][q, i, j, k])[: int(t.lengths[2][q, i, j, k])].tolist()
    assert _generate(params, ctx, _leaf_key(q, (i, j, k)), 4) == want


@pytest.mark.parametrize("top_layers", [0, 1])
def test_per_role_adapters_fork_equals_naive(setup, top_layers):
    """Per-role adapters on every layer (each level re-encodes its context) or on the top layer
    only (each level keeps its parent's cache and recomputes the top layer): same samples as
    naive re-encoding."""
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    adapters = []
    for r in range(3):
        a = lora.init_lora(CFG, LoraConfig(rank=2, top_layers=top_layers), jax.random.key(r))
        a = jax.tree.map(lambda w, r=r: w + 0.3 * jax.random.normal(jax.random.key(9 + r), w.shape), a)
        adapters.append(a)
    f = _run(setup, "fork", tuple(adapters))
    n = _run(setup, "naive", tuple(adapters))
    base = _run(setup, "naive")
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(n.tokens[level]))
    assert not np.array_equal(np.asarray(f.tokens[2]), np.asarray(base.tokens[2]))
    with pytest.raises(ValueError, match="extend"):
        _run(setup, "extend", tuple(adapters))


def test_generator_only_depth(setup):
    t = _run(setup, "extend", depth=1, n=3)
    assert len(t.tokens) == 1
    chex.assert_shape(t.tokens[0], (2, 3, 6))


# ----------------------------------------------------------------------------------------------
# separate framing: every role has its own prompt that quotes the earlier outputs


def _contexts(seed=3):
    rng = np.random.default_rng(seed)
    pv = [rng.integers(3, 256, k).tolist() for k in (7, 4)]  # V prefixes (hold the question)
    pr = [rng.integers(3, 256, k).tolist() for k in (3, 10)]  # R prefixes
    (xv, lv), (xr, lr) = sampling.pad_batch(pv, bucket=8), sampling.pad_batch(pr, bucket=8)
    seps = ((jnp.asarray([1, 21, 22]),), (jnp.asarray([1, 23]), jnp.asarray([1, 24, 25, 26])))
    ctx = expansion.Contexts(
        prefixes=(jnp.asarray(xv), jnp.asarray(xr)), prefix_lens=(jnp.asarray(lv), jnp.asarray(lr)), seps=seps
    )
    return ctx, pv, pr, seps


def _run_sep(setup, mode, adapters=(None, None, None), **kw):
    params, x, lens, _ = setup
    return expansion.expand(
        params,
        adapters,
        x,
        lens,
        None,
        sampling.row_keys(11, 2),
        cfg=CFG,
        spec=_spec(mode, **kw),
        contexts=_contexts()[0],
    )


def test_separate_framing_sharing_equals_naive(setup):
    a, c = _run_sep(setup, "extend"), _run_sep(setup, "naive")
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(a.tokens[level]), np.asarray(c.tokens[level]))
        np.testing.assert_array_equal(np.asarray(a.lengths[level]), np.asarray(c.lengths[level]))
        np.testing.assert_allclose(np.asarray(a.logps[level]), np.asarray(c.logps[level]), atol=2e-4)
    # the generator level sees the same prompt in both framings
    chat = _run(setup, "extend")
    np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(chat.tokens[0]))
    assert not np.array_equal(np.asarray(a.tokens[2]), np.asarray(chat.tokens[2]))


def test_separate_framing_leaf_equals_generate_on_its_own_context(setup):
    """A refiner leaf equals generate() on prefix_R + g + sep + v + sep, the verifier node on
    prefix_V + g + sep: each role sees its own prompt, not the generator's chat."""
    params, x, lens, _ = setup
    spec = _spec("extend")
    ctx, pv, pr, seps = _contexts()
    t = expansion.expand(params, (None,) * 3, x, lens, None, sampling.row_keys(11, 2), cfg=CFG, spec=spec, contexts=ctx)
    q, i, j, k = 1, 0, 1, 2
    g = np.asarray(t.tokens[0][q, i])[: int(t.lengths[0][q, i])].tolist()
    v = np.asarray(t.tokens[1][q, i, j])[: int(t.lengths[1][q, i, j])].tolist()
    key = sampling.row_keys(11, 2)[q]
    keys = []
    for fan, idx in zip((2, 2, 3), (i, j, k)):
        key = expansion._child_keys(key[None], fan)[idx]
        keys.append(jax.random.fold_in(key, 0xA11CE))
    cases = [
        (pv[q] + g + seps[0][0].tolist(), keys[1], 5, t.tokens[1][q, i, j], t.lengths[1][q, i, j]),
        (
            pr[q] + g + seps[1][0].tolist() + v + seps[1][1].tolist(),
            keys[2],
            4,
            t.tokens[2][q, i, j, k],
            t.lengths[2][q, i, j, k],
        ),
    ]
    for full, key, n, want, want_len in cases:
        xs, ls = sampling.pad_batch([full], bucket=8)
        out = sampling.generate(
            params,
            jnp.asarray(xs),
            jnp.asarray(ls),
            key[None],
            cfg=CFG,
            sampling=spec.sampling,
            stop=spec.stop,
            max_new_tokens=n,
        )
        assert sampling.trim(out)[0] == np.asarray(want)[: int(want_len)].tolist()


def test_separate_framing_per_role_adapters_equal_naive(setup):
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    adapters = tuple(
        jax.tree.map(
            lambda w, r=r: w + 0.3 * jax.random.normal(jax.random.key(9 + r), w.shape),
            lora.init_lora(CFG, LoraConfig(rank=2, top_layers=1), jax.random.key(r)),
        )
        for r in range(3)
    )
    f, n = _run_sep(setup, "fork", adapters), _run_sep(setup, "naive", adapters)
    base = _run_sep(setup, "naive")
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(n.tokens[level]))
    assert not np.array_equal(np.asarray(f.tokens[2]), np.asarray(base.tokens[2]))


def test_separate_framing_holds_one_level_of_cache_at_a_time():
    """Each level's cache is created only after the previous level is sampled: XLA's peak for a
    3-level separate-framing expansion stays below the three levels' caches together (it used
    to hold all of them from the start: the forked prefix caches depend on no earlier level)."""
    # many layers and wide heads: the caches, not activations, are what the expansion holds
    cfg = ModelConfig.tiny(n_layers=8, n_heads=2, n_kv_heads=2, head_dim=64, dim=128)
    Q, votes, Tq, P1, P2, new = 64, 3, 32, 48, 64, (32, 32, 16)
    S = jax.ShapeDtypeStruct
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), Q))
    sep = S((4,), jnp.int32)
    ctx = expansion.Contexts(
        prefixes=(S((Q, P1), jnp.int32), S((Q, P2), jnp.int32)),
        prefix_lens=(S((Q,), jnp.int32), S((Q,), jnp.int32)),
        seps=((sep,), (sep, sep)),
    )
    spec = expansion.ExpansionSpec(
        n=votes, m=1, l=1, max_new=new, depth=3, sampling=SamplingConfig(temperature=0.7, compact_levels=0)
    )
    compiled = expansion.expand.lower(
        params,
        (None, None, None),
        S((Q, Tq), jnp.int32),
        S((Q,), jnp.int32),
        (sep, sep),
        keys,
        cfg=cfg,
        spec=spec,
        contexts=ctx,
    ).compile()
    slots = [Tq + new[0], P1 + new[0] + 4 + new[1], P2 + new[0] + new[1] + 8 + new[2]]  # per level
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # k and v, float32
    caches = [Q * votes * s * per_slot for s in slots]
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert max(caches) < temp < sum(caches), (temp, caches)


# ----------------------------------------------------------------------------------------------
# an empty level (ExpansionSpec.empty_levels): the role ablation G -> (no critique) -> R


def _role_adapters(top_layers):
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    return tuple(
        jax.tree.map(
            lambda w, r=r: w + 0.3 * jax.random.normal(jax.random.key(9 + r), w.shape),
            lora.init_lora(CFG, LoraConfig(rank=2, top_layers=top_layers), jax.random.key(r)),
        )
        for r in range(3)
    )


def _assert_empty_verifier(t, full):
    """Level 1 wrote nothing (length 0, PAD tokens still max_new wide, stopped), level 0 as sampled
    with the verifier."""
    chex.assert_shape(t.tokens[1], (2, 2, 2, 5))
    assert not np.asarray(t.lengths[1]).any()
    assert (np.asarray(t.tokens[1]) == sampling.PAD_ID).all() and not np.asarray(t.logps[1]).any()
    assert np.asarray(t.stopped[1]).all()
    np.testing.assert_array_equal(np.asarray(t.tokens[0]), np.asarray(full.tokens[0]))
    assert np.asarray(t.lengths[2]).any()


def test_empty_levels_are_checked():
    for bad in ((0,), (1, 1), (3,)):
        with pytest.raises(ValueError, match="empty_levels"):
            _spec("extend", empty_levels=bad)
    assert _spec("extend", empty_levels=(1,)).budgets == (6, 0, 4)


def test_empty_verifier_level_chat_every_mode_equals_generate_on_the_empty_turn(setup):
    """Chat framing, every mode: V writes nothing, and each refiner leaf equals generate() on
    question + g + V turn + R turn (nothing between them) with the leaf's usual key."""
    params, x, lens, turns = setup
    full = _run(setup, "naive")
    runs = {m: _run(setup, m, empty_levels=(1,)) for m in ("extend", "fork", "naive")}
    for t in runs.values():
        _assert_empty_verifier(t, full)
        for level in range(3):
            np.testing.assert_array_equal(np.asarray(t.tokens[level]), np.asarray(runs["naive"].tokens[level]))
            np.testing.assert_array_equal(np.asarray(t.lengths[level]), np.asarray(runs["naive"].lengths[level]))
    t = runs["extend"]
    for q, i, j, k in ((1, 1, 0, 2), (0, 0, 1, 1)):
        g = np.asarray(t.tokens[0][q, i])[: int(t.lengths[0][q, i])].tolist()
        ctx = np.asarray(x[q])[: int(lens[q])].tolist() + g + turns[0].tolist() + turns[1].tolist()
        want = np.asarray(t.tokens[2][q, i, j, k])[: int(t.lengths[2][q, i, j, k])].tolist()
        assert _generate(params, ctx, _leaf_key(q, (i, j, k)), 4) == want


@pytest.mark.parametrize("top_layers", [0, 1])
def test_empty_verifier_level_chat_with_role_adapters(setup, top_layers):
    """Per-role adapters ("fork", re-encoding or refreshing the top layers): the same samples as
    naive, and V's adapter changes nothing (V does not run)."""
    adapters = _role_adapters(top_layers)
    f = _run(setup, "fork", adapters, empty_levels=(1,))
    n = _run(setup, "naive", adapters, empty_levels=(1,))
    no_v = _run(setup, "fork", (adapters[0], None, adapters[2]), empty_levels=(1,))
    assert not np.asarray(f.lengths[1]).any() and np.asarray(f.lengths[2]).any()
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(n.tokens[level]))
        np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(no_v.tokens[level]))


def test_empty_verifier_level_separate_equals_generate_on_the_empty_critique(setup):
    """Separate framing: V writes nothing (no cache is built for it), every mode gives the same
    samples (with role adapters too), and each refiner leaf equals generate() on
    prefix_R + g + sep + sep (the critique empty) with the leaf's usual key."""
    params, x, lens, _ = setup
    _, pv, pr, seps = _contexts()
    t = _run_sep(setup, "extend", empty_levels=(1,))
    _assert_empty_verifier(t, _run_sep(setup, "extend"))
    naive = _run_sep(setup, "naive", empty_levels=(1,))
    adapters = _role_adapters(0)
    f, fn = (_run_sep(setup, m, adapters, empty_levels=(1,)) for m in ("fork", "naive"))
    assert not np.asarray(f.lengths[1]).any()
    for level in range(3):
        np.testing.assert_array_equal(np.asarray(t.tokens[level]), np.asarray(naive.tokens[level]))
        np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(fn.tokens[level]))
    for q, i, j, k in ((1, 0, 1, 2), (0, 1, 0, 0)):
        g = np.asarray(t.tokens[0][q, i])[: int(t.lengths[0][q, i])].tolist()
        ctx = pr[q] + g + seps[1][0].tolist() + seps[1][1].tolist()
        want = np.asarray(t.tokens[2][q, i, j, k])[: int(t.lengths[2][q, i, j, k])].tolist()
        assert _generate(params, ctx, _leaf_key(q, (i, j, k)), 4) == want
