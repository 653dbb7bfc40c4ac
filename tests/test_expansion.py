"""Tree expansion: prefix-extended / forked caches give exactly the naive re-prefill samples."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax import expansion, sampling
from malt_jax.config import ModelConfig, SamplingConfig
from malt_jax.model import llama

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
    base = dict(n=2, m=2, l=3, max_new=(6, 5, 4), sampling=SamplingConfig(temperature=1.0),
                stop=sampling.StopCriteria(stop_ids=(2,)), mode=mode)
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


def test_tree_rows_equal_flat_generation_of_full_context(setup):
    """Each refiner leaf equals a plain generate() on its full context with the leaf's key."""
    params, x, lens, turns = setup
    spec = _spec("extend")
    t = expansion.expand(params, (None,) * 3, x, lens, turns, sampling.row_keys(11, 2), cfg=CFG, spec=spec)
    q, i, j, k = 1, 1, 0, 2
    g = np.asarray(t.tokens[0][q, i])[: int(t.lengths[0][q, i])].tolist()
    v = np.asarray(t.tokens[1][q, i, j])[: int(t.lengths[1][q, i, j])].tolist()
    ctx = np.asarray(x[q])[: int(lens[q])].tolist() + g + turns[0].tolist() + v + turns[1].tolist()
    key = sampling.row_keys(11, 2)[q]
    for fan, idx in zip((2, 2, 3), (i, j, k)):
        key = expansion._child_keys(key[None], fan)[idx]
    key = jax.random.fold_in(key, 0xA11CE)
    xs, ls = sampling.pad_batch([ctx], bucket=8)
    out = sampling.generate(params, jnp.asarray(xs), jnp.asarray(ls), key[None], cfg=CFG, sampling=spec.sampling,
                            stop=spec.stop, max_new_tokens=4)
    assert sampling.trim(out)[0] == np.asarray(t.tokens[2][q, i, j, k])[: int(t.lengths[2][q, i, j, k])].tolist()


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
        a = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(9 + r), w.shape), a)
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
