"""A Llama-family decoder as pure functions over a parameter pytree.

Parameters are a plain dict; per-layer weights are stacked on a leading ``layers`` axis and
the decoder runs them with ``jax.lax.scan`` (one compiled layer body, fast compiles for
30-layer models). Linear weights are stored ``[in, out]`` (``y = x @ w``).

    params = {
      "embed":      [vocab, dim],
      "layers": {
        "attn_norm": [L, dim],       "mlp_norm": [L, dim],
        "wq": [L, dim, H*hd],        "wk": [L, dim, K*hd],   "wv": [L, dim, K*hd],
        "wo": [L, H*hd, dim],
        "w_gate": [L, dim, ffn],     "w_up": [L, dim, ffn],  "w_down": [L, ffn, dim],
        "bq": [L, H*hd], "bk": [L, K*hd], "bv": [L, K*hd],   # cfg.arch == "qwen2" only
        "q_norm": [L, hd], "k_norm": [L, hd],                # cfg.arch == "qwen3" only
      },
      "final_norm": [dim],
      "lm_head":    [dim, vocab],    # only when embeddings are untied
    }

RoPE uses the Hugging Face "rotate-half" layout. GGUF files store Q/K rows permuted for
llama.cpp's interleaved rope; ``weights.py`` un-permutes them on import.

LoRA adapters (``lora.py``) are a separate pytree ``{"layers": {name: {"a": [L,in,r], "b": [L,r,out]}}}``
and are applied on the fly: ``x @ w + scale * (x @ a) @ b``, so one frozen base serves every role.

The KV cache is a static-shape buffer (keys ``[L, B, K, hd, S]``, values ``[L, B, K, S, hd]``).
Every token carries its own position; a token at position ``p`` is written to cache slot ``p`` of
its row and attends to slots ``<= p``. Rows therefore advance independently (ragged prompts, forked tree rows).
"""

from __future__ import annotations

import functools
import math
from typing import Any, overload

import flax.struct
import jax
import jax.numpy as jnp

from malt_jax.config import LORA_TARGETS, ModelConfig
from malt_jax.parallel.sharding import constrain, gather_rows_for_head

Params = dict[str, Any]

LAYER_WEIGHTS = LORA_TARGETS  # the projections of a layer, the one definition (config.LORA_TARGETS)


class KVCache(flax.struct.PyTreeNode):
    """Keys/values of every layer, plus (optionally) the hidden state entering layer ``hidden_at``.

    ``h`` lets a role with an adapter on the top layers only re-use another role's cache: the
    layers below ``hidden_at`` do not depend on the adapter, so :func:`refresh_top` recomputes
    the top layers' keys/values from ``h`` instead of re-encoding the whole context.
    """

    # Keys are stored transposed, [L, B, K, hd, S]: a decode step's query-key product is then a
    # plain [g, hd] x [hd, S] matmul per row and KV head (with cached_attention's merged query
    # axis, the cached attention is 2.8x faster on XLA:CPU than with [S, hd] keys, bench/README.md);
    # values stay [L, B, K, S, hd] for the [g, S] x [S, hd] product.
    k: jax.Array  # [L, B, K, hd, S]
    v: jax.Array  # [L, B, K, S, hd]
    h: jax.Array | None = None  # [B, S, dim] hidden state entering layer `hidden_at` (if > 0)
    hidden_at: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def size(self) -> int:
        return self.v.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, batch: int, size: int, dtype: Any = None, hidden_at: int = 0, after: Any = None
    ) -> KVCache:
        """An empty cache. ``after`` (any arrays): allocate it only once they are computed. A
        zero buffer depends on nothing, so XLA may create it at the start of the program and keep
        it alive through everything before its first use (e.g. every level of a tree at once)."""
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, size, cfg.head_dim)
        k_shape = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, size)
        if not 0 <= hidden_at < cfg.n_layers:
            raise ValueError(f"KVCache.zeros: hidden_at={hidden_at} not in [0, {cfg.n_layers})")
        zero = jnp.zeros((), dtype)
        if after is not None:  # 0.0 * a value of `after`: XLA does not fold a float multiply by 0
            # (NaN rules), while it drops optimization barriers before scheduling on CPU
            zero = zero * jax.tree.leaves(after)[0].ravel()[0].astype(dtype)
        h = constrain(jnp.broadcast_to(zero, (batch, size, cfg.dim)), "residual") if hidden_at else None
        k = constrain(jnp.broadcast_to(zero, k_shape), "k_cache")
        v = constrain(jnp.broadcast_to(zero, shape), "v_cache")
        return cls(k=k, v=v, h=h, hidden_at=hidden_at)

    def _map(self, k_fn, v_fn, h_fn) -> KVCache:
        return self.replace(k=k_fn(self.k), v=v_fn(self.v), h=None if self.h is None else h_fn(self.h))

    def grow(self, size: int) -> KVCache:
        """The same cache with ``size`` slots (new slots zero); ``size`` must not shrink it."""
        if size < self.size:
            raise ValueError(f"KVCache.grow: {size} slots < current {self.size}")
        extra = size - self.size
        return self._map(
            lambda k: jnp.pad(k, [(0, 0)] * 4 + [(0, extra)]),
            lambda v: jnp.pad(v, [(0, 0)] * 3 + [(0, extra), (0, 0)]),
            lambda h: jnp.pad(h, [(0, 0), (0, extra), (0, 0)]),
        )

    def repeat(self, times: int) -> KVCache:
        """Forks every row ``times`` times (row b -> rows b*times .. b*times+times-1)."""
        rows = lambda x: jnp.repeat(x, times, axis=1)  # noqa: E731
        return self._map(rows, rows, lambda h: jnp.repeat(h, times, axis=0))


