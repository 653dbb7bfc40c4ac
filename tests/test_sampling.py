"""Sampler correctness: cache vs recompute, log-probs, padding invariance, stops, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import ModelConfig, SamplingConfig
from malt_jax.model import llama
from malt_jax.sampling import decode as sampling
from malt_jax.sampling.decode import StopCriteria

CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0), std=0.25)


def _prompts(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, rng.integers(2, 11)).tolist() for _ in range(n)]


def _greedy_no_cache(params, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        logits, _ = llama.forward(params, jnp.asarray([seq]), llama.causal_positions(1, len(seq)), CFG)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) :]


def _gen(params, prompts, sc, keys=None, stop=StopCriteria(), n=12, bucket=16):
    x, lens = sampling.pad_batch(prompts, bucket=bucket)
    keys = sampling.row_keys(0, len(prompts)) if keys is None else keys
    return sampling.generate(
        params, jnp.asarray(x), jnp.asarray(lens), keys, cfg=CFG, sampling=sc, stop=stop, max_new_tokens=n
    )


def test_greedy_cache_equals_recompute(params):
    prompts = _prompts()
    g = _gen(params, prompts, SamplingConfig(greedy=True))
    chex.assert_shape(g.tokens, (4, 12))
    for row, p in zip(sampling.trim(g), prompts):
        assert row == _greedy_no_cache(params, p, 12)


def test_logps_match_teacher_forcing(params):
    prompts = _prompts(seed=1)
    g = _gen(params, prompts, SamplingConfig(temperature=1.0))
    for i, (p, out) in enumerate(zip(prompts, sampling.trim(g))):
        seq = jnp.asarray([p + out])
        logits, _ = llama.forward(params, seq, llama.causal_positions(1, seq.shape[1]), CFG)
        lp = jax.nn.log_softmax(logits[0, len(p) - 1 : -1], -1)
        ref = np.take_along_axis(np.asarray(lp), np.asarray(out)[:, None], 1)[:, 0]
        np.testing.assert_allclose(np.asarray(g.logps[i, : len(out)]), ref, rtol=1e-4, atol=1e-4)


def test_padding_and_batch_invariance(params):
    """A row's sample depends only on its prompt and key, not on pad width or batch mates."""
    prompts = _prompts(seed=2)
    keys = sampling.row_keys(7, 4)
    sc = SamplingConfig(temperature=1.0, top_k=50)
    a = sampling.trim(_gen(params, prompts, sc, keys, bucket=16))
    b = sampling.trim(_gen(params, prompts, sc, keys, bucket=32))
    c = sampling.trim(_gen(params, prompts[2:3], sc, keys[2:3], bucket=16))
    assert a == b
    assert c[0] == a[2]


def test_stop_tokens_and_sequences_per_row(params):
    prompts = _prompts(seed=3)
    free = sampling.trim(_gen(params, prompts, SamplingConfig(greedy=True)))
    # stop id = the 4th token of row 0: row 0 stops before it, others stop at its first occurrence
    stop_tok = free[0][3]
    g = _gen(params, prompts, SamplingConfig(greedy=True), stop=StopCriteria(stop_ids=(stop_tok,)))
    out = sampling.trim(g)
    for row, full in zip(out, free):
        cut = full.index(stop_tok) if stop_tok in full else len(full)
        assert row == full[:cut]
    assert bool(g.stopped[0]) and out[0] == free[0][:3]
    # a stop sequence (two tokens of row 1) is kept in the output
    seq = tuple(free[1][4:6])
    g2 = _gen(params, prompts, SamplingConfig(greedy=True), stop=StopCriteria(stop_seqs=(seq,)))
    assert sampling.trim(g2)[1] == free[1][:6]
    assert int(g2.end_pos[1]) == len(prompts[1]) + 6


def test_top_k1_and_tiny_top_p_are_greedy(params):
    prompts = _prompts(seed=4)
    greedy = sampling.trim(_gen(params, prompts, SamplingConfig(greedy=True)))
    assert sampling.trim(_gen(params, prompts, SamplingConfig(temperature=1.0, top_k=1))) == greedy
    assert sampling.trim(_gen(params, prompts, SamplingConfig(temperature=1.0, top_p=1e-6))) == greedy


