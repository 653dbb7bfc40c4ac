"""malt-jax sampler throughput on SmolLM2-135M-Instruct (the embedded model), one process.

1. ``generate`` at batch 1, 8, 27, 64: fixed chat prompts, fixed seed, a fixed number of new
   tokens with NO stop ids (every row generates the full count, so every run does the same
   work). Compile time is excluded (one warm-up per shape); the batch sizes are timed
   round-robin. Reported: generated tokens/s (prefill included, as a user sees it), model
   FLOP/s as a fraction of the measured f32 matmul peak, and the weight-read rate (a decode
   step reads all ~540 MB of f32 weights) as a fraction of the measured memory bandwidth.
2. Tree expansion 3x3x3 (G -> V -> R, 39 rows per question) with prefix sharing
   (``mode="extend"``: prompts and turns are encoded once and KV caches are forked) vs naive
   re-prefill (``mode="naive"``: every row re-encodes its whole context at every level),
   interleaved, same keys; the two must sample identical tokens (checked). Also printed: the
   prompt tokens each mode encodes and the measured time of naive's re-prefills alone.

    python bench/sampler.py            # default sizes (wall times: bench/README.md)
    python bench/sampler.py --quick    # smoke run
    python bench/sampler.py --testbed  # preset: the testbed run's expansion (3x3x3, 32 questions,
                                       # budgets 10/32/24, T 1.0) with its model config, vs the peak
"""

from __future__ import annotations

import argparse
import time

import common
import flops

import jax
import jax.numpy as jnp
import numpy as np


def chat_ids(tokenizer, texts):
    return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


def bench_generate(model, batches, new_tokens, reps, sampling, peak, bw, log, peak_n=None):
    from malt_jax.sampling.decode import StopCriteria, generate, pad_batch, row_keys

    cfg, params = model.cfg, model.params
    variants, meta = {}, {}
    for B in batches:
        ids = chat_ids(model.tokenizer, common.prompts(B))
        x_host, lens = pad_batch(ids, bucket=16)
        x, lens_j, keys = jnp.asarray(x_host), jnp.asarray(lens), row_keys(0, B)

        # compiled ahead of time (no untimed first run: on 2 cores a warm-up run of the big
        # shapes costs as much as a timed one; the median of the reps absorbs a cold first rep)
        t0 = time.perf_counter()
        fn = generate.lower(
            params, x, lens_j, keys, cfg=cfg, sampling=sampling, stop=StopCriteria(), max_new_tokens=new_tokens
        ).compile()
        log(f"  compile B={B}: {time.perf_counter() - t0:.1f}s")

        def run(fn=fn, x=x, lens_j=lens_j, keys=keys):
            g = jax.block_until_ready(fn(params, x, lens_j, keys))
            assert int(np.min(np.asarray(g.lengths))) == new_tokens, "a row stopped early"
            return g

        variants[f"B={B}"] = run
        meta[f"B={B}"] = (B, lens.tolist(), x.shape[1])
    times = common.interleaved(variants, reps, warmup=0, log=log)
    # the machine's peak is the best of the measurements before and after (load varies)
    peak = max(peak, flops.measure_peak_jax(2048 if peak_n is None else peak_n))
    bw = max(bw, flops.measure_bandwidth_jax(128 if peak_n == 1024 else 512))
    log(f"  peak after: f32 matmul {peak / 1e9:.1f} GFLOP/s, memory read {bw / 1e9:.1f} GB/s (best of before/after)")
    rows = []
    wbytes = flops.matmul_params(cfg) * 4
    for name, ts in times.items():
        B, lens, width = meta[name]
        t = common.median(ts)
        fl = flops.decode_flops(cfg, B, lens, new_tokens)
        rows.append(
            {
                "batch": B,
                "prompt width": width,
                "new tokens": new_tokens,
                "median s": t,
                "tokens/s": B * new_tokens / t,
                "ms/step": 1e3 * t / new_tokens,
                "GFLOP/s": fl / t / 1e9,
                "% peak FLOP/s": 100 * fl / t / peak,
                "% mem BW (weights/step)": 100 * wbytes * new_tokens / t / bw,
            }
        )
    return rows, times


