"""malt-jax ``generate`` vs Hugging Face transformers ``generate()`` (PyTorch CPU), one process.

Same model, same weights: the SmolLM2-135M-Instruct weights malt-jax loads (f32, dequantized
from the embedded GGUF) are exported with ``malt_jax.model.weights.save_hf`` to a temp dir and
loaded there with ``LlamaForCausalLM.from_pretrained``. Same prompts (the same token ids: the
malt-jax tokenizer encodes them; HF gets them left-padded, malt-jax right-padded), same batch
sizes (1, 8, 27), greedy, the same number of new tokens per row (HF: ``min_new_tokens =
max_new_tokens``; malt-jax: no stop ids), torch threads = 2 (the machine's cores). The two are
timed interleaved (jax B=1, hf B=1, jax B=8, ...) after warm-up (jax compile excluded).

Sanity check printed first: greedy tokens of both on the same prompts (leading tokens that
agree per row; compared up to malt-jax's first EOS, which HF suppresses).

Needs the optional peers env (``make peers``):

    .venv-peers/bin/python bench/vs_transformers.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import common
import flops

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes (default 1,8,27)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 2)")
    ap.add_argument(
        "--threads",
        type=str,
        default="2,1",
        help="torch intra-op thread counts to time HF with (default 2,1; the ratio uses the "
        "fastest: on a loaded 2-core VM, 2 OpenMP threads can be slower than 1)",
    )
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,27")).split(",")]
    N = args.new_tokens or (16 if args.quick else 32)
    reps = args.reps or 2

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from malt_jax.config import SamplingConfig
    from malt_jax.model.weights import save_hf
    from malt_jax.sampling.decode import StopCriteria, generate, pad_batch, row_keys

    threads = [int(t) for t in args.threads.split(",")]
    log = common.log
    model = common.peer_start(
        "malt-jax vs transformers generate()", threads, {"transformers": transformers.__version__}
    )
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, cfg, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.eval()
    eos = tok.eos_id if tok.eos_id is not None else tok.stop_ids[0]
    peak = flops.measure_peak_jax(1024 if args.quick else 2048)
    peak_t = flops.measure_peak_torch(1024 if args.quick else 2048)
    log(f"measured f32 matmul peak: jax {peak / 1e9:.1f} GFLOP/s, torch {peak_t / 1e9:.1f} GFLOP/s")
    greedy = SamplingConfig(greedy=True)

    def make(B):
        ids = [tok.encode_chat([{"role": "user", "content": t}]) for t in common.prompts(B)]
        x, lens = pad_batch(ids, bucket=16)
        xj, lj, keys = jnp.asarray(x), jnp.asarray(lens), row_keys(0, B)
        width = max(len(i) for i in ids)
        left = np.zeros((B, width), np.int64)
        mask = np.zeros((B, width), np.int64)
        for i, s in enumerate(ids):
            left[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
        xt, mt = torch.from_numpy(left), torch.from_numpy(mask)

        def run_jax():
            g = generate(params, xj, lj, keys, cfg=cfg, sampling=greedy, stop=StopCriteria(), max_new_tokens=N)
            return np.asarray(jax.block_until_ready(g).tokens)

        def run_hf(n_threads=threads[0]):
            torch.set_num_threads(n_threads)
            with torch.inference_mode():
                out = hf.generate(
                    input_ids=xt,
                    attention_mask=mt,
                    max_new_tokens=N,
                    min_new_tokens=N,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=eos,
                )
            return out[:, width:].numpy()

        return run_jax, run_hf, lens

    variants, lens_of = {}, {}
    for B in batches:
        rj, rh, lens = make(B)
        variants[f"jax B={B}"] = rj
        for n in threads:
            variants[f"hf{n}t B={B}"] = functools.partial(rh, n)
        lens_of[B] = lens

    # Sanity check on the largest batch (<= 8 rows): greedy tokens of both.
    Bc = max(b for b in batches if b <= 8) if any(b <= 8 for b in batches) else batches[0]
    t0 = time.perf_counter()
    a, b = variants[f"jax B={Bc}"](), variants[f"hf{threads[0]}t B={Bc}"]()
    log(f"  first runs (jax compile included): {time.perf_counter() - t0:.1f}s")
    agree = common.leading_agreement(a, b, tok.stop_ids)
    first = sum(int(a[i, 0] == b[i, 0]) for i in range(Bc))
    log(
        f"greedy sanity check (B={Bc}): first token agrees on {first}/{Bc} rows; leading tokens agreeing "
        f"(of tokens before malt-jax's first EOS): " + ", ".join(f"{k}/{s}" for k, s in agree)
    )
    log(f"  row 0 malt-jax: {tok.decode(a[0][: agree[0][1]].tolist())!r}")
    log(f"  row 0 HF      : {tok.decode(b[0][: agree[0][1]].tolist())!r}")

    # warm-up: every jax shape (its compile); torch needs none beyond the sanity-check run above,
    # except a first call per thread count
    warm = {n: 1 for n in variants if n.startswith("jax") and n != f"jax B={Bc}"}
    warm.update({f"hf{n}t B={batches[0]}": 1 for n in threads})
    times = common.interleaved(variants, reps, warmup=warm, log=log)
    peak = max(peak, flops.measure_peak_jax(1024 if args.quick else 2048))  # best of before/after
    log(f"f32 matmul peak (jax), best of before/after: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for B in batches:
        tj = common.median(times[f"jax B={B}"])
        th = {n: common.median(times[f"hf{n}t B={B}"]) for n in threads}
        best = min(th, key=th.__getitem__)
        fl = flops.decode_flops(cfg, B, lens_of[B].tolist(), N)
        row = {"batch": B, "new tokens": N, "malt-jax s": tj, "malt-jax tok/s": B * N / tj}
        for n in threads:
            row[f"HF {n}t s"] = th[n]
        row.update(
            {
                "best HF tok/s": B * N / th[best],
                "speedup vs best HF": th[best] / tj,
                f"speedup vs HF {threads[0]}t": th[threads[0]] / tj,
                "malt-jax % peak": 100 * fl / tj / peak,
                "best HF % peak": 100 * fl / th[best] / peak,
            }
        )
        rows.append(row)
    log(f"\n## generate throughput, greedy, {N} new tokens per row, {reps} interleaved reps (median)")
    log(common.table(rows, list(rows[0].keys())))
    for r in rows:
        if r["batch"] >= 8:
            ok = r["speedup vs best HF"] >= 2.0
            log(
                f"RATIO batch {r['batch']}: malt-jax {r['speedup vs best HF']:.2f}x transformers (best of "
                f"{threads} torch threads; {r[f'speedup vs HF {threads[0]}t']:.2f}x vs {threads[0]} threads) "
                f"(target >= 2x at batch >= 8: {'met' if ok else 'MISSED'})"
            )
    log(f"load average at end: {os.getloadavg()}")
    common.save_json(
        args.json,
        {
            "machine": common.machine(),
            "peak_jax": peak,
            "peak_torch": peak_t,
            "rows": rows,
            "agree": agree,
            "times": times,
        },
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
