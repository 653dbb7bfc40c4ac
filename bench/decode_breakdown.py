"""Where a malt-jax decode step spends its time (a timing breakdown; one process, interleaved).

For SmolLM2-135M at each batch size, with the cache size ``generate`` uses for the sampler
benchmark (48 prompt + 64 new = 112 slots), times these jitted pieces, round-robin. The two
decode variants run 8 steps in a ``fori_loop`` with the cache carried and donated, as
``sampling.decode``'s while loop runs them (the cache is updated in place):

* ``step``      — one cached decode step: ``forward(cache=...)`` for one token per row + the
                  LM head + greedy argmax (per step, i.e. loop time / 8);
* ``sampled``   — ``step`` with the token drawn at temperature 0.7 from per-row keys
                  (``sampling.sample_rows``, as tree expansion samples) instead of greedily;
* ``no_cache``  — the same loop WITHOUT a KV cache (same weight matmuls, attention over the
                  token itself): the weight-bound part;
* ``head``      — the LM head ([B, 576] x [576, 49152]) + greedy pick alone (per step);
* ``attention`` — only the cached GQA attention of 30 layers (``llama.cached_attention`` of
                  one new token against the [B, K, hd, S] keys and [B, K, S, hd] values).

So ``step - no_cache`` is the cost of the KV cache (attention over S slots + the write of the
new keys/values). Run: ``python bench/decode_breakdown.py [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

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
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights, activations and KV cache (bfloat16: other samples than f32; %% of the bf16 peak)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,27,64")).split(",")]
    reps = args.reps or (3 if args.quick else 7)
    S = args.cache

    from malt_jax.config import SamplingConfig
    from malt_jax.model.llama import KVCache, cached_attention, forward, lm_head
    from malt_jax.sampling.decode import first_argmax, sample_rows
    from malt_jax.workflows.pipeline import load_model

    warm = SamplingConfig(temperature=0.7)

    model = load_model("smollm2")
    cfg, params = model.cfg, model.params
    cfg, params = common.in_dtype(cfg, params, args.dtype)
    L, K, H, hd = cfg.n_layers, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
    n_loop = 8
    print(f"# decode step breakdown, SmolLM2-135M, cache {S} slots\nmachine: {common.machine()}", flush=True)

    def make_loop(use_cache: bool, sampled: bool = False):
        def run(params, cache):
            B = cache.k.shape[1]
            keys = jax.random.split(jax.random.key(0), B)

            def body(i, carry):
                cache, acc = carry
                tok = jnp.ones((B, 1), jnp.int32)
                pos = jnp.full((B, 1), S // 2 + i, jnp.int32)
                h, new = forward(params, tok, pos, cfg, cache=cache if use_cache else None, return_hidden=True)
                logits = lm_head(params, h[:, 0], cfg)
                if sampled:
                    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
                    nxt = sample_rows(logits, step_keys, warm)
                else:
                    nxt = first_argmax(logits)  # greedy, as sample_logits picks it
                return (new if use_cache else cache), acc + nxt.sum()

            return jax.lax.fori_loop(0, n_loop, body, (cache, 0))

        return jax.jit(run, donate_argnums=1)

    loops = {"step": make_loop(True), "sampled": make_loop(True, sampled=True), "no_cache": make_loop(False)}

    @jax.jit
    def attn(q, cache, pos):
        B = q.shape[0]
        kv = jnp.zeros((B, 1, K, hd), q.dtype)
        old = pos[:, 0]

        def layer(acc, i):
            out = cached_attention(
                q + acc[:, None, :, None] * 0, kv, kv, cache.k[i], cache.v[i], pos, old, jnp.ones((B, 1), bool)
            )
            return acc + out[:, 0, :H], None

        acc, _ = jax.lax.scan(layer, jnp.zeros((B, H), jnp.dtype(cfg.dtype)), jnp.arange(L))
        return acc

    @jax.jit
    def head(params, h):  # the LM head + greedy pick of the step loops, alone (8 times)
        def body(i, acc):
            nxt = first_argmax(lm_head(params, h + acc * 1e-30, cfg))
            return acc + nxt[:, None].astype(h.dtype)

        return jax.lax.fori_loop(0, n_loop, body, jnp.zeros((h.shape[0], 1), h.dtype))

    variants: dict[str, Callable[[], Any]] = {}
    caches = {}
    for B in batches:
        pos = jnp.full((B, 1), S // 2, jnp.int32)
        q = jnp.ones((B, 1, H, hd), jnp.dtype(cfg.dtype))
        for name in loops:
            caches[name, B] = KVCache.zeros(cfg, B, S)

        def loop_call(name, B=B):
            caches[name, B], out = loops[name](params, caches[name, B])  # the donated cache comes back
            jax.block_until_ready(out)

        cache = KVCache.zeros(cfg, B, S)

        def attention(x=q, c=cache, ps=pos):
            return jax.block_until_ready(attn(x, c, ps))

        hidden = jax.random.normal(jax.random.key(1), (B, cfg.dim), jnp.dtype(cfg.dtype))

        def head_call(h=hidden):
            return jax.block_until_ready(head(params, h))

        variants.update(
            {
                f"head B={B}": head_call,
                f"step B={B}": functools.partial(loop_call, "step", B),
                f"sampled B={B}": functools.partial(loop_call, "sampled", B),
                f"no_cache B={B}": functools.partial(loop_call, "no_cache", B),
                f"attention B={B}": attention,
            }
        )
    peak = flops.measure_peak_jax(1024 if args.quick else 2048, dtype=args.dtype)
    times = common.interleaved(variants, reps, warmup=1)
    peak = max(peak, flops.measure_peak_jax(1024 if args.quick else 2048, dtype=args.dtype))  # best of before/after
    print(f"{args.dtype} matmul peak (jax), best of before/after: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    wbytes = flops.matmul_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize
    step_flops = 2.0 * flops.matmul_params(cfg) + flops.model_flops.attention_flops(cfg, S // 2 + n_loop / 2)
    for B in batches:
        m = {k.split()[0]: 1e3 * common.median(v) for k, v in times.items() if k.endswith(f"B={B}")}
        for k in ("step", "sampled", "no_cache", "head"):
            m[k] /= n_loop
        cache_mb = 2 * L * B * K * S * hd * jnp.dtype(cfg.dtype).itemsize / 1e6
        rows.append(
            {
                "batch": B,
                "step ms": m["step"],
                "sampled step ms": m["sampled"],
                "no_cache ms": m["no_cache"],
                "attention ms": m["attention"],
                "LM head ms": m["head"],
                "cache share of step": f"{100 * (m['step'] - m['no_cache']) / m['step']:.0f}%",
                # model FLOPs of one step (every weight matmul + the LM head + attention over the
                # ~S/2 keys the loop's tokens see) over the measured matmul peak in --dtype
                "step % of peak": round(100 * B * step_flops / (m["step"] / 1e3) / peak, 1),
                "sampled % of peak": round(100 * B * step_flops / (m["sampled"] / 1e3) / peak, 1),
                "KV cache MB": round(cache_mb, 1),
                "weights MB": round(wbytes / 1e6),
            }
        )
    print(common.table(rows, list(rows[0].keys())), flush=True)
    common.save_json(args.json, {"machine": common.machine(), "dtype": args.dtype, "peak": peak, "rows": rows})


if __name__ == "__main__":
    main()
