"""Accelerator roofline of malt-jax (issue 8, item 3): MFU of the LoRA SFT and DPO steps of a
1B-shaped Llama (random weights, bf16) and the HBM bandwidth a batch-1 decode step achieves.

Meant for a GPU (or TPU) host; ``--quick`` runs the same code on a tiny model on CPU (a smoke
run, its percentages mean nothing). One process, compile excluded, medians of timed reps.

* **peak**: the device's dense bf16 matmul peak from its spec sheet (``--peak-tflops``; known
  for H100/H200 SXM) **and** the FLOP/s of a large jitted bf16 matmul measured in this run;
  memory: the spec HBM bandwidth (``--hbm-tbs``) and a measured read of a large array.
* **SFT / DPO**: ``stepper.Stepper`` as the MALT recipe runs it (LoRA on all 7 projections,
  AdamW, clipping), ``--rows`` rows of ``--seq`` tokens (DPO: rows/2 pairs); model FLOPs per
  step from ``flops.lora_train_flops`` (forward ``2N`` + activation gradients ``2N`` per token
  + attention; the frozen base gets no weight gradients), MFU = FLOPs / time / peak.
* **decode, batch 1**: ``sampling.generate`` greedy for ``--new-tokens`` after a ``--prompt``
  token prompt; per-step time = (generate - prefill) / new tokens; bytes a step must read = all
  matmul weights + the KV cache up to the current position; utilisation = bytes / time / HBM
  (spec and measured read bandwidth).

Run on a lent H100 (its image has jax, flax, optax, orbax, chex, einops)::

    PYTHONPATH=. python3 bench/gpu_roofline.py --json $OUT/gpu_roofline.json

and on CPU as a smoke run: ``.venv/bin/python bench/gpu_roofline.py --quick``.
"""

from __future__ import annotations

import argparse
import time

import common
import flops

# Dense (no sparsity) bf16 tensor-core peak and HBM bandwidth from the vendor spec sheets.
SPECS = {  # device_kind substring -> (TFLOP/s, TB/s)
    "H100 80GB HBM3": (989.0, 3.35),  # H100 SXM
    "H100 PCIe": (756.0, 2.0),
    "H200": (989.0, 4.8),
    "A100": (312.0, 2.0),
}


def spec_for(kind: str) -> tuple[float | None, float | None]:
    for k, v in SPECS.items():
        if k.lower() in kind.lower():
            return v
    return None, None