# ----------------------------------------------------------------------------------------------
# initialisation


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms), in ``cfg.param_dtype``."""
    dt = jnp.dtype(cfg.param_dtype)
    L, D, H, K, hd, F = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    shapes = {
        "wq": (L, D, H * hd),
        "wk": (L, D, K * hd),
        "wv": (L, D, K * hd),
        "wo": (L, H * hd, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {name: (std * jax.random.normal(k, s)).astype(dt) for (name, s), k in zip(shapes.items(), keys)}
    layers["attn_norm"] = jnp.ones((L, D), dt)
    layers["mlp_norm"] = jnp.ones((L, D), dt)
    if cfg.qkv_bias:  # Qwen2
        layers["bq"] = jnp.zeros((L, H * hd), dt)
        layers["bk"] = jnp.zeros((L, K * hd), dt)
        layers["bv"] = jnp.zeros((L, K * hd), dt)
    if cfg.qk_norm:  # Qwen3
        layers["q_norm"] = jnp.ones((L, hd), dt)
        layers["k_norm"] = jnp.ones((L, hd), dt)
    params: Params = {
        "embed": (std * jax.random.normal(keys[-2], (cfg.vocab_size, D))).astype(dt),
        "layers": layers,
        "final_norm": jnp.ones((D,), dt),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (std * jax.random.normal(keys[-1], (D, cfg.vocab_size))).astype(dt)
    return params


def abstract_params(cfg: ModelConfig) -> Params:
    """The parameters as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_shapes(cfg: ModelConfig) -> dict:
    """Expected shapes of every parameter (used to check imported checkpoints)."""
    return jax.tree.map(lambda x: tuple(x.shape), abstract_params(cfg))


