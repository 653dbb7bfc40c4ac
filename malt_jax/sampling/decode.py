"""Batched, jit-compiled sampling with a static-shape KV cache.

The sampler is made of three pure pieces that trajectory expansion reuses:

* :func:`prefill` writes a right-padded block of tokens into the cache at per-row positions
  and returns the logits that follow each row's last real token;
* :func:`decode` runs a ``jax.lax.while_loop`` that samples one token per row per step until
  every row has hit a stop token / stop sequence or ``max_new_tokens``; rows stop independently;
* :func:`generate` = fresh cache + prefill + decode, the everyday entry point.

Randomness is per row: the token sampled by row ``b`` at step ``t`` uses
``fold_in(keys[b], t)``, so a row's sample does not depend on which other rows share its
batch (this is what makes sharded == unsharded and forked == naive expansion testable).

Stop tokens (EOS, ``<|im_end|>``) end a row and are not part of its output; stop sequences
(token-id sequences, e.g. the encoding of a stop string) end a row and are kept in it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import ModelConfig, SamplingConfig
from malt_jax.model.llama import KVCache, Params, forward, lm_head
from malt_jax.parallel.distributed import fetch
from malt_jax.parallel.sharding import batch_shards

PAD_ID = 0


@flax.struct.dataclass
class Generation:
    tokens: jax.Array  # [B, N] sampled tokens (PAD_ID after a row's end)
    lengths: jax.Array  # [B] number of output tokens (stop token excluded)
    logps: jax.Array  # [B, N] log p(token) under the model's unscaled distribution (0 after end)
    stopped: jax.Array  # [B] True if the row ended by a stop token/sequence (False: length limit)
    end_pos: jax.Array  # [B] next free cache position of each row after decoding


@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """Static stop rules: single stop token ids and right-aligned stop sequences."""

    stop_ids: tuple[int, ...] = ()
    stop_seqs: tuple[tuple[int, ...], ...] = ()

    def seq_array(self) -> np.ndarray:
        width = max((len(s) for s in self.stop_seqs), default=1)
        arr = np.full((max(len(self.stop_seqs), 1), width), -1, np.int32)
        for i, s in enumerate(self.stop_seqs):
            arr[i, width - len(s) :] = s
        return arr


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (the first maximum; the first NaN if there is one) as two plain
    reductions: XLA:CPU runs argmax's (value, index) reduction over a 49k vocabulary about 5x
    slower than a max followed by a min over the matching indices (bench/README.md)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == m) | jnp.isnan(x)
    V = x.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_logits(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Samples one token from ``logits`` [V] under temperature / top-k / top-p (or greedy)."""
    if cfg.is_greedy:
        return first_argmax(logits)
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k and cfg.top_k > 0:
        kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        keep = cum < cfg.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    # jax.random.categorical(key, x) is argmax(gumbel(key, x.shape) + x): the same noise and
    # the same token, with the faster argmax
    return first_argmax(jax.random.gumbel(key, x.shape, x.dtype) + x)


def prefill(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    start: jax.Array,
    lora: Params | None = None,
    lora_scale: float = 1.0,
) -> tuple[jax.Array, KVCache]:
    """Writes right-padded ``tokens`` [B, T] at positions ``start[b] + t`` (t < lengths[b]).

    Returns the float32 logits [B, V] after each row's last real token, and the cache.
    Rows with ``lengths == 0`` write nothing (their logits are meaningless).
    """
    B, T = tokens.shape
    t = jnp.arange(T)[None, :]
    positions = start[:, None] + t
    valid = t < lengths[:, None]
    hidden, cache = forward(
        params,
        tokens,
        positions,
        cfg,
        cache=cache,
        lora=lora,
        lora_scale=lora_scale,
        token_valid=valid,
        return_hidden=True,
    )
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return lm_head(params, last, cfg), cache


