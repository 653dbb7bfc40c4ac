"""malt-jax ``generate`` vs llama.cpp (through ``llama-cpp-python``) on the same weights, one process.

Same model, same weights: the SmolLM2-135M-Instruct weights malt-jax decodes (f32, dequantized
from the embedded Q4_1 GGUF) are written back to GGUF files with the ``gguf`` package, once at
**F32** (bit-identical weights) and once at **Q8_0** (llama.cpp's 8-bit format: a quarter of the
weight bytes, what a llama.cpp user would run), metadata and tokenizer copied from the embedded
file. Same token ids (the malt-jax tokenizer encodes the chat prompts), batch sizes 1, 8, 27,
greedy, the same number of new tokens per row (no stop tokens on either side).

llama.cpp decodes a batch the way its ``batched`` example does: one ``llama_decode`` of all
prompts (each row its own sequence id, logits only at each row's last token), then one
``llama_decode`` per step with one token per row; the greedy argmax over the returned logits runs
in numpy (its cost, ~0.1 ms per row, is included). Threads: llama.cpp is timed with the same 2
threads XLA uses **and** with 1 (as the transformers benchmark does for torch); the ratio is
taken against the faster. Every variant is timed interleaved after a warm-up (compile excluded).

Sanity check printed first: greedy tokens of malt-jax and llama.cpp F32 on the same prompts.

Needs ``llama-cpp-python`` in the optional peers env (``make peers-llamacpp``: a source build,
~25 min on 2 cores):

    .venv-peers/bin/python bench/vs_llamacpp.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
from pathlib import Path

import common
import flops

import numpy as np


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """Copies the GGUF file ``src`` to ``dst`` with every 2-D weight stored as ``qtype`` ("F32"
    or "Q8_0"), dequantized from ``src`` (so F32 holds exactly the weights malt-jax loads);
    1-D tensors (norms) stay F32. Metadata (shape, tokenizer, chat template) is copied."""
    import gguf
    from gguf import GGMLQuantizationType as Q, quants

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch)
    target = {"F32": Q.F32, "Q8_0": Q.Q8_0}[qtype]
    for field in reader.fields.values():  # as gguf's scripts/gguf_new_metadata.py copies them
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == "general.file_type":
            writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        if w.ndim == 2 and target != Q.F32:
            writer.add_tensor(t.name, quants.quantize(w, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


class LlamaCppBatch:
    """Greedy batched decoding with llama.cpp's C API (the ``batched`` example's loop)."""

    def __init__(self, path: Path, max_rows: int, max_ctx: int, threads: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        load = getattr(lc, "llama_model_load_from_file", None) or lc.llama_load_model_from_file
        self.model = load(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = max_rows * max_ctx
        cp.n_batch = cp.n_ubatch = max(512, max_rows * max_ctx)
        cp.n_seq_max = max_rows
        cp.n_threads = cp.n_threads_batch = threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = True
        new_ctx = getattr(lc, "llama_init_from_model", None) or lc.llama_new_context_with_model
        self.ctx = new_ctx(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = lc.llama_model_get_vocab(self.model) if hasattr(lc, "llama_model_get_vocab") else self.model
        self.n_vocab = (
            lc.llama_vocab_n_tokens(vocab) if hasattr(lc, "llama_vocab_n_tokens") else lc.llama_n_vocab(self.model)
        )
        self.batch = lc.llama_batch_init(cp.n_batch, 0, max_rows)
        self.threads = threads

    def set_threads(self, n: int) -> None:
        self.lc.llama_set_n_threads(self.ctx, n, n)
        self.threads = n

    def _clear(self) -> None:
        lc = self.lc
        if hasattr(lc, "llama_get_memory"):
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        elif hasattr(lc, "llama_kv_self_clear"):
            lc.llama_kv_self_clear(self.ctx)
        else:
            lc.llama_kv_cache_clear(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """entries: (token, pos, seq, wants_logits); returns logits [n_wanted, V]."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = [i for i, e in enumerate(entries) if e[3]]
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for j, i in enumerate(rows):
            ptr = self.lc.llama_get_logits_ith(self.ctx, i)
            out[j] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return out

    def generate(self, prompts: list[list[int]], n_new: int) -> np.ndarray:
        self._clear()
        entries = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        logits = self._decode(entries)
        pos = [len(ids) for ids in prompts]
        out = np.zeros((len(prompts), n_new), np.int64)
        for step in range(n_new):
            tok = logits.argmax(-1)
            out[:, step] = tok
            if step + 1 < n_new:
                logits = self._decode([(int(t), pos[s] + step, s, True) for s, t in enumerate(tok)])
        return out

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        free = getattr(self.lc, "llama_model_free", None) or self.lc.llama_free_model
        free(self.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes (default 1,8,27)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 3)")
    ap.add_argument("--threads", type=str, default="2,1", help="llama.cpp thread counts (default 2,1)")
    ap.add_argument("--formats", type=str, default="F32,Q8_0", help="GGUF weight formats (default F32,Q8_0)")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,27")).split(",")]
    N = args.new_tokens or (16 if args.quick else 32)
    reps = args.reps or (2 if args.quick else 3)
    threads = [int(t) for t in args.threads.split(",")]
    formats = args.formats.split(",")
    log = common.log

    import jax
    import jax.numpy as jnp
    import llama_cpp

    from malt_jax.config import SamplingConfig
    from malt_jax.model.files import smollm2_gguf_path
    from malt_jax.sampling.decode import StopCriteria, generate, pad_batch, row_keys
    from malt_jax.workflows.pipeline import load_model

    log(
        f"# malt-jax vs llama.cpp (llama-cpp-python {llama_cpp.__version__})\nmachine: {common.machine()}\n"
        f"jax {jax.__version__} (backend {jax.default_backend()}), llama.cpp threads {threads}, formats {formats}\n"
        f"load average at start: {os.getloadavg()}"
    )
    model = load_model("smollm2")
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    greedy = SamplingConfig(greedy=True)
    ids_of = {B: [tok.encode_chat([{"role": "user", "content": t}]) for t in common.prompts(B)] for B in batches}
    max_ctx = max(len(i) for ids in ids_of.values() for i in ids) + N + 8
    tmp = tempfile.TemporaryDirectory()
    engines = {}
    for fmt in formats:
        t0 = time.perf_counter()
        path = write_gguf(smollm2_gguf_path(), Path(tmp.name) / f"smollm2-{fmt}.gguf", fmt)
        engines[fmt] = LlamaCppBatch(path, max(batches), max_ctx, threads[0])
        log(f"wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) and loaded it in {time.perf_counter() - t0:.1f}s")
    peak = flops.measure_peak_jax(1024 if args.quick else 2048)

    def jax_runner(B):
        x, lens = pad_batch(ids_of[B], bucket=16)
        xj, lj, keys = jnp.asarray(x), jnp.asarray(lens), row_keys(0, B)

        def run():
            g = generate(params, xj, lj, keys, cfg=cfg, sampling=greedy, stop=StopCriteria(), max_new_tokens=N)
            return np.asarray(jax.block_until_ready(g).tokens)

        return run, lens

    def cpp_runner(fmt, B, n):
        def run():
            if engines[fmt].threads != n:
                engines[fmt].set_threads(n)
            return engines[fmt].generate(ids_of[B], N)

        return run

    variants, lens_of = {}, {}
    for B in batches:
        variants[f"jax B={B}"], lens_of[B] = jax_runner(B)
        for fmt in formats:
            for n in threads:
                variants[f"{fmt} {n}t B={B}"] = cpp_runner(fmt, B, n)

    Bc = max(b for b in batches if b <= 8) if any(b <= 8 for b in batches) else batches[0]
    a = variants[f"jax B={Bc}"]()
    agreement = {}
    for fmt in formats:
        b = variants[f"{fmt} {threads[0]}t B={Bc}"]()
        agreement[fmt] = common.leading_agreement(a, b, tok.stop_ids)
        agree = [f"{k}/{stop}" for k, stop in agreement[fmt]]
        log(
            f"greedy sanity check (B={Bc}) vs llama.cpp {fmt}: leading tokens agreeing (of tokens before "
            f"malt-jax's first EOS): {', '.join(agree)}"
        )
        log(f"  row 0 llama.cpp {fmt}: {tok.decode(b[0][:N].tolist())!r}")
    log(f"  row 0 malt-jax      : {tok.decode(a[0][:N].tolist())!r}")

    warm = {k: 1 for k in variants}
    times = common.interleaved(variants, reps, warmup=warm, log=log)
    peak = max(peak, flops.measure_peak_jax(1024 if args.quick else 2048))
    log(f"f32 matmul peak (jax), best of before/after: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for B in batches:
        tj = common.median(times[f"jax B={B}"])
        fl = flops.decode_flops(cfg, B, lens_of[B].tolist(), N)
        row = {"batch": B, "new tokens": N, "malt-jax tok/s": B * N / tj, "malt-jax % peak": 100 * fl / tj / peak}
        for fmt in formats:
            tc = {n: common.median(times[f"{fmt} {n}t B={B}"]) for n in threads}
            best = min(tc, key=tc.__getitem__)
            row[f"llama.cpp {fmt} tok/s (best: {best}t)"] = B * N / tc[best]
            row[f"malt-jax / llama.cpp {fmt}"] = tc[best] / tj
        rows.append(row)
    log(f"\n## generate throughput, greedy, {N} new tokens per row, {reps} interleaved reps (median)")
    log(common.table(rows, list(rows[0].keys())))
    for r in rows:
        log(
            "RATIO batch {}: ".format(r["batch"])
            + ", ".join(f"malt-jax {r[f'malt-jax / llama.cpp {fmt}']:.2f}x llama.cpp {fmt}" for fmt in formats)
        )
    log(f"load average at end: {os.getloadavg()}")
    for e in engines.values():
        e.close()
    common.save_json(
        args.json,
        {
            "machine": common.machine(),
            "peak_jax": peak,
            "rows": rows,
            "agree": agreement,  # per format: (leading tokens agreeing, tokens before malt-jax's first EOS) per row
            "times": times,
            "llama_cpp_python": llama_cpp.__version__,
        },
    )


if __name__ == "__main__":
    main()
