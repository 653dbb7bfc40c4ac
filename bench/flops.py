"""FLOP accounting and the machine's measured peak, for "fraction of peak" columns.

* :func:`measure_peak_jax` — best FLOP/s of a large jitted float32 matmul (the practical peak
  of this CPU under XLA); every benchmark measures it in its own run, so the fraction it
  prints compares numbers taken under the same load.
* :func:`measure_bandwidth_jax` — bytes/s of a jitted reduction over a large array (the
  practical memory-read bandwidth). Small-batch decoding reads every weight once per step and
  does ~2 FLOPs per weight and row, so it is bandwidth-bound long before it is FLOP-bound.
* Model FLOPs (the usual "MFU" convention: useful matmul work, causal attention counted over
  the real context only, padding excluded):
    forward per token   = 2·N_matmul + 4·L·H·hd·ctx       (N_matmul includes the LM head)
    LoRA training token = forward + backward, where the frozen base needs activation
                          gradients only: 2·N_matmul + 2·attention (no weight gradients)
                          + the tiny LoRA matmuls (fwd + 2x bwd).

    python bench/flops.py            # prints the measured peak and bandwidth (and torch's)
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the project root on sys.path)


def matmul_params(cfg) -> int:
    """Weights used in matmuls per token: all projections of every layer + the LM head."""
    L, D, H, K, hd, F = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    per_layer = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F
    return L * per_layer + D * cfg.vocab_size


def attn_flops(cfg, ctx: float) -> float:
    """Attention FLOPs (QK^T and PV) of one query token attending to ``ctx`` keys, all layers."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * ctx


def decode_flops(cfg, batch: int, prompt_lens, new_tokens: int) -> float:
    """Model FLOPs of prefill + ``new_tokens`` decode steps for ``batch`` rows (``prompt_lens``:
    per-row prompt lengths). Each token attends to its real context."""
    n = matmul_params(cfg)
    total = 0.0
    for p in prompt_lens[:batch]:
        seq = p + new_tokens
        # tokens 1..seq each attend to (their index) keys: sum = seq (seq + 1) / 2
        total += 2.0 * n * seq + attn_flops(cfg, 1.0) * seq * (seq + 1) / 2
    return total


def lora_params_per_token(cfg, rank: int, targets) -> int:
    L, D, H, K, hd, F = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    dims = {"wq": (D, H * hd), "wk": (D, K * hd), "wv": (D, K * hd), "wo": (H * hd, D),
            "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    return L * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def lora_train_flops(cfg, seq_lens, rank: int, targets) -> float:
    """Model FLOPs of one LoRA training step (forward + backward, frozen base) over rows of the
    given real lengths. The reference pass is NOT included (both sides precompute it)."""
    n = matmul_params(cfg)
    lp = lora_params_per_token(cfg, rank, targets)
    total = 0.0
    for t in seq_lens:
        attn = attn_flops(cfg, 1.0) * t * (t + 1) / 2
        fwd = 2.0 * (n + lp) * t + attn
        bwd = 2.0 * n * t + 2.0 * attn + 4.0 * lp * t
        total += fwd + bwd
    return total


def measure_peak_jax(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of an ``n x n @ n x n`` jitted matmul in ``dtype`` (compile excluded)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measure_bandwidth_jax(mbytes: int = 512, reps: int = 5) -> float:
    """Best bytes/s of a jitted sum over a ``mbytes`` MB float32 array (a pure memory read)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mbytes * 2 ** 20 // 4,), jnp.float32)
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
    return 2.0 * n ** 3 / best


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
    print(f"jax memory read bandwidth: {bw / 1e9:.1f} GB/s")
    try:
        import torch

        torch.set_num_threads(2)
        print(f"torch f32 matmul peak ({n}^3, 2 threads): {measure_peak_torch(n) / 1e9:.1f} GFLOP/s")
    except ImportError:
        pass
    nm = matmul_params(cfg)
    print(f"SmolLM2-135M: {nm / 1e6:.1f}M matmul weights/token -> {2 * nm / 1e6:.0f} MFLOP per token forward; "
          f"f32 weights = {nm * 4 / 1e6:.0f} MB read per decode step")
    print(f"decode roofline at batch B: ~min(peak, B x 2 FLOP/weight x bandwidth / 4 B) = "
          f"B x {2 * bw / 4 / 1e9:.1f} GFLOP/s until {peak / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