class _DecodeState(flax.struct.PyTreeNode):
    step: jax.Array
    cache: KVCache
    logits: jax.Array  # [B, V] logits of the next token
    pos: jax.Array  # [B] next cache position
    done: jax.Array  # [B]
    stopped: jax.Array  # [B]
    lengths: jax.Array  # [B]
    tokens: jax.Array  # [B, N]
    logps: jax.Array  # [B, N]
    recent: jax.Array  # [B, W] last W tokens (for stop sequences)
    keys: jax.Array  # [B] per-row PRNG keys


MIN_COMPACT_ROWS = 4  # a compacted batch has at least this many rows (per device group)


def _batch_groups(B: int) -> int:
    """How many device groups the rows are split over (the current mesh's batch shards; 1
    without a mesh). Compaction moves rows only inside a group, so it never moves a cache row
    to another device (a global gather would materialise the whole batch's cache on each)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    g = batch_shards(mesh)
    return g if g > 1 and B % g == 0 else 1


def _grouped(x: jax.Array, g: int, axis: int) -> jax.Array:
    """[..., B, ...] -> [g, ..., B / g, ...] (rows of group i first)."""
    shp = x.shape
    return jnp.moveaxis(x.reshape(shp[:axis] + (g, shp[axis] // g) + shp[axis + 1 :]), axis, 0)


def _ungrouped(x: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _take(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """Rows ``idx`` [g, h] (indices inside each of g groups) of x along ``axis`` -> g * h rows."""
    return _ungrouped(jax.vmap(lambda xs, i: jnp.take(xs, i, axis=axis))(_grouped(x, idx.shape[0], axis), idx), axis)


def _put(x: jax.Array, idx: jax.Array, sub: jax.Array, axis: int) -> jax.Array:
    """x with the rows ``idx`` [g, h] replaced by ``sub``'s (the inverse of :func:`_take`)."""
    g = idx.shape[0]
    put = jax.vmap(lambda xs, i, ys: xs.at[(slice(None),) * axis + (i,)].set(ys))
    return _ungrouped(put(_grouped(x, g, axis), idx, _grouped(sub, g, axis)), axis)


def _take_rows(s: _DecodeState, idx: jax.Array) -> _DecodeState:
    rows = jax.tree.map(lambda x: _take(x, idx, 0), s.replace(cache=None, step=None))
    c = s.cache
    cache = c.replace(k=_take(c.k, idx, 1), v=_take(c.v, idx, 1), h=None if c.h is None else _take(c.h, idx, 0))
    return rows.replace(step=s.step, cache=cache)


def _put_rows(s: _DecodeState, idx: jax.Array, sub: _DecodeState) -> _DecodeState:
    """``s`` with rows ``idx`` replaced by ``sub``'s; without a cache in ``s`` (``keep_cache=False``)
    the result has none either."""
    rows = jax.tree.map(
        lambda x, y: _put(x, idx, y, 0), s.replace(cache=None, step=None), sub.replace(cache=None, step=None)
    )
    c, sc = s.cache, sub.cache
    if c is None:
        return rows.replace(step=sub.step)
    assert sc is not None  # the sub-batch's cache has the same layout
    h = None
    if c.h is not None:
        assert sc.h is not None
        h = _put(c.h, idx, sc.h, 0)
    cache = c.replace(k=_put(c.k, idx, sc.k, 1), v=_put(c.v, idx, sc.v, 1), h=h)
    return rows.replace(step=sub.step, cache=cache)


SAMPLE_BLOCK = 8  # rows per block of a temperature draw (sample_rows)


