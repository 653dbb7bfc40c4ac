"""The LoRA DPO step under its speed options, one process, interleaved.

The step of ``bench/dpo_vs_trl.py`` (SmolLM2-135M, LoRA rank 8 on all seven projections of every
layer, 2 pairs of prompt 35 + completions 93 tokens, shared-prompt rows, f32), on random tokens,
with the options that change only its speed switched off one by one:

* ``scan, dense``   — the layers scanned over the stacked weights, dense attention (before 2026-11-30);
* ``unstacked``     — per-layer copies of the adapted layers' base weights, run unrolled
                      (``train.unstack_layers``, ``llama.unstack_top``);
* ``+ key blocks``  — and the attention in query blocks (``steps.KEY_BLOCKS``; the default);
* ``+ bf16``        — and bf16 base weights and compute (``ModelConfig(dtype="bfloat16",
                      param_dtype="bfloat16")``; matmuls accumulate in f32, ``llama.lowp_matmul``;
                      the adapter and optimizer stay f32). Not a speed-only option: it rounds.

Each variant is its own compiled step (``steps.KEY_BLOCKS`` is read when the step is traced);
all start from the same state and batch, so the f32 variants' losses agree to float rounding
(printed); the bf16 one's differs by bf16 rounding.
Reports the median step time, the compile time (first call) and the ratios to the first.
Run: ``python bench/dpo_step_options.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Literal

import common

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, short rows: a smoke run")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 9)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 9)

    from malt_jax.config import LoraConfig, TrainConfig
    from malt_jax.model.lora import init_lora
    from malt_jax.training import data as D, steps
    from malt_jax.training.role import Stepper, TrainState, make_optimizer
    from malt_jax.workflows.pipeline import load_model

    model = load_model("smollm2")
    cfg, params = model.cfg, model.params
    if args.quick:
        cfg = dataclasses.replace(cfg, n_layers=2)
        params = {**params, "layers": jax.tree.map(lambda w: w[:2], params["layers"])}
    prompt, seq = (35, 128) if not args.quick else (12, 32)  # prompt + completion = seq, as in dpo_vs_trl
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return [int(t) for t in rng.integers(100, 40000, n)]

    pairs = [D.DPOExample(ids(prompt), ids(seq - prompt), ids(seq - prompt)) for _ in range(2)]
    lcfg = LoraConfig(rank=8, alpha=16.0, targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    base_cfg = TrainConfig(
        batch_size=2, grad_accum=1, dpo_beta=0.2, grad_clip=1.0, weight_decay=0.0, warmup_ratio=0.0, max_seq_len=seq
    )
    batch = D.pack_dpo_shared(pairs, seq)
    ref = np.full(4, -300.0, np.float32)
    common.log(
        f"# LoRA DPO step under its speed options, SmolLM2-135M{' (2 layers)' if args.quick else ''}\n"
        f"machine: {common.machine()}\nbatch: {batch['tokens'].shape} tokens, score width "
        f"{batch['score_index'].shape[-1]}; load average {os.getloadavg()}"
    )
    # (name, train.unstack_layers, steps.KEY_BLOCKS, dtype); label_smoothing keeps each its own
    # compiled step
    variants: list[tuple[str, bool, int, Literal["float32", "bfloat16"]]] = [
        ("scan, dense", False, 1, "float32"),
        ("unstacked", True, 1, "float32"),
        ("unstacked + key blocks", True, 4, "float32"),
        ("unstacked + key blocks + bf16", True, 4, "bfloat16"),
    ]
    fns, compile_s, losses = {}, {}, {}
    default_blocks = steps.KEY_BLOCKS
    try:
        for i, (name, unstack, blocks, dtype) in enumerate(variants):
            tc = dataclasses.replace(base_cfg, unstack_layers=unstack, label_smoothing=1e-12 * i)
            opt = make_optimizer(tc, 100, 5e-5)
            mc, mp = common.in_dtype(cfg, params, dtype)
            stepper = Stepper("dpo", mc, lcfg, tc, opt)
            adapter = jax.tree.map(lambda w: w + 0.01, init_lora(mc, lcfg, jax.random.key(0)))
            b, st = stepper.place(mp, TrainState.create(adapter, opt))
            steps.KEY_BLOCKS = blocks  # read when the step is traced: on its first call
            t = time.perf_counter()
            _, m = stepper(b, st, batch, ref)
            compile_s[name], losses[name] = time.perf_counter() - t, m["loss"]
            fns[name] = lambda s=stepper, b=b, st=st: s(b, st, batch, ref)
    finally:
        steps.KEY_BLOCKS = default_blocks
    times = common.interleaved(fns, reps, warmup=1, log=common.log)
    first = common.median(times[variants[0][0]])
    rows = [
        {
            "variant": name,
            "median step s": common.median(times[name]),
            "min-max": f"{min(times[name]):.2f}-{max(times[name]):.2f}",
            "speed-up vs scan, dense": first / common.median(times[name]),
            "first call (compile) s": compile_s[name],
            "loss": losses[name],
        }
        for name, *_ in variants
    ]
    common.log(f"\n## DPO step, {reps} interleaved steps per variant\n" + common.table(rows, list(rows[0])))
    common.save_json(args.json, {"machine": common.machine(), "rows": rows, "times": times})


if __name__ == "__main__":
    main()