# ----------------------------------------------------------------------------------------------
# building blocks


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [hd/2], with Llama-3.1 style scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling:
        s = dict(cfg.rope_scaling)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = jnp.where(is_mid, mid, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, heads, hd]; positions: [B, T]."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w``; below float32 (bfloat16), one ``bf16 x bf16 -> f32`` dot rounded to x.dtype.

    Both forms accumulate in float32, but XLA:CPU runs a dot whose result is bf16 in float32
    (operands upcast), and the one with a float32 result on the CPU's bf16 instructions (avx512_bf16:
    ~2x the f32 rate, bench/README.md); TPUs and GPUs accumulate bf16 products in float32 either
    way. float32 operands: the plain product, unchanged.
    """
    if x.dtype == jnp.float32:
        return x @ w
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lowp_matmul(x: jax.Array, w: jax.Array, out_dtype: Any) -> jax.Array:
    """``x @ w`` for low-precision (bf16) x [..., in] and w [in, out], accumulated in float32 and
    returned as ``out_dtype``, with a backward whose products are bf16 dots too: the cotangent is
    rounded to x.dtype first (as mixed-precision autocast does), ``dx = g wᵀ``, ``dw = xᵀ g``.
    (Autodiff of the forward would give float32 x bf16 products, which XLA:CPU runs in float32.
    XLA:CPU also runs ``dw``'s product in float32, as it contracts the token axis of both
    operands; only full fine-tuning computes it: LoRA's base weights get no gradient.)
    """
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _lowp_matmul_fwd(x: jax.Array, w: jax.Array, out_dtype: Any) -> tuple[jax.Array, tuple]:
    return lowp_matmul(x, w, out_dtype), (x, w)


def _lowp_matmul_bwd(out_dtype: Any, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    g = g.astype(x.dtype)
    dx = _dot(g, w.T)
    dw = _dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
    return dx, dw.astype(w.dtype)


lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def _linear(x: jax.Array, w: jax.Array, lora: dict | None, scale: float) -> jax.Array:
    """``x @ w`` (+ the LoRA update) over the flattened leading axes: the weight gradient is then
    one 2-D product contracting a single token axis, which XLA:CPU runs about 2x faster than the
    same contraction over ``[batch, time]`` (the testbed model's train step about 1.5x faster,
    gradients bitwise equal: bench/pretrain_step.py, docs/performance.md)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    w = w.astype(x.dtype)
    y = x @ w if x.dtype == jnp.float32 else lowp_matmul(x, w, x.dtype)
    if lora is not None:
        y = y + scale * lora_delta(x, lora["a"].astype(x.dtype), lora["b"].astype(x.dtype))
    return y.reshape(*shape[:-1], y.shape[-1])


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The low-rank update ``(x @ a) @ b`` for x [..., in], a [in, r], b [r, out].

    Same forward as the plain expression; the backward is written by hand with the token axes
    flattened: ``db = (x a)ᵀ g``, ``da = xᵀ (g bᵀ)``, ``dx = (g bᵀ) aᵀ``. Autodiff of the plain
    expression contracts the [B, T, out] cotangent over (B, T) for ``db``, and XLA:CPU then
    materialises that cotangent transposed (a strided loop fusion that dominated a LoRA DPO
    step's profile); this form keeps every operand in its natural layout (measurements in
    bench/README.md). Gradients equal autodiff's to float rounding (tests/test_lora.py).
    """
    return _dot(_dot(x, a), b)


def _lora_delta_fwd(x: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    xa = _dot(x, a)
    return _dot(xa, b), (x, a, b, xa)


def _lora_delta_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, a, b, xa = res
    g2 = g.reshape(-1, g.shape[-1])
    g_xa = _dot(g2, b.T)  # [N, r]
    db = _dot(xa.reshape(-1, xa.shape[-1]).T, g2)
    da = _dot(x.reshape(-1, x.shape[-1]).T, g_xa)
    dx = _dot(g_xa, a.T).reshape(x.shape)
    return dx, da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, hd]; k, v: [B, K, S, hd]; q_pos: [B, T] and k_pos: [B, S] positions;
    k_valid: [B, S] bool, whether a key holds a real token. A key is visible to a query iff it is
    valid and its position is ``<=`` the query's. With ``segments`` [B, T] int (self-attention,
    S = T), a row holds several sequences sharing a prefix: a key of segment 0 (the shared
    prefix) is visible to every segment, any other key only to its own segment.

    ``key_blocks`` > 1 (self-attention, S = T): the queries are cut into that many blocks and
    block i scores only the keys up to its own end, about (n + 1) / 2n of the dense scores. Exact
    only for rows where no query sees a key placed after it in the row (positions grow along the
    row within each segment, as every ``data.pack_*`` layout has them); the caller vouches for it.
    """
    B, T, H, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    if key_blocks > 1 and S != T:
        raise ValueError(f"attention: key_blocks={key_blocks} needs self-attention (S={S} != T={T})")
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, T, S]
    if segments is not None:
        mask &= (segments[:, None, :] == segments[:, :, None]) | (segments[:, None, :] == 0)
    qh = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    n = max(1, min(key_blocks, T))
    bounds = [round(i * T / n) for i in range(n + 1)]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        t, s = hi - lo, (hi if n > 1 else S)  # queries lo..hi-1 score keys 0..s-1
        # (query head, token) pairs of a KV head as one matmul axis, as in cached_attention
        qg = qh[:, :, :, lo:hi].reshape(B, K, G * t, hd)
        scores = jnp.einsum("bkqd,bksd->bkqs", qg, k[:, :, :s], preferred_element_type=jnp.float32)
        scores = scores.reshape(B, K, G, t, s) * (1.0 / math.sqrt(hd))
        scores = jnp.where(mask[:, None, None, lo:hi, :s], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", probs.reshape(B, K, G * t, s), v[:, :, :s]).reshape(B, K, G, t, hd))
    out = outs[0] if n == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    q_pos: jax.Array,
    old_len: jax.Array,
    valid: jax.Array,
) -> jax.Array:
    """Grouped-query attention of new tokens over a KV cache and over themselves.

    q: [B, T, H, hd], k, v: [B, T, K, hd] for the new tokens at positions q_pos [B, T] (valid
    [B, T]); cache_k: [B, K, hd, S] (transposed, as :class:`KVCache` stores it), cache_v:
    [B, K, S, hd], cache slot j holding position j. A query sees the
    cache slots below ``old_len`` [B] (the row's first new position) and the valid new tokens at
    positions ``<=`` its own. Same result as writing the new tokens into the cache and calling
    :func:`attention` over it, without touching the cache.
    """
    B, T, H, hd = q.shape
    K, S = cache_v.shape[1], cache_v.shape[2]
    G = H // K
    # The (new token, query head) pairs of a KV head form one axis: each row and KV head is then
    # one [T*G, hd] x [hd, S] matmul against the transposed keys (a separate T axis, even of size
    # 1, made XLA:CPU's batched dot 4x slower: bench/README.md).
    qg = (q.reshape(B, T, K, G, hd) * (1.0 / math.sqrt(hd))).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, hd]
    s_old = jnp.einsum("bkqd,bkds->bkqs", qg.reshape(B, K, T * G, hd), cache_k, preferred_element_type=jnp.float32)
    s_old = s_old.reshape(B, K, T, G, S)
    s_new = jnp.einsum("bktgd,bskd->bktgs", qg, k, preferred_element_type=jnp.float32)
    m_old = jnp.arange(S)[None, :] < old_len[:, None]  # [B, S]
    m_new = (q_pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [B, T, T]
    neg = jnp.finfo(jnp.float32).min
    s_old = jnp.where(m_old[:, None, None, None, :], s_old, neg)
    s_new = jnp.where(m_new[:, None, :, None, :], s_new, neg)
    probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1).astype(v.dtype)  # [B, K, T, G, S+T]
    o_old = jnp.einsum("bkqs,bksd->bkqd", probs[..., :S].reshape(B, K, T * G, S), cache_v).reshape(B, K, T, G, hd)
    out = o_old.transpose(0, 2, 1, 3, 4) + jnp.einsum("bktgs,bskd->btkgd", probs[..., S:], v)
    return out.reshape(B, T, H * hd)