def median_time(fn, reps: int) -> float:
    fn()  # compile / warm-up
    return common.median([common.timed(fn) for _ in range(reps)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke run)")
    ap.add_argument("--preset", default="llama-3.2-1b", help="model shape (random weights)")
    ap.add_argument("--rows", type=int, default=None, help="rows per training step (default 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, as llama32_1b_gsm8k.yaml)")
    ap.add_argument("--prompt", type=int, default=None, help="decode prompt tokens (default 512)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 128)")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 5)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="spec bf16 peak (default: by device kind)")
    ap.add_argument("--hbm-tbs", type=float, default=None, help="spec memory bandwidth (default: by device kind)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from malt_jax.config import MODEL_PRESETS, LoraConfig, ModelConfig, SamplingConfig, TrainConfig
    from malt_jax.model.llama import KVCache, init_params
    from malt_jax.model.lora import init_lora
    from malt_jax.sampling.decode import StopCriteria, generate, prefill, row_keys
    from malt_jax.training.data import DPOExample, SFTExample, pack_dpo, pack_sft
    from malt_jax.training.role import Stepper, TrainState, make_optimizer

    q = args.quick
    rows, seq = args.rows or (4 if q else 8), args.seq or (64 if q else 1024)
    prompt, new = args.prompt or (32 if q else 512), args.new_tokens or (16 if q else 128)
    reps = args.reps or (2 if q else 5)
    dtype = "float32" if q else "bfloat16"
    cfg = (
        ModelConfig.tiny(dtype=dtype, param_dtype=dtype)
        if q
        else MODEL_PRESETS[args.preset](dtype=dtype, param_dtype=dtype)
    )
    dev = jax.devices()[0]
    spec_tf, spec_bw = spec_for(dev.device_kind)
    spec_tf, spec_bw = args.peak_tflops or spec_tf, args.hbm_tbs or spec_bw
    log = common.log
    log(
        f"# accelerator roofline: {args.preset if not q else 'tiny (smoke run)'}, {dtype}\n"
        f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; spec peak "
        f"{spec_tf or '?'} TFLOP/s, {spec_bw or '?'} TB/s"
    )
    peak = flops.measure_peak_jax(1024 if q else 8192, dtype=dtype)
    bw = flops.measure_bandwidth_jax(64 if q else 4096)
    log(f"measured: {dtype} matmul {peak / 1e12:.2f} TFLOP/s (best of 5); memory read {bw / 1e12:.3f} TB/s")
    peaks = {"measured": peak, **({"spec": spec_tf * 1e12} if spec_tf else {})}

    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"model: {n_params / 1e9:.3f} B parameters, {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}")
    rng = np.random.default_rng(0)

    def tok(n: int) -> list[int]:
        return rng.integers(3, cfg.vocab_size, n).tolist()

    lora_cfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    targets = lora_cfg.targets
    results: dict = {"device": dev.device_kind, "dtype": dtype, "peaks": peaks, "read_bw": bw, "rows": []}

    # ---- training steps
    half = seq // 2
    for kind in ("sft", "dpo"):
        tc = TrainConfig(batch_size=rows if kind == "sft" else rows // 2, max_seq_len=seq)
        opt = make_optimizer(tc, total_steps=1000, learning_rate=1e-4)
        stepper = Stepper(kind, cfg, lora_cfg, tc, opt)
        base, state = stepper.place(params, TrainState.create(init_lora(cfg, lora_cfg, jax.random.key(1)), opt))
        if kind == "sft":
            batch = pack_sft([SFTExample(tok(half), tok(seq - half)) for _ in range(rows)], seq)
            extra: tuple = ()
        else:
            batch = pack_dpo([DPOExample(tok(half), tok(seq - half), tok(seq - half)) for _ in range(rows // 2)], seq)
            extra = (jnp.zeros((rows,), jnp.float32),)
        box = {"state": state}

        def step():
            box["state"], _ = stepper(base, box["state"], batch, *extra)  # noqa: B023 - step runs in this iteration

        t = median_time(step, reps)
        fl = flops.lora_train_flops(cfg, [seq] * rows, args.rank, targets)
        row = {
            "what": f"LoRA {kind.upper()} step",
            "shape": f"{rows} x {seq} tokens",
            "median s": t,
            "tokens/s": rows * seq / t,
            "TFLOP/s": fl / t / 1e12,
            **{f"MFU vs {k} peak %": 100 * fl / t / v for k, v in peaks.items()},
        }
        results["rows"].append(row)
        log(common.table([row], list(row)))

    # ---- batch-1 decode
    greedy = SamplingConfig(greedy=True)
    x = jnp.asarray([tok(prompt)], jnp.int32)
    lens = jnp.asarray([prompt], jnp.int32)
    pf = jax.jit(prefill, static_argnames=("cfg",))

    def gen():
        return jax.block_until_ready(
            generate(
                params,
                x,
                lens,
                row_keys(0, 1),
                cfg=cfg,
                sampling=greedy,
                stop=StopCriteria(),
                max_new_tokens=new,
            )
        )

    def pre():
        return jax.block_until_ready(
            pf(params, cfg, KVCache.zeros(cfg, 1, prompt + new), x, lens, jnp.zeros((1,), jnp.int32))
        )

    tg, tp = median_time(gen, reps), median_time(pre, reps)
    step_s = (tg - tp) / new
    itemsize = jnp.dtype(dtype).itemsize
    w_bytes = flops.matmul_params(cfg) * itemsize
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize * (prompt + new / 2)  # mean context
    achieved = (w_bytes + kv_bytes) / step_s
    row = {
        "what": "decode step, batch 1",
        "shape": f"prompt {prompt}, {new} new",
        "median s": step_s,
        "tokens/s": 1 / step_s,
        "GB read per step": (w_bytes + kv_bytes) / 1e9,
        "achieved TB/s": achieved / 1e12,
        "% of measured read BW": 100 * achieved / bw,
        **({"% of spec HBM": 100 * achieved / (spec_bw * 1e12)} if spec_bw else {}),
    }
    results["rows"].append(row)
    log(common.table([row], list(row)))
    log(f"(generate {tg:.3f} s, prefill alone {tp:.3f} s)")
    common.save_json(args.json, results)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