def sample_rows(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """:func:`sample_logits` for every row of ``logits`` [B, V] with its key ``keys[b]``.

    A temperature draw runs over blocks of ``SAMPLE_BLOCK`` rows (``lax.map``) inside each
    device group: drawn for the whole batch at once, the Gumbel noise ([B, V] floats, 25 MB at
    128 rows) falls out of cache between its passes, 1.6-2.4x slower on XLA:CPU at 64-128 rows
    (bench/README.md). Every row's computation is unchanged, so are its tokens (tests)."""
    B = logits.shape[0]
    g = _batch_groups(B)
    per = B // g
    draw = partial(sample_logits, cfg=cfg)
    if cfg.is_greedy or per <= SAMPLE_BLOCK:
        return jax.vmap(draw)(logits, keys)

    def group(lg: jax.Array, ks: jax.Array) -> jax.Array:
        return jax.lax.map(lambda row: draw(*row), (lg, ks), batch_size=SAMPLE_BLOCK)

    out = jax.vmap(group)(logits.reshape(g, per, -1), keys.reshape(g, per, *keys.shape[1:]))
    return out.reshape(B)


def _run_compacting(cond, body, s: _DecodeState, levels: int, keep_cache: bool = True) -> _DecodeState:
    """``while_loop(cond, body, s)``, except that once half of the rows are done the live rows
    are gathered into a half-size batch that continues alone (recursively, ``levels`` times) and
    is scattered back at the end. Rows are independent (per-row keys, positions and cache), so
    the result is the same as decoding the full batch; only the work on ended rows is saved.
    On a mesh the halving happens inside each device's rows (:func:`_batch_groups`): it starts
    once every device has at most half of its rows live.

    ``keep_cache=False`` (the caller does not use the final cache): the returned state has
    ``cache=None``, and the full batch's cache is dead once its live rows are gathered (the
    first halving happens unconditionally for that), so the compacted phases hold only their own
    caches: at most 1 + 1/2 of the batch's cache while gathering, instead of 1 + 1/2 + 1/4 alive
    until the end."""
    B = s.done.shape[0]
    g = _batch_groups(B)
    half = B // g // 2
    if levels == 0 or half < MIN_COMPACT_ROWS:
        s = jax.lax.while_loop(cond, body, s)
        return s if keep_cache else s.replace(cache=None)

    def live_max(s: _DecodeState) -> jax.Array:  # the most live rows in any group
        return jnp.max(jnp.sum(~s.done.reshape(g, B // g), axis=1))

    s = jax.lax.while_loop(lambda s: cond(s) & (live_max(s) > half), body, s)

    def compact(s: _DecodeState) -> _DecodeState:
        # per group: every live row, then ended ones
        idx = jnp.argsort(s.done.reshape(g, B // g), axis=1, stable=True)[:, :half]
        # the half batch keeps its cache while a quarter runs: the peak is this gather's
        sub = _run_compacting(cond, body, _take_rows(s, idx), levels - 1)
        return _put_rows(s if keep_cache else s.replace(cache=None), idx, sub)

    if not keep_cache:
        # unconditional (a loop that already ended runs no step on the half batch): inside a
        # lax.cond the full cache would stay allocated for the whole branch
        return compact(s)
    return jax.lax.cond(cond(s), compact, lambda s: s, s)


def decode(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    logits: jax.Array,
    pos: jax.Array,
    keys: jax.Array,
    sampling: SamplingConfig,
    stop: StopCriteria,
    max_new_tokens: int,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    active: jax.Array | None = None,
    keep_cache: bool = True,
) -> tuple[Generation, KVCache | None]:
    """Samples up to ``max_new_tokens`` per row, starting from next-token ``logits`` [B, V].

    ``pos`` [B]: cache position where each row's first new token goes; ``keys`` [B]: per-row
    PRNG keys; ``active`` [B] (optional): rows marked False produce nothing. Returns the
    generation and the final cache, or None for it with ``keep_cache=False`` (less memory
    while decoding: see :func:`_run_compacting`).
    """
    B = logits.shape[0]
    N = max_new_tokens
    seqs = jnp.asarray(stop.seq_array())
    W = seqs.shape[1]
    stop_ids = jnp.asarray(stop.stop_ids or (-1,), jnp.int32)
    done0 = jnp.zeros((B,), bool) if active is None else ~active

    def cond(s: _DecodeState) -> jax.Array:
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.keys, s.step)
        tok = sample_rows(s.logits, step_keys, sampling)
        logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        recent = jnp.concatenate([s.recent[:, 1:], tok[:, None]], axis=1)
        hit_id = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        hit_seq = jnp.any(jnp.all((seqs[None] == -1) | (recent[:, None, :] == seqs[None]), axis=-1), axis=-1)
        hit_seq = hit_seq & bool(stop.stop_seqs)
        live = ~s.done
        emit = live & ~hit_id  # token becomes part of the output (and of the cache)
        tokens = s.tokens.at[:, s.step].set(jnp.where(emit, tok, PAD_ID))
        logps = s.logps.at[:, s.step].set(jnp.where(emit, logp, 0.0))
        stopped = s.stopped | (live & (hit_id | hit_seq))
        done = s.done | hit_id | hit_seq | (s.step + 1 >= N)
        new_logits, cache = forward(
            params,
            tok[:, None],
            s.pos[:, None],
            cfg,
            cache=s.cache,
            lora=lora,
            lora_scale=lora_scale,
            token_valid=emit[:, None],
            return_hidden=True,
        )
        new_logits = lm_head(params, new_logits[:, 0], cfg)
        return _DecodeState(
            step=s.step + 1,
            cache=cache,
            logits=new_logits,
            pos=s.pos + emit,
            done=done,
            stopped=stopped,
            lengths=s.lengths + emit,
            tokens=tokens,
            logps=logps,
            recent=recent,
            keys=s.keys,
        )

    init = _DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits.astype(jnp.float32),
        pos=pos.astype(jnp.int32),
        done=done0,
        stopped=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, N), PAD_ID, jnp.int32),
        logps=jnp.zeros((B, N), jnp.float32),
        recent=jnp.full((B, W), -2, jnp.int32),
        keys=keys,
    )
    s = _run_compacting(cond, body, init, sampling.compact_levels, keep_cache)
    gen = Generation(tokens=s.tokens, lengths=s.lengths, logps=s.logps, stopped=s.stopped, end_pos=s.pos)
    return gen, s.cache


@partial(jax.jit, static_argnames=("cfg", "sampling", "stop", "max_new_tokens", "cache_size", "lora_scale"))
def generate(
    params: Params,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    keys: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    stop: StopCriteria = StopCriteria(),
    max_new_tokens: int = 64,
    cache_size: int | None = None,
    lora: Params | None = None,
    lora_scale: float = 1.0,
) -> Generation:
    """Samples continuations of right-padded prompts [B, T] with lengths [B] and keys [B]."""
    B, T = prompt_tokens.shape
    size = cache_size or (T + max_new_tokens)
    cache = KVCache.zeros(cfg, B, size)
    start = jnp.zeros((B,), jnp.int32)
    logits, cache = prefill(params, cfg, cache, prompt_tokens, prompt_lengths, start, lora, lora_scale)
    gen, _ = decode(
        params,
        cfg,
        cache,
        logits,
        prompt_lengths.astype(jnp.int32),
        keys,
        sampling,
        stop,
        max_new_tokens,
        lora,
        lora_scale,
        keep_cache=False,
    )
    return gen


def row_keys(seed: int | jax.Array, n: int) -> jax.Array:
    """``n`` independent per-row PRNG keys from a seed."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return jax.random.split(key, n)


def pad_batch(seqs: list[list[int]], bucket: int = 16, pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to a length rounded up to ``bucket`` (limits recompilation)."""
    longest = max((len(s) for s in seqs), default=1)
    width = max(bucket, -(-longest // bucket) * bucket)
    out = np.full((len(seqs), width), pad_id, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, np.asarray([len(s) for s in seqs], np.int32)


def trim(gen: Generation) -> list[list[int]]:
    """Host-side: output token lists without padding."""
    toks, lens = fetch((gen.tokens, gen.lengths))
    return [toks[i, : lens[i]].tolist() for i in range(toks.shape[0])]