def bench_expansion(model, n_questions, max_new, reps, log):
    from malt_jax.config import SamplingConfig
    from malt_jax.model.llama import KVCache
    from malt_jax.sampling.decode import StopCriteria, pad_batch, prefill
    from malt_jax.sampling.expansion import ExpansionSpec, expand
    from malt_jax.tasks import get_task
    from malt_jax.workflows.pipeline import PromptCodec, question_keys

    cfg, params = model.cfg, model.params
    task = get_task("synthetic", max_value=9, steps=1, ops="+-")
    codec = PromptCodec(model.tokenizer, task)
    examples = task.load("train")[:n_questions]
    q_ids = [codec.question(e.question) for e in examples]
    width = -(-max(len(q) for q in q_ids) // 32) * 32
    x, lens = pad_batch(q_ids, bucket=width)
    turns = tuple(jnp.asarray(t, jnp.int32) for t in codec.turns)
    keys = question_keys(0, list(range(n_questions)))
    sampling = SamplingConfig(temperature=0.7)
    specs = {
        m: ExpansionSpec(n=3, m=3, l=3, max_new=(max_new,) * 3, sampling=sampling, stop=StopCriteria(), depth=3, mode=m)
        for m in ("extend", "naive")
    }

    args = (params, (None, None, None), jnp.asarray(x), jnp.asarray(lens), turns, keys)
    trees = {}

    def runner(mode, spec):
        fn = expand.lower(*args, cfg=cfg, spec=spec).compile()  # ahead of time, see bench_generate

        def run():
            trees[mode] = jax.block_until_ready(fn(*args))

        return run

    t0 = time.perf_counter()
    variants = {m: runner(m, s) for m, s in specs.items()}
    log(f"  compile: {time.perf_counter() - t0:.1f}s")
    times = common.interleaved(variants, reps, warmup=0, log=log)
    same = all(
        np.array_equal(np.asarray(trees["extend"].tokens[i]), np.asarray(trees["naive"].tokens[i])) for i in range(3)
    )

    # Breakdown: the prompt tokens each mode encodes, and naive's re-prefills timed alone.
    Q, Tq = x.shape
    tv, tr = (int(t.shape[0]) for t in turns)
    size = Tq + 3 * max_new + tv + tr
    rows_per_level = [Q * 3, Q * 9, Q * 27]
    extend_tokens = int(lens.sum()) + Q * 3 * tv + Q * 9 * tr  # question once, each turn once per parent
    naive_padded = sum(r * size for r in rows_per_level)  # every row re-encodes a full-width context

    pre = jax.jit(prefill, static_argnames=("cfg",))
    calls = []
    for r in rows_per_level:  # compile each level's shape without running it
        a = (
            params,
            KVCache.zeros(cfg, r, size),
            jnp.ones((r, size), jnp.int32),
            jnp.full((r,), size // 2, jnp.int32),
            jnp.zeros((r,), jnp.int32),
        )  # the mask, not the length, sets the work
        f = pre.lower(a[0], cfg, *a[1:]).compile()
        calls.append(lambda f=f, a=a: f(a[0], *a[1:]))

    def naive_prefills():
        return jax.block_until_ready([c() for c in calls])

    pre_t = common.timed(naive_prefills)
    gen_tokens = Q * (3 + 9 + 27) * max_new
    te, tn = common.median(times["extend"]), common.median(times["naive"])
    return {
        "questions": Q,
        "max_new per role": max_new,
        "rows (G,V,R)": rows_per_level,
        "context width": size,
        "identical samples": same,
        "generated tokens": gen_tokens,
        "extend s": te,
        "naive s": tn,
        "extend tok/s": gen_tokens / te,
        "naive tok/s": gen_tokens / tn,
        "speedup (naive/extend)": tn / te,
        "prompt tokens encoded: extend": extend_tokens,
        "prompt tokens encoded: naive (padded)": naive_padded,
        "naive re-prefills alone s": pre_t,
    }, times


def tree_flops(cfg, a: dict, seps: tuple) -> tuple[float, int]:
    """Model FLOPs and sampled tokens of one separate-framing G -> V -> R batch (``a``: the host
    arrays ``stages.expand.sample_trees`` hands ``on_batch``; ``seps``: ``PromptCodec.seps``).

    The work a level does with prefix sharing: its question prefix once per question, each earlier
    output (with its separator) once per tree node, then the sampled tokens of every row; each
    token attends its real context (padding and the steps a row idles after its stop excluded)."""
    tokens = pairs = 0.0

    def add(n, ctx):  # n tokens after ctx context tokens, elementwise over arrays
        nonlocal tokens, pairs
        n, ctx = np.asarray(n, np.float64), np.asarray(ctx, np.float64)
        tokens += float(n.sum())
        pairs += float((n * ctx + n * (n + 1) / 2).sum())

    q = a["q_lens"]
    g, v, r = a["G_lengths"], a["V_lengths"], a["R_lengths"]  # [Q, n], [Q, n, m], [Q, n, m, l]
    (s_vg,), (s_rg, s_rv) = (tuple(len(x) for x in level) for level in seps)
    add(q, 0)  # G: the question prompt, then the answers
    add(g, q[:, None])
    pv = a["V_prefix_lens"]  # V: its prefix, each answer + separator once, then the critiques
    add(pv, 0)
    add(g + s_vg, pv[:, None])
    add(v, (pv[:, None] + g + s_vg)[..., None])
    pr = a["R_prefix_lens"]  # R: its prefix, each answer and each critique once, then the refinements
    add(pr, 0)
    add(g + s_rg, pr[:, None])
    ctx = (pr[:, None] + g + s_rg)[..., None]
    add(v + s_rv, ctx)
    add(r, (ctx + v + s_rv)[..., None])
    sampled = int(g.sum() + v.sum() + r.sum())
    return flops.model_flops.forward_flops(cfg, tokens, pairs), sampled


def bench_testbed_expansion(n_questions, reps, log, peak_n=2048):
    """The testbed's training-tree expansion as ``malt-jax run experiments/testbed.yaml`` samples it
    (``stages.expand.sample_trees``, the run's ``ExpansionSpec.from_tree``: 3x3x3, separate framing,
    budgets G/V/R from ``sampling.role_max_new_tokens``, temperature 1.0, the codec's stop ids,
    prefix sharing) on one batch of ``n_questions`` training questions, with random weights of the
    testbed config and, when ``models/testbed`` holds the pretrained model, with those weights too
    (interleaved): random weights rarely sample a stop token, so their rows run to the budget."""
    import dataclasses

    from malt_jax.config import load_run_config
    from malt_jax.model.base_model import Model, load_model
    from malt_jax.model.llama import init_params
    from malt_jax.sampling.codec import PromptCodec
    from malt_jax.sampling.expansion import ExpansionSpec
    from malt_jax.stages.expand import sample_trees
    from malt_jax.stages.rundir import split_questions
    from malt_jax.training.corpus import get_corpus
    from malt_jax.training.pretrain import prepare_tokenizer
    from malt_jax.training.pretrain_config import load_pretrain_config
    from malt_jax.workflows.pipeline import make_task

    rc = load_run_config(common.ROOT / "experiments" / "testbed.yaml")
    pc = load_pretrain_config(common.ROOT / "experiments" / "pretrain" / "testbed.yaml")
    trained_dir = common.ROOT / rc.weights
    # the testbed's tokenizer: the pretrained model's, else trained on the corpus as pretraining does
    tok = prepare_tokenizer(pc, get_corpus(pc.corpus.name, **dict(pc.corpus.options)), trained_dir, write=False)
    models = {"random weights": Model(init_params(rc.model, jax.random.key(0)), rc.model, tok)}
    if (trained_dir / "model.safetensors").is_file():
        trained = load_model(str(trained_dir), rc.model)
        if trained.cfg != rc.model:
            raise ValueError(f"{trained_dir}: config {trained.cfg} differs from the run's {rc.model}")
        models["pretrained (models/testbed)"] = dataclasses.replace(trained, tokenizer=tok)
    task = make_task(rc)
    examples = split_questions(rc, task)[0][:n_questions]
    codec = PromptCodec(tok, task, rc.task.framing)
    spec = ExpansionSpec.from_tree(rc.tree, rc.sampling, stop=codec.stop)
    log(
        f"  spec: tree {spec.n}x{spec.m}x{spec.l}, budgets G/V/R {spec.max_new}, temperature "
        f"{spec.sampling.temperature}, mode {spec.mode}, framing {rc.task.framing}, stop ids {spec.stop.stop_ids}; "
        f"{len(examples)} questions, {n_questions * (spec.n + spec.n * spec.m + spec.n * spec.m * spec.l)} rows"
    )
    batches: dict[str, dict] = {}

    def runner(name, model):
        def run():
            def keep(b, arrays):
                batches[name] = arrays

            sample_trees(
                model, codec, examples, spec, seed=rc.train.seed, batch_size=n_questions, on_batch=keep, progress=False
            )

        return run

    variants = {name: runner(name, m) for name, m in models.items()}
    times = common.interleaved(variants, reps, warmup=1, log=log)  # the warm-up compiles
    peak = flops.measure_peak_jax(peak_n)
    rows = []
    for name, ts in times.items():
        fl, sampled = tree_flops(rc.model, batches[name], codec.seps)
        t = common.median(ts)
        stopped = [float(np.mean(batches[name][f"{r}_stopped"])) for r in ("G", "V", "R")]
        rows.append(
            {
                "weights": name,
                "median s": t,
                "sampled tokens": sampled,
                "budget tokens": n_questions
                * sum(f * b for f, b in zip((spec.n, spec.n * spec.m, spec.n * spec.m * spec.l), spec.max_new)),
                "tokens/s": sampled / t,
                "GFLOP/s": fl / t / 1e9,
                "stopped G/V/R": "/".join(f"{x:.2f}" for x in stopped),
            }
        )
    return rows, times, peak, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes (default 1,8,27,64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 64)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 3)")
    ap.add_argument("--sample", action="store_true", help="temperature 0.7 fixed-seed sampling (default greedy)")
    ap.add_argument("--questions", type=int, default=None, help="questions in the expansion (default 1)")
    ap.add_argument("--expansion-tokens", type=int, default=None, help="new tokens per role (default 32)")
    ap.add_argument("--expansion-reps", type=int, default=None, help="timed reps per mode (default 2)")
    ap.add_argument("--skip-expansion", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument(
        "--testbed",
        action="store_true",
        help="preset: only the testbed run's tree expansion (experiments/testbed.yaml: its model config with "
        "random weights, and models/testbed's weights if present; 3x3x3, budgets 10/32/24, temperature 1.0, "
        "--questions default 32, --expansion-reps default 3) against the measured peak",
    )
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.testbed:
        return main_testbed(args)
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,27,64")).split(",")]
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    reps = args.reps or (2 if args.quick else 3)

    from malt_jax.config import SamplingConfig
    from malt_jax.workflows.pipeline import load_model

    log = lambda s: print(s, flush=True)  # noqa: E731
    log(
        f"# malt-jax sampler benchmark\nmachine: {common.machine()}\njax {jax.__version__}, "
        f"backend {jax.default_backend()}, devices {len(jax.devices())}"
    )
    model = load_model("smollm2")
    peak = flops.measure_peak_jax(1024 if args.quick else 2048)
    bw = flops.measure_bandwidth_jax(128 if args.quick else 512)
    log(f"measured peak: f32 matmul {peak / 1e9:.1f} GFLOP/s, memory read {bw / 1e9:.1f} GB/s")
    result = {"machine": common.machine(), "peak_flops": peak, "bandwidth": bw}

    if not args.skip_generate:
        sampling = SamplingConfig(temperature=0.7) if args.sample else SamplingConfig(greedy=True)
        log(
            f"\n## generate: batches {batches}, {new_tokens} new tokens, "
            f"{'temperature 0.7' if args.sample else 'greedy'}, no stop ids, {reps} reps"
        )
        rows, times = bench_generate(
            model, batches, new_tokens, reps, sampling, peak, bw, log, peak_n=1024 if args.quick else 2048
        )
        log(
            common.table(
                rows,
                [
                    "batch",
                    "prompt width",
                    "new tokens",
                    "median s",
                    "tokens/s",
                    "ms/step",
                    "GFLOP/s",
                    "% peak FLOP/s",
                    "% mem BW (weights/step)",
                ],
            )
        )
        result["generate"] = rows

    if not args.skip_expansion:
        q = args.questions or 1
        mx = args.expansion_tokens or (16 if args.quick else 32)
        ereps = args.expansion_reps or 2
        log(f"\n## tree expansion 3x3x3: {q} question(s), {mx} new tokens per role, extend vs naive, {ereps} reps")
        res, times = bench_expansion(model, q, mx, ereps, log)
        for k, v in res.items():
            log(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}")
        log(
            f"RATIO prefix sharing (extend) vs naive re-prefill: {res['speedup (naive/extend)']:.2f}x "
            f"(target >= 1.5x: {'met' if res['speedup (naive/extend)'] >= 1.5 else 'MISSED'})"
        )
        result["expansion"] = res
    common.save_json(args.json, result)


def main_testbed(args) -> None:
    log = lambda s: print(s, flush=True)  # noqa: E731
    import os

    q = args.questions or (4 if args.quick else 32)
    reps = args.expansion_reps or (1 if args.quick else 3)
    peak_n = 1024 if args.quick else 2048
    log(
        f"# the testbed's tree expansion (experiments/testbed.yaml)\nmachine: {common.machine()}; load average "
        f"{os.getloadavg()}\njax {jax.__version__}, backend {jax.default_backend()}"
    )
    peak = flops.measure_peak_jax(peak_n)
    rows, times, peak_after, spec = bench_testbed_expansion(q, reps, log, peak_n)
    peak = max(peak, peak_after)
    for row in rows:
        row["% peak"] = 100 * row["GFLOP/s"] * 1e9 / peak
    log(f"f32 matmul peak ({peak_n}^3, best of before / after): {peak / 1e9:.1f} GFLOP/s")
    log(
        common.table(
            rows,
            [
                "weights",
                "median s",
                "sampled tokens",
                "budget tokens",
                "tokens/s",
                "GFLOP/s",
                "% peak",
                "stopped G/V/R",
            ],
        )
    )
    log(f"load average at end {os.getloadavg()} (a machine shared with other jobs: absolute figures are noisy)")
    common.save_json(
        args.json,
        {
            "benchmark": "sampler --testbed",
            "questions": q,
            "tree": [spec.n, spec.m, spec.l],
            "budgets": list(spec.max_new),
            "temperature": spec.sampling.temperature,
            "reps": reps,
            "peak_flops": peak,
            "rows": rows,
            "times": times,
            "load_average_end": os.getloadavg(),
            "note": "2-core machine shared with other jobs",
        },
    )


if __name__ == "__main__":
    main()