# ----------------------------------------------------------------------------------------------
# forward


@overload
def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    *,
    cache: KVCache,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    token_valid: jax.Array | None = None,
    return_hidden: bool = False,
    segments: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]: ...


@overload
def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    *,
    cache: None = None,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    token_valid: jax.Array | None = None,
    return_hidden: bool = False,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> tuple[jax.Array, None]: ...


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    *,
    cache: KVCache | None = None,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    token_valid: jax.Array | None = None,
    return_hidden: bool = False,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int absolute positions (cache slots) of the tokens. With a cache, a
        row's new tokens occupy consecutive positions from ``positions[:, 0]``.
      cache: optional KV cache; the new keys/values are written at ``positions`` and attention
        runs over the cache slots below each row's first new position plus the new tokens.
        Without a cache, attention is causal over ``tokens``.
      lora: optional adapter pytree (see lora.py), applied with ``lora_scale`` (alpha / rank).
      token_valid: [B, T] bool; False marks padding (its keys are never attended to and, with
        a cache, it is not written).
      segments: [B, T] int, no cache: rows of several sequences sharing a prefix (segment 0 is
        the prefix, seen by every segment; see :func:`attention`); ``positions`` then restart
        after the prefix in each segment.
      key_blocks: no cache: the attention's query blocks (see :func:`attention`; > 1 only for
        rows where no token sees a token placed after it, as ``data.pack_*`` builds them).
    Returns:
      logits [B, T, vocab] in float32 (or the final hidden states if ``return_hidden``), and
      the updated cache (None without one).
    """
    x = embed_tokens(params, tokens, cfg)
    x, new_cache = _decoder(
        params,
        x,
        positions,
        cfg,
        cache,
        lora,
        lora_scale,
        token_valid,
        first_layer=0,
        segments=segments,
        key_blocks=key_blocks,
    )
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if return_hidden:
        return x, new_cache
    return lm_head(params, x, cfg), new_cache


def embed_tokens(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embeddings [B, T, dim] (the residual stream's start)."""
    x = params["embed"].astype(jnp.dtype(cfg.dtype))[tokens]
    return constrain(constrain(x, "embed_rows"), "residual")