def test_first_argmax_is_jnp_argmax():
    """Same index as jnp.argmax on ties, NaNs, -inf rows and random vocab-sized rows."""
    rng = np.random.default_rng(0)
    rows = [
        [1.0, 3.0, 3.0, 2.0],  # tie: the first
        [-np.inf] * 4,  # all -inf: 0
        [1.0, np.nan, 5.0, np.nan],  # NaN: the first NaN
        [np.inf, 1.0, np.inf, 0.0],
        [0.0, -0.0, 0.0, -1.0],  # signed zeros compare equal: the first
    ]
    x = np.asarray(rows, np.float32)
    np.testing.assert_array_equal(sampling.first_argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), axis=-1))
    big = jnp.asarray(rng.standard_normal((16, 49152)).astype(np.float32).round(1))  # many ties
    np.testing.assert_array_equal(sampling.first_argmax(big), jnp.argmax(big, axis=-1))


def test_sample_logits_draws_jax_categorical():
    """The sampler's draw is jax.random.categorical's, key for key (the samples of every earlier
    run stay the same); greedy is jnp.argmax."""
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((64, 49152)).astype(np.float32))
    keys = jax.random.split(jax.random.key(7), 64)
    for temp in (1.0, 0.7):
        sc = SamplingConfig(temperature=temp)
        got = jax.vmap(lambda x, k, sc=sc: sampling.sample_logits(x, k, sc))(logits, keys)
        want = jax.vmap(lambda x, k, t=temp: jax.random.categorical(k, x / t))(logits, keys)
        np.testing.assert_array_equal(got, want)
    greedy = jax.vmap(lambda x, k: sampling.sample_logits(x, k, SamplingConfig(greedy=True)))(logits, keys)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("rows", [20, 64])
def test_sample_rows_in_blocks_equals_vmap(rows):
    """The blocked temperature draw (lax.map over blocks of rows, with a remainder at 20 rows)
    gives every row the token of the plain vmap."""
    assert rows > sampling.SAMPLE_BLOCK
    logits = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 4096)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), rows)
    sc = SamplingConfig(temperature=0.7, top_k=50)
    got = jax.jit(lambda x, k: sampling.sample_rows(x, k, sc))(logits, keys)
    want = jax.vmap(lambda x, k: sampling.sample_logits(x, k, sc))(logits, keys)
    np.testing.assert_array_equal(got, want)
    assert len(set(np.asarray(got).tolist())) > rows // 2  # a draw, not one token for all


def test_sample_rows_in_blocks_on_a_mesh():
    """On 8 devices the blocks are taken inside each device's rows (10 per device here): same
    tokens as the plain vmap, and the output stays split over the devices."""
    from malt_jax.parallel import sharding
    from malt_jax.parallel.distributed import shard_batch

    mesh = sharding.make_mesh({"data": 8})
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((80, 4096)).astype(np.float32))
    keys = jax.random.split(jax.random.key(4), 80)
    sc = SamplingConfig(temperature=0.7)
    want = jax.vmap(lambda x, k: sampling.sample_logits(x, k, sc))(logits, keys)
    xs, ks = shard_batch((logits, keys), mesh)
    with sharding.mesh_context(mesh):
        got = jax.jit(lambda x, k: sampling.sample_rows(x, k, sc))(xs, ks)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(got, want)


def test_sampling_distribution_follows_temperature():
    logits = jnp.log(jnp.asarray([0.7, 0.2, 0.1]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: sampling.sample_logits(logits, k, SamplingConfig(temperature=1.0)))(keys)
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
    hot = jax.vmap(lambda k: sampling.sample_logits(logits, k, SamplingConfig(temperature=0.3)))(keys)
    assert np.mean(np.asarray(hot) == 0) > 0.9


def test_sharded_equals_single_device(params):
    from malt_jax.parallel import sharding
    from malt_jax.parallel.distributed import shard_batch

    assert jax.device_count() == 8
    prompts = _prompts(n=8, seed=5)
    keys = sampling.row_keys(3, 8)
    sc = SamplingConfig(temperature=0.8)
    single = _gen(params, prompts, sc, keys)
    mesh = sharding.make_mesh({"data": 8})
    x, lens = sampling.pad_batch(prompts)
    xs, ls, ks = shard_batch((jnp.asarray(x), jnp.asarray(lens), keys), mesh)
    p = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharded = sampling.generate(p, xs, ls, ks, cfg=CFG, sampling=sc, max_new_tokens=12)
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logps), np.asarray(single.logps), rtol=1e-4, atol=1e-5)


