"""The full-parameter train step of a small model (the testbed's pretraining), one process,
interleaved: where XLA:CPU spends it, and what ``llama._linear``'s flattened products save.

    .venv/bin/python bench/pretrain_step.py [--quick] [--reps N] [--json PATH]

Variants, all on the same parameters and batch (gradients compared):

* ``flat``   -- the model as it is: every projection multiplies ``[batch * time, in]`` rows;
* ``3d``     -- the projections on ``[batch, time, in]`` activations (the layout before), whose
  weight gradient XLA:CPU computes as a product contracting two axes;
* ``forward`` -- the forward pass alone (the step's floor is about 3x it).

Reports median step times, tokens/s, the model FLOP rate of the step (``planning/flops.py``:
6 x matmul parameters per token plus attention) and the ratio of the two layouts.
"""

from __future__ import annotations

import argparse

from common import interleaved, log, machine, median, save_json, table

import jax
import jax.numpy as jnp

from malt_jax.config import ModelConfig
from malt_jax.model import llama
from malt_jax.planning.flops import attention_flops, matmul_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny shape, 2 reps (smoke test)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    B, T = (2, 32) if args.quick else (args.batch, args.seq_len)
    reps = 2 if args.quick else args.reps
    cfg = ModelConfig(
        vocab_size=320, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32, hidden_dim=512, max_seq_len=512
    )
    params = llama.init_params(cfg, jax.random.key(0))
    rows = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
    log(f"machine: {machine()}")
    log(f"model: {cfg.n_params:,} parameters; batch {B} x {T} tokens")

    def loss(p, rows):
        x, y = rows[:, :-1], rows[:, 1:]
        logits, _ = llama.forward(p, x, llama.causal_positions(*x.shape), cfg)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()

    flat_linear = llama._linear

    def linear_3d(x, w, lora, scale):  # the layout before: products over [batch, time, in]
        y = x @ w.astype(x.dtype)
        if lora is not None:
            y = y + scale * llama.lora_delta(x, lora["a"].astype(x.dtype), lora["b"].astype(x.dtype))
        return y

    grad = jax.jit(jax.grad(loss))
    flat = grad.lower(params, rows).compile()
    llama._linear = linear_3d
    try:
        three_d = jax.jit(jax.grad(loss)).lower(params, rows).compile()
    finally:
        llama._linear = flat_linear
    forward = jax.jit(loss).lower(params, rows).compile()
    g_flat, g_3d = flat(params, rows), three_d(params, rows)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_flat), jax.tree.leaves(g_3d)))
    times = interleaved(
        {
            "flat": lambda: jax.block_until_ready(flat(params, rows)),
            "3d": lambda: jax.block_until_ready(three_d(params, rows)),
            "forward": lambda: jax.block_until_ready(forward(params, rows)),
        },
        reps,
        log=log,
    )
    tokens = B * T
    # forward: 2 FLOPs per weight and token, attention over each row's causal pairs; the step is 3x
    step_flops = 3 * (tokens * 2 * matmul_params(cfg) + B * attention_flops(cfg, T * (T + 1) / 2))
    out = []
    for name, ts in times.items():
        med = median(ts)
        flops = step_flops / 3 if name == "forward" else step_flops
        out.append({"variant": name, "median_s": med, "tokens_per_s": tokens / med, "GFLOP_per_s": flops / med / 1e9})
    log(table(out, ["variant", "median_s", "tokens_per_s", "GFLOP_per_s"]))
    ratio = median(times["3d"]) / median(times["flat"])
    log(f"3d / flat step time: {ratio:.2f}x; largest gradient difference {diff:.3g}")
    save_json(
        args.json,
        {
            "benchmark": "pretrain_step",
            "batch": B,
            "seq_len": T,
            "n_params": cfg.n_params,
            "rows": out,
            "ratio_3d_over_flat": ratio,
            "max_grad_diff": diff,
            "reps": reps,
        },
    )


if __name__ == "__main__":
    main()
