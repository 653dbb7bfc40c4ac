"""FLOP accounting and the machine's measured peak, for "fraction of peak" columns.

* :func:`measure_peak_jax` — best FLOP/s of a large jitted float32 matmul (the practical peak
  of this CPU under XLA); every benchmark measures it in its own run, so the fraction it
  prints compares numbers taken under the same load.
* :func:`measure_bandwidth_jax` — bytes/s of a jitted reduction over a large array (the
  practical memory-read bandwidth). Small-batch decoding reads every weight once per step and
  does ~2 FLOPs per weight and row, so it is bandwidth-bound long before it is FLOP-bound.
* Model FLOPs come from ``malt_jax.planning.flops`` (the one set of formulas, conventions stated there),
  in the usual "MFU" convention: useful matmul work, each token attending its real causal
  context, padding excluded.

    python bench/flops.py            # prints the measured peak and bandwidth (and torch's)
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the project root on sys.path)

from malt_jax.planning import flops as model_flops


def matmul_params(cfg) -> int:
    """Weights used in matmuls per token: all projections of every layer + the LM head."""
    return model_flops.matmul_params(cfg)


def causal_pairs(t: float) -> float:
    """(query, key) pairs of a causal row of ``t`` real tokens: token i attends i keys."""
    return t * (t + 1) / 2


def decode_flops(cfg, batch: int, prompt_lens, new_tokens: int) -> float:
    """Model FLOPs of prefill + ``new_tokens`` decode steps for ``batch`` rows (``prompt_lens``:
    per-row prompt lengths). Each token attends to its real context."""
    return sum(
        model_flops.forward_flops(cfg, p + new_tokens, causal_pairs(p + new_tokens)) for p in prompt_lens[:batch]
    )


def lora_params_per_token(cfg, rank: int, targets) -> int:
    return model_flops.lora_params(cfg, rank, targets)


def lora_forward_flops(cfg, seq_lens, rank: int, targets) -> float:
    """Model FLOPs of a forward pass with a LoRA adapter on every layer over rows of the given real lengths."""
    lp = lora_params_per_token(cfg, rank, targets)
    return sum(model_flops.forward_flops(cfg, t, causal_pairs(t), lp) for t in seq_lens)


def lora_train_flops(cfg, seq_lens, rank: int, targets) -> float:
    """Model FLOPs of one LoRA training step (forward + backward, frozen base, every layer adapted)
    over rows of the given real lengths. The reference pass is NOT included (both sides precompute it)."""
    return sum(model_flops.lora_train_flops(cfg, rank, targets, 0, t, causal_pairs(t)) for t in seq_lens)


def measure_peak_jax(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of an ``n x n @ n x n`` jitted matmul in ``dtype`` (compile excluded),
    accumulated in float32 (for bfloat16, the ``bf16 x bf16 -> f32`` dot the model runs:
    XLA:CPU computes a bf16-result dot in f32, at the f32 rate)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def measure_bandwidth_jax(mbytes: int = 512, reps: int = 5) -> float:
    """Best bytes/s of a jitted sum over a ``mbytes`` MB float32 array (a pure memory read)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.size * 4 / best


def measure_peak_torch(n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of a float32 torch matmul (torch's own threads, as set by the caller)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller matmul / array")
    args = ap.parse_args()
    from malt_jax.config import ModelConfig

    n = 1024 if args.quick else 2048
    cfg = ModelConfig.smollm2_135m()
    print(f"machine: {common.machine()}")
    peak = measure_peak_jax(n)
    bw = measure_bandwidth_jax(128 if args.quick else 512)
    print(f"jax f32 matmul peak ({n}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"jax bf16 matmul peak ({n}^3, f32 accumulation): {measure_peak_jax(n, dtype='bfloat16') / 1e9:.1f} GFLOP/s")
    print(f"jax memory read bandwidth: {bw / 1e9:.1f} GB/s")
    try:
        import torch

        torch.set_num_threads(2)
        print(f"torch f32 matmul peak ({n}^3, 2 threads): {measure_peak_torch(n) / 1e9:.1f} GFLOP/s")
    except ImportError:
        pass
    nm = matmul_params(cfg)
    print(
        f"SmolLM2-135M: {nm / 1e6:.1f}M matmul weights/token -> {2 * nm / 1e6:.0f} MFLOP per token forward; "
        f"f32 weights = {nm * 4 / 1e6:.0f} MB read per decode step"
    )
    print(
        f"decode roofline at batch B: ~min(peak, B x 2 FLOP/weight x bandwidth / 4 B) = "
        f"B x {2 * bw / 4 / 1e9:.1f} GFLOP/s until {peak / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