def test_compacting_live_rows_changes_nothing(params):
    """Once half of the rows have ended the live ones continue in a smaller batch (twice here:
    32 -> 16 -> 8 rows); every output, and the cache handed back, equals plain decoding."""
    prompts = _prompts(32, seed=3)
    stop = StopCriteria(stop_ids=tuple(range(3, CFG.vocab_size, 6)))  # rows end at scattered steps
    x, lens = sampling.pad_batch(prompts, bucket=16)
    keys = sampling.row_keys(1, 32)
    outs = {}
    for levels in (0, 2):
        sc = SamplingConfig(temperature=1.0, compact_levels=levels)
        cache = llama.KVCache.zeros(CFG, 32, 16 + 20)
        logits, cache = sampling.prefill(
            params, CFG, cache, jnp.asarray(x), jnp.asarray(lens), jnp.zeros(32, jnp.int32)
        )
        outs[levels] = jax.jit(sampling.decode, static_argnames=("cfg", "sampling", "stop", "max_new_tokens"))(
            params,
            cache=cache,
            logits=logits,
            pos=jnp.asarray(lens),
            keys=keys,
            cfg=CFG,
            sampling=sc,
            stop=stop,
            max_new_tokens=20,
        )
    (g0, c0), (g2, c2) = outs[0], outs[2]
    lengths = np.asarray(g0.lengths)
    assert lengths.min() < 5 and (lengths >= 12).sum() >= 3, lengths  # both early and late enders
    assert (lengths <= 10).sum() > 24  # so that the batch is compacted twice
    np.testing.assert_array_equal(g2.tokens, g0.tokens)
    for a, b in [(g2.lengths, g0.lengths), (g2.stopped, g0.stopped), (g2.end_pos, g0.end_pos)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(g2.logps, g0.logps, rtol=1e-5, atol=1e-6)
    # the cache holds float32 keys/values computed at another batch size: equal up to rounding
    np.testing.assert_allclose(c2.k, c0.k, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c2.v, c0.v, rtol=1e-4, atol=1e-5)


def test_decode_without_keeping_the_cache_frees_it_while_compacted(params):
    """``keep_cache=False`` (callers that drop the final cache): the same generation as keeping
    it, no cache returned, and a smaller compiled program: the full batch's cache is dead once
    the live rows are gathered (XLA's temp buffers of the two programs compared)."""
    prompts = _prompts(32, seed=3)
    stop = StopCriteria(stop_ids=tuple(range(3, CFG.vocab_size, 6)))
    x, lens = sampling.pad_batch(prompts, bucket=16)
    sc = SamplingConfig(temperature=1.0, compact_levels=2)
    cache = llama.KVCache.zeros(CFG, 32, 16 + 20)
    logits, cache = sampling.prefill(params, CFG, cache, jnp.asarray(x), jnp.asarray(lens), jnp.zeros(32, jnp.int32))
    fn = jax.jit(sampling.decode, static_argnames=("cfg", "sampling", "stop", "max_new_tokens", "keep_cache"))
    kw = dict(cache=cache, logits=logits, pos=jnp.asarray(lens), keys=sampling.row_keys(1, 32), cfg=CFG)
    kw.update(sampling=sc, stop=stop, max_new_tokens=20)
    (g_keep, c_keep), (g_drop, c_drop) = fn(params, **kw), fn(params, **kw, keep_cache=False)
    assert c_keep is not None and c_drop is None
    assert (np.asarray(g_keep.lengths) <= 10).sum() > 24  # compacted twice (as above)
    for a, b in zip(jax.tree.leaves(g_drop), jax.tree.leaves(g_keep)):
        np.testing.assert_array_equal(a, b)
    mem = {k: fn.lower(params, **kw, keep_cache=k).compile().memory_analysis() for k in (1, 0)}
    used = {k: m.temp_size_in_bytes + m.output_size_in_bytes for k, m in mem.items()}  # same arguments
    full = cache.k.nbytes + cache.v.nbytes
    assert used[0] <= used[1] - full // 8, (used, full)  # at least the quarter-batch copy is gone
