"""Where a malt-jax decode step spends its time (a timing breakdown; one process, interleaved).

For SmolLM2-135M at each batch size, with the cache size ``generate`` uses for the sampler
benchmark (48 prompt + 64 new = 112 slots), times these jitted pieces, round-robin:

* ``step``       — one full cached decode step: ``forward(cache=...)`` for one token per row
                   + the LM head (what ``sampling.decode`` runs per token);
* ``no_head``    — the same without the LM head;
* ``no_cache``   — the decoder on one token per row WITHOUT a KV cache (same weight matmuls,
                   attention over the token itself): the weight-bound part;
* ``kv_scatter`` — only the per-layer cache writes ``cache.at[layer, row, head, pos].set(kv)``
                   carried through a 30-layer scan (how ``llama.forward`` wrote the cache until
                   session 2; it now writes all layers once after the scan);
* ``attention``  — only the cached GQA attention (``llama.attention`` on q [B,1,H,hd] against
                   the full [B,K,S,hd] cache) for 30 layers.

So ``step - no_cache`` is the cost of the KV cache (writes + attention over S slots), which the
other two rows split. Run: ``python bench/decode_breakdown.py [--quick]``.
"""

from __future__ import annotations

import argparse

import common
import flops

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", default=None, help="default 1,8,27,64")
    ap.add_argument("--cache", type=int, default=112, help="cache slots (default 112 = 48 + 64)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,27,64")).split(",")]
    reps = args.reps or (3 if args.quick else 7)
    S = args.cache

    from malt_jax.model.llama import KVCache, attention, forward, lm_head
    from malt_jax.pipeline import load_model

    model = load_model("smollm2")
    cfg, params = model.cfg, model.params
    L, K, H, hd = cfg.n_layers, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
    print(f"# decode step breakdown, SmolLM2-135M, cache {S} slots\nmachine: {common.machine()}", flush=True)

    @jax.jit
    def step(params, tok, pos, cache):
        h, cache = forward(params, tok, pos, cfg, cache=cache, return_hidden=True)
        return lm_head(params, h[:, 0], cfg), cache

    @jax.jit
    def no_head(params, tok, pos, cache):
        return forward(params, tok, pos, cfg, cache=cache, return_hidden=True)

    @jax.jit
    def no_cache(params, tok, pos):
        h, _ = forward(params, tok, pos, cfg, return_hidden=True)
        return lm_head(params, h[:, 0], cfg)

    @jax.jit
    def kv_scatter(cache, kv, pos):
        B = kv.shape[0]
        rows = jnp.arange(B)[:, None, None]
        heads = jnp.arange(K)[None, None, :]
        w = pos[:, :, None]

        def layer(carry, i):
            ka, va = carry
            ka = ka.at[i, rows, heads, w].set(kv, mode="drop")
            va = va.at[i, rows, heads, w].set(kv, mode="drop")
            return (ka, va), ka[i, 0, 0, 0, 0] + va[i, 0, 0, 0, 0]

        (ka, va), s = jax.lax.scan(layer, (cache.k, cache.v), jnp.arange(L))
        return ka, va, s

    @jax.jit
    def attn(q, cache, pos):
        B = q.shape[0]
        k_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
        valid = jnp.ones((B, S), bool)

        def layer(acc, i):
            out = attention(q + acc[:, None, :, None] * 0, cache.k[i], cache.v[i], pos, k_pos, valid)
            return acc + out[:, 0, :H].sum(-1, keepdims=True) * 0 + out[:, 0, :H], None

        acc, _ = jax.lax.scan(layer, jnp.zeros((B, H), jnp.float32), jnp.arange(L))
        return acc

    variants = {}
    for B in batches:
        tok = jnp.ones((B, 1), jnp.int32)
        pos = jnp.full((B, 1), S // 2, jnp.int32)
        cache = KVCache.zeros(cfg, B, S)
        kv = jnp.ones((B, 1, K, hd), jnp.float32)
        q = jnp.ones((B, 1, H, hd), jnp.float32)
        variants.update({
            f"step B={B}": lambda p=params, t=tok, ps=pos, c=cache: jax.block_until_ready(step(p, t, ps, c)),
            f"no_head B={B}": lambda p=params, t=tok, ps=pos, c=cache: jax.block_until_ready(no_head(p, t, ps, c)),
            f"no_cache B={B}": lambda p=params, t=tok, ps=pos: jax.block_until_ready(no_cache(p, t, ps)),
            f"kv_scatter B={B}": lambda c=cache, x=kv, ps=pos: jax.block_until_ready(kv_scatter(c, x, ps)),
            f"attention B={B}": lambda x=q, c=cache, ps=pos: jax.block_until_ready(attn(x, c, ps)),
        })
    times = common.interleaved(variants, reps, warmup=1)
    rows = []
    wbytes = flops.matmul_params(cfg) * 4
    for B in batches:
        m = {k.split()[0]: 1e3 * common.median(v) for k, v in times.items() if k.endswith(f"B={B}")}
        cache_mb = 2 * L * B * K * S * hd * 4 / 1e6
        rows.append({"batch": B, "step ms": m["step"], "no_head ms": m["no_head"], "no_cache ms": m["no_cache"],
                     "kv_scatter ms": m["kv_scatter"], "attention ms": m["attention"],
                     "cache share of step": f"{100 * (m['step'] - m['no_cache']) / m['step']:.0f}%",
                     "KV cache MB": round(cache_mb, 1), "weights MB": round(wbytes / 1e6)})
    print(common.table(rows, list(rows[0].keys())), flush=True)
    common.save_json(args.json, {"machine": common.machine(), "rows": rows})


if __name__ == "__main__":
    main()