def hidden_at(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    layer: int,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> jax.Array:
    """The hidden states [B, T, dim] entering layer ``layer`` of causal rows ``tokens`` [B, T]
    (no adapter: for an adapter on the layers from ``layer`` up, they are the same whatever the
    adapter, so training can compute them once; see :func:`forward_from`). ``positions`` /
    ``segments``: shared-prefix rows, as in :func:`forward` (default: plain causal rows);
    ``key_blocks`` as in :func:`forward`."""
    B, T = tokens.shape
    pos = causal_positions(B, T) if positions is None else positions
    x = embed_tokens(params, tokens, cfg)
    x, _ = _decoder(
        params,
        x,
        pos,
        cfg,
        None,
        None,
        1.0,
        None,
        first_layer=0,
        stop_layer=layer,
        segments=segments,
        key_blocks=key_blocks,
    )
    return x


def forward_from(
    params: Params,
    hidden: jax.Array,
    cfg: ModelConfig,
    layer: int,
    *,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> jax.Array:
    """Final (normed) hidden states of causal rows from the hidden states ``hidden`` [B, T, dim]
    entering layer ``layer`` (:func:`hidden_at`): ``forward(..., return_hidden=True)`` without
    re-running the layers below ``layer``. ``positions`` / ``segments`` as in :func:`hidden_at`,
    ``key_blocks`` as in :func:`forward`."""
    B, T = hidden.shape[:2]
    x, _ = _decoder(
        params,
        hidden.astype(jnp.dtype(cfg.dtype)),
        causal_positions(B, T) if positions is None else positions,
        cfg,
        None,
        lora,
        lora_scale,
        None,
        first_layer=layer,
        segments=segments,
        key_blocks=key_blocks,
    )
    return rms_norm(x, params["final_norm"], cfg.norm_eps)


def refresh_top(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    lengths: jax.Array,
    lora: Params | None = None,
    lora_scale: float = 1.0,
) -> KVCache:
    """Recomputes the keys/values of layers ``cache.hidden_at ..`` for slots ``< lengths`` [B]
    from the stored hidden states, with ``lora`` (which must not adapt the layers below).

    Equal to re-encoding every row's first ``lengths`` tokens with ``lora`` (the layers below
    ``hidden_at`` give the same keys/values whatever the adapter), at the cost of the top layers.
    """
    if cache.h is None:
        raise ValueError("refresh_top needs a cache created with hidden_at > 0")
    if lora_first_layer(cfg, lora) < cache.hidden_at:
        raise ValueError(
            f"refresh_top: the adapter starts at layer {lora_first_layer(cfg, lora)}, below the "
            f"cache's stored hidden state (layer {cache.hidden_at})"
        )
    B, S = cache.h.shape[:2]
    positions = causal_positions(B, S)
    _, new = _decoder(
        params,
        cache.h,
        positions,
        cfg,
        cache,
        lora,
        lora_scale,
        positions < lengths[:, None],
        first_layer=cache.hidden_at,
    )
    return new


def unstack_top(params: Params, n: int) -> Params:
    """``params`` plus per-layer copies of the top ``n`` layers' weights, as ``"layers_top"`` (a
    tuple of ``n`` dicts of the ``layers`` entries without their leading axis, layers ``L - n``
    .. ``L - 1``); ``n = 0``: ``params`` unchanged, and any copies dropped.

    The forward passes without a KV cache (training steps, scoring, hidden states) then run those
    layers as an unrolled loop over the copies instead of scanning the stacked arrays: XLA:CPU
    copies a layer's weights out of a stacked array (a dynamic slice feeding a library matmul) at
    every layer of every pass, forward and backward, and stacks and re-slices the layers'
    saved activations; the unrolled layers do neither (bench/README.md: a 30-layer LoRA DPO step
    ~6 % faster; compiles take longer). Costs those layers' weights once more in memory. The
    cached paths (prefill, decode) keep reading the stacked arrays. Same results to float
    rounding: the copies hold the same values, and the layer computation is the same function.
    """
    out = {k: v for k, v in params.items() if k != "layers_top"}
    if n <= 0:
        return out
    L = jax.tree.leaves(params["layers"])[0].shape[0]
    if n > L:
        raise ValueError(f"unstack_top: n={n} > the model's {L} layers")
    out["layers_top"] = tuple(jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(L - n, L))
    return out


def lora_first_layer(cfg: ModelConfig, lora: Params | None) -> int:
    """Index of the first layer an adapter touches (``n_layers`` for no adapter)."""
    layers = (lora or {}).get("layers", {})
    return cfg.n_layers - next((ab["a"].shape[0] for ab in layers.values()), 0)


@overload
def _decoder(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    cache: KVCache,
    lora: Params | None,
    lora_scale: float,
    token_valid: jax.Array | None,
    first_layer: int,
    stop_layer: int | None = None,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> tuple[jax.Array, KVCache]: ...


@overload
def _decoder(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    cache: None,
    lora: Params | None,
    lora_scale: float,
    token_valid: jax.Array | None,
    first_layer: int,
    stop_layer: int | None = None,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> tuple[jax.Array, None]: ...


def _decoder(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    cache: KVCache | None,
    lora: Params | None,
    lora_scale: float,
    token_valid: jax.Array | None,
    first_layer: int,
    stop_layer: int | None = None,
    segments: jax.Array | None = None,
    key_blocks: int = 1,
) -> tuple[jax.Array, KVCache | None]:
    """Layers ``first_layer .. stop_layer - 1`` (default: to the top) on hidden states x
    [B, T, dim]; see :func:`forward`."""
    dt = jnp.dtype(cfg.dtype)
    B, T = x.shape[:2]
    if segments is not None and cache is not None:
        raise ValueError("_decoder: segments (shared-prefix rows) need cache=None")
    if key_blocks > 1 and cache is not None:
        raise ValueError("_decoder: key_blocks > 1 needs cache=None")
    if token_valid is None:
        token_valid = jnp.ones((B, T), bool)
    inv_freq = rope_frequencies(cfg)
    H, K, hd, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    lora_layers = (lora or {}).get("layers", {})
    rows = jnp.arange(B)[:, None]

    def block(h, lp, ll, attend):
        h = constrain(h, "residual")  # every layer boundary
        a_in = rms_norm(h, lp["attn_norm"], cfg.norm_eps)
        q = _linear(a_in, lp["wq"], ll.get("wq"), lora_scale)
        k = _linear(a_in, lp["wk"], ll.get("wk"), lora_scale)
        v = _linear(a_in, lp["wv"], ll.get("wv"), lora_scale)
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
        q = constrain(q.reshape(B, T, H, hd), "q")
        k, v = constrain(k.reshape(B, T, K, hd), "kv"), constrain(v.reshape(B, T, K, hd), "kv")
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        attn, kv_state = attend(q, k, v)
        h = h + _linear(attn, lp["wo"], ll.get("wo"), lora_scale)
        m_in = rms_norm(h, lp["mlp_norm"], cfg.norm_eps)
        gate = constrain(_linear(m_in, lp["w_gate"], ll.get("w_gate"), lora_scale), "ffn")
        up = constrain(_linear(m_in, lp["w_up"], ll.get("w_up"), lora_scale), "ffn")
        h = h + _linear(jax.nn.silu(gate) * up, lp["w_down"], ll.get("w_down"), lora_scale)
        return constrain(h, "residual"), kv_state

    # Layers run in scanned segments: an adapter may cover only the top layers (the layers below
    # run without it and, not depending on it, get no backward pass when training it), and a
    # cache may store the hidden state entering layer `hidden_at`.
    lora_from = lora_first_layer(cfg, lora) if lora_layers else L
    top = params.get("layers_top", ()) if cache is None else ()
    top_from = L - len(top)  # layers >= top_from have per-layer copies (unstack_top)
    cut_at = {first_layer, L, lora_from, top_from}
    if cache is not None and cache.h is not None:
        cut_at.add(cache.hidden_at)
    stop = L if stop_layer is None else stop_layer
    if stop < L and cache is not None:
        raise ValueError("_decoder: stop_layer needs cache=None")
    cuts = sorted({min(c, stop) for c in cut_at} | {stop})
    cuts = [c for c in cuts if first_layer <= c <= stop]
    spans = list(zip(cuts[:-1], cuts[1:]))

    def seg(lo, hi):
        # The base weights of a segment are not sliced out of the stacked [L, ...] arrays (XLA
        # copies a static slice, in every program that runs the segment: 26 of 30 layers' weights
        # per prefill / decode loop with an adapter on the top 4): the scan runs over the layer
        # indices and each step reads its layer from the whole stack (``layer_params``).
        lp = params["layers"] if (lo, hi) == (0, L) else jnp.arange(lo, hi)
        if lo < lora_from or not lora_layers:
            return lp, {}
        a, b = lo - lora_from, hi - lora_from
        ll = lora_layers if (a, b) == (0, L - lora_from) else jax.tree.map(lambda w: w[a:b], lora_layers)
        return lp, ll

    def layer_params(lp):  # a layer's weights: the scanned slice, or read at the scanned index
        return jax.tree.map(lambda w: w[lp], params["layers"]) if isinstance(lp, jax.Array) else lp

    if cache is None:

        def plain_layer(h, xs):
            lp, ll = xs
            h, _ = block(
                h,
                layer_params(lp),
                ll,
                lambda q, k, v: (
                    attention(
                        q, k.swapaxes(1, 2), v.swapaxes(1, 2), positions, positions, token_valid, segments, key_blocks
                    ),
                    None,
                ),
            )
            return h, None

        body = jax.checkpoint(plain_layer) if cfg.remat else plain_layer
        for lo, hi in spans:
            if lo < top_from:
                x, _ = jax.lax.scan(body, x, seg(lo, hi))
                continue
            for i in range(lo, hi):  # per-layer weights (unstack_top): one unrolled layer each
                ll = jax.tree.map(lambda w, j=i - lora_from: w[j], lora_layers) if i >= lora_from else {}
                x, _ = body(x, (top[i - top_from], ll))
        return x, None

    # Attention reads the layer's cache slots below each row's first new position plus the new
    # tokens' own keys/values (``cached_attention``); the new keys/values of all layers are
    # stacked by the scan and written with one scatter afterwards (writing inside the scan made
    # XLA:CPU rewrite the whole stacked cache buffer at every layer).
    write_pos = jnp.where(token_valid, positions, cache.size)  # padding goes past the end: dropped
    old_len = positions[:, 0]

    def layer(h, xs):
        lp, ll, i = xs

        def attend(q, k, v):
            ck, cv = cache.k[i].astype(dt), cache.v[i].astype(dt)
            return cached_attention(q, k, v, ck, cv, positions, old_len, token_valid), (k, v)

        return block(h, layer_params(lp), ll, attend)

    k_segs, v_segs, h_store = [], [], cache.h
    for lo, hi in spans:
        if h_store is not None and lo == cache.hidden_at and first_layer < lo:
            h_store = h_store.at[rows, write_pos].set(x.astype(h_store.dtype), mode="drop")
        x, (k_seg, v_seg) = jax.lax.scan(layer, x, (*seg(lo, hi), jnp.arange(lo, hi)))
        k_segs.append(k_seg)
        v_segs.append(v_seg)
    heads = jnp.arange(K)[None, None, :]
    r, w = rows[:, :, None], write_pos[:, :, None]
    new_k = jnp.concatenate(k_segs, axis=0) if len(k_segs) > 1 else k_segs[0]
    new_v = jnp.concatenate(v_segs, axis=0) if len(v_segs) > 1 else v_segs[0]
    # keys [L', B, T, K, hd] into the transposed [L, B, K, hd, S] cache: the indexed axes (row,
    # head, slot) are not adjacent there, so numpy rules put them first in the update's shape
    new_k = new_k.transpose(1, 2, 3, 0, 4)  # [B, T, K, L', hd]
    k_all = cache.k.at[first_layer:, r, heads, :, w].set(new_k.astype(cache.k.dtype), mode="drop")
    v_all = cache.v.at[first_layer:, r, heads, w].set(new_v.astype(cache.v.dtype), mode="drop")
    k_all, v_all = constrain(k_all, "k_cache"), constrain(v_all, "v_cache")
    return x, cache.replace(k=k_all, v=v_all, h=h_store)


def lm_head(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Projects final hidden states [..., dim] to float32 logits [..., vocab]."""
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    hidden = gather_rows_for_head(hidden[:, None] if hidden.ndim == 2 else hidden, cfg.dim).reshape(hidden.shape)
    w = w.astype(hidden.dtype)
    if hidden.dtype == jnp.float32:
        logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    else:
        logits = lowp_matmul(hidden, w, jnp.float32)
    return constrain(logits, "logits") if logits.ndim == 3 else logits


def causal_positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
