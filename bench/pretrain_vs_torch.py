"""The testbed's pretraining step, malt-jax against the same model in plain PyTorch, side by side.

    .venv/bin/python bench/pretrain_vs_torch.py [--quick] [--reps N] [--json PATH]

needs the peers env for the PyTorch side (``python3 -m venv .venv-peers &&
.venv-peers/bin/pip install torch==2.13.0 numpy`` is enough; ``make peers`` installs more).

* **malt-jax**: the pretraining step itself, ``training.pretrain._compiled(...).step`` for the
  testbed's config (``experiments/pretrain/testbed.yaml``: a 4-layer, 128-wide Llama, vocab 320,
  tied embeddings, batch 16 x 256 tokens, f32): forward, backward, global-norm clipping and AdamW
  (``make_pretrain_optimizer``), one jitted program with its parameters and optimizer state donated.
* **PyTorch**: a hand-written module of the same architecture and parameter count
  (``bench/torch_llama.py``: RMSNorm, rotate-half RoPE, ``scaled_dot_product_attention``, SwiGLU,
  tied LM head), ``torch.optim.AdamW`` with the same hyper-parameters and decay mask, eager
  mode, timed at each of ``--threads`` (default 2 and 1 torch threads: on a 2-core machine
  shared with other jobs, torch's OpenMP threads lose more to the load than one thread gains;
  the faster is compared, as ``vs_transformers.py`` does), with ``OMP_WAIT_POLICY=PASSIVE``
  (``--omp-wait-policy``: OpenMP threads spinning while they wait, the default, made its
  2-thread step many times slower on the loaded machine). It runs in a worker process of the
  peers env (no jax there), driven over a pipe; the worker waits on the pipe, idle, while
  malt-jax runs.

Both start from the same weights (the JAX initialisation copied into torch) on the same batch
(random token ids). Checked first: the loss and gradients at those weights, and the loss after one
optimizer step (constant learning rate), agree between the two (loss to rtol 1e-4). Then a warm-up
of each, and ``--reps`` repetitions alternating malt-jax, PyTorch (each thread count), malt-jax,
... (each repetition ``--steps-per-rep`` steps, timed per step, the median taken), and the forward
pass alone (the loss, no gradient) and the loss + gradients (no optimizer) of each after every
repetition: forward / backward / optimizer shares of the step as differences of medians.
The model FLOPs of a step are ``pretrain_step.py``'s (3 x the forward's matmul and causal
attention FLOPs); the peak is the f32 matmul peak measured in the same run (best of before and
after, ``flops.measure_peak_jax``; torch's own 2048^3 matmul is printed beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import flops
from common import log, machine, median, save_json, table

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.planning.flops import attention_flops, matmul_params

PRETRAIN_CONFIG = common.ROOT / "experiments" / "pretrain" / "testbed.yaml"
PEERS_PYTHON = common.ROOT / ".venv-peers" / "bin" / "python"


def peers_python() -> str | None:
    """The peers env's python if it can import torch (``MALT_JAX_PEERS_PYTHON`` overrides), else None."""
    exe = os.environ.get("MALT_JAX_PEERS_PYTHON") or str(PEERS_PYTHON)
    if not Path(exe).exists():
        return None
    ok = subprocess.run([exe, "-c", "import torch, numpy"], capture_output=True).returncode == 0
    return exe if ok else None


def flat_params(params) -> dict[str, np.ndarray]:
    """``{"embed": ..., "layers/wq": ...}``: the parameter pytree as host arrays, by name."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f"{k}/{n}": np.asarray(w) for n, w in v.items()})
        else:
            out[k] = np.asarray(v)
    return out


class TorchWorker:
    """``bench/torch_llama.py`` in the peers env, one JSON line per command each way."""

    def __init__(self, python: str, work: Path, threads: int, omp_wait_policy: str) -> None:
        script = Path(__file__).resolve().parent / "torch_llama.py"
        env = dict(os.environ)
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen(
            [python, str(script), str(work), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.info = self._read()

    def _read(self) -> dict:
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def __call__(self, cmd: str, **kw) -> dict:
        self.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self("quit")
            self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 2 x 32 tokens, 2 reps (smoke test)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions per side")
    ap.add_argument("--steps-per-rep", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: the config's (16)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's (256)")
    ap.add_argument(
        "--threads",
        default="2,1",
        help="torch thread counts, each timed, the faster compared (XLA:CPU uses every core)",
    )
    ap.add_argument(
        "--omp-wait-policy",
        default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        help="the torch worker's OMP_WAIT_POLICY (default PASSIVE: with other jobs on the cores, "
        "OpenMP threads that spin while waiting made a 2-thread step many times slower; '' = unset)",
    )
    ap.add_argument("--no-torch", action="store_true", help="the malt-jax side alone")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from malt_jax.training.pretrain import _compiled, lm_loss, make_pretrain_optimizer
    from malt_jax.training.pretrain_config import load_pretrain_config

    pcfg = load_pretrain_config(PRETRAIN_CONFIG)
    cfg = pcfg.model
    B = args.batch or (2 if args.quick else pcfg.train.batch_size)
    T = args.seq_len or (32 if args.quick else pcfg.train.seq_len)
    reps = 2 if args.quick else args.reps
    k = 1 if args.quick else args.steps_per_rep
    t = dataclasses.replace(pcfg.train, batch_size=B, seq_len=T)
    threads = [int(x) for x in args.threads.split(",")]
    python = None if args.no_torch else peers_python()
    if python is None and not args.no_torch:
        sys.exit(f"no PyTorch: {PEERS_PYTHON} cannot import torch (create the peers env, or pass --no-torch)")

    log("# the testbed's pretraining step: malt-jax vs PyTorch (CPU, f32)")
    log(f"machine: {machine()}; load average at start {os.getloadavg()}")
    log(f"jax {jax.__version__} (backend {jax.default_backend()})")
    log(
        f"model: {PRETRAIN_CONFIG.relative_to(common.ROOT)}: {cfg.n_layers} layers, dim {cfg.dim}, "
        f"vocab {cfg.vocab_size}, tied embeddings {cfg.tie_embeddings}, {cfg.n_params:,} parameters; "
        f"batch {B} x {T} tokens; AdamW lr {t.learning_rate} wd {t.weight_decay} clip {t.grad_clip}"
    )

    fns = _compiled(cfg, t, None)  # the pretraining command's own jitted step
    params, opt_state = fns.init(t.seed)
    rows = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size, jnp.int32)
    host = flat_params(params)
    result: dict = {
        "benchmark": "pretrain_vs_torch",
        "config": str(PRETRAIN_CONFIG.relative_to(common.ROOT)),
        "batch": B,
        "seq_len": T,
        "n_params": cfg.n_params,
        "reps": reps,
        "steps_per_rep": k,
        "load_average_start": os.getloadavg(),
        "note": "2-core machine shared with other jobs: read the ratios, not the absolute figures",
    }

    # -- the malt-jax side: the step, a constant-lr copy of its optimizer for the parity check, forward
    step = fns.step
    const_tx, _ = make_pretrain_optimizer(dataclasses.replace(t, warmup_steps=0, min_lr_ratio=1.0))
    loss_grad = jax.jit(jax.value_and_grad(lambda p, r: lm_loss(p, r, cfg)))
    forward = jax.jit(lambda p, r: lm_loss(p, r, cfg))

    worker = None
    tmp = tempfile.TemporaryDirectory(prefix="pretrain_vs_torch_")
    try:
        if python:
            work = Path(tmp.name)
            c = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            opt = {"lr": t.learning_rate, "weight_decay": t.weight_decay, "clip": t.grad_clip}
            init: dict[str, Any] = {"cfg": json.dumps(c), "opt": json.dumps(opt), "rows": np.asarray(rows)}
            init.update({f"p/{n}": v for n, v in host.items()})
            np.savez(work / "init.npz", **init)
            worker = TorchWorker(python, work, threads[0], args.omp_wait_policy)
            log(
                f"torch {worker.info['torch']} (eager; threads {threads}, OMP_WAIT_POLICY "
                f"{args.omp_wait_policy or 'unset'}), {worker.info['n_params']:,} parameters"
            )
            result["torch"] = {
                "version": worker.info["torch"],
                "threads": threads,
                "omp_wait_policy": args.omp_wait_policy,
            }
            if worker.info["n_params"] != cfg.n_params:
                raise SystemExit(f"parameter counts differ: torch {worker.info['n_params']} != {cfg.n_params}")

            # -- parity: loss, gradients, and one optimizer step from the same weights and batch
            loss_j, g_j = loss_grad(params, rows)
            upd, _ = const_tx.update(g_j, const_tx.init(params), params)
            p1 = jax.tree.map(lambda p, u: p + u, params, upd)
            after_j = float(forward(p1, rows))
            tp = worker("parity", lr=t.learning_rate)
            z = np.load(work / "torch_parity.npz")

            def rel(a: dict, prefix: str) -> float:  # largest |jax - torch| / max |jax| over the leaves
                return max(
                    float(np.abs(v - z[f"{prefix}/{n}"]).max() / (np.abs(v).max() + 1e-30)) for n, v in a.items()
                )

            parity = {
                "loss_jax": float(loss_j),
                "loss_torch": tp["loss"],
                "loss_rel_diff": abs(float(loss_j) - tp["loss"]) / abs(float(loss_j)),
                "grad_max_rel_diff": rel(flat_params(g_j), "g"),
                "loss_after_step_jax": after_j,
                "loss_after_step_torch": tp["loss_after_step"],
                "loss_after_step_rel_diff": abs(after_j - tp["loss_after_step"]) / abs(after_j),
                "params_after_step_max_abs_diff": max(
                    float(np.abs(v - z[f"p/{n}"]).max()) for n, v in flat_params(p1).items()
                ),
            }
            parity["ok"] = parity["loss_rel_diff"] < 1e-4 and parity["loss_after_step_rel_diff"] < 1e-4
            log(
                "parity (same weights and batch): loss jax {loss_jax:.6f} torch {loss_torch:.6f} (rel diff "
                "{loss_rel_diff:.2e}); gradients: largest difference {grad_max_rel_diff:.2e} of the leaf's "
                "largest; after one AdamW step (lr constant): loss jax {loss_after_step_jax:.6f} torch "
                "{loss_after_step_torch:.6f} (rel diff {loss_after_step_rel_diff:.2e}), parameters within "
                "{params_after_step_max_abs_diff:.2e}".format(**parity)
            )
            result["parity"] = parity
            if not parity["ok"]:
                raise SystemExit("the two models do not compute the same loss: not the same computation")

        state = {"params": params, "opt": opt_state}

        def jax_steps(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                p, o, m = step(state["params"], state["opt"], rows)
                jax.block_until_ready((p, o, m))
                out.append(time.perf_counter() - t0)
                state["params"], state["opt"] = p, o
            return out

        def jax_timed(fn) -> Callable[[int], list[float]]:
            return lambda n: [common.timed(lambda: jax.block_until_ready(fn(state["params"], rows))) for _ in range(n)]

        # per side: the step, and for the breakdown the loss + gradients (no optimizer) and the loss alone
        jax_kinds = {"step": jax_steps, "grad": jax_timed(loss_grad), "forward": jax_timed(forward)}
        sides: dict[str, Callable[[str, int], list[float]]] = {"malt-jax": lambda kind, n: jax_kinds[kind](n)}

        def torch_side(w: TorchWorker, th: int) -> Callable[[str, int], list[float]]:
            def run(kind: str, n: int) -> list[float]:
                w("threads", n=th)
                return w("steps" if kind == "step" else kind, n=n)["times"]

            return run

        if worker is not None:
            for th in threads:
                sides[f"PyTorch {th}t"] = torch_side(worker, th)
        kinds = ("step", "grad", "forward")

        log("warm-up (compiles; not timed)")
        t0 = time.perf_counter()
        for kind in kinds:
            sides["malt-jax"](kind, 2 if kind == "step" else 1)
        log(f"  malt-jax compile + warm-up: {time.perf_counter() - t0:.1f}s")
        for run in list(sides.values())[1:]:
            for kind in kinds:
                run(kind, 2 if kind == "step" else 1)
        n_peak = 1024 if args.quick else 2048
        peak = flops.measure_peak_jax(n_peak)
        torch_peak = worker("peak", n=n_peak)["peak"] if worker else None  # at the last of `threads`

        # one repetition: every side's k steps in turn (malt-jax, PyTorch 2t, PyTorch 1t), then each
        # side's loss + gradients, then each side's forward
        key = lambda name, kind: name if kind == "step" else f"{name} {kind}"  # noqa: E731
        times: dict[str, list[float]] = {key(name, kind): [] for kind in kinds for name in sides}
        for r in range(reps):
            for kind in kinds:
                for name, run in sides.items():
                    times[key(name, kind)] += run(kind, k if kind == "step" else 1)
            log(f"  rep {r + 1}/{reps}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()))
        peak = max(peak, flops.measure_peak_jax(n_peak))
        if worker:
            torch_peak = max(torch_peak, worker("peak", n=n_peak)["peak"])
    finally:
        if worker:
            worker.close()
        tmp.cleanup()

    tokens = B * T
    fwd_flops = tokens * 2 * matmul_params(cfg) + B * attention_flops(cfg, T * (T + 1) / 2)
    out = []
    for name, ts in times.items():
        if not ts:
            continue
        med = median(ts)
        fl = fwd_flops if name.endswith("forward") else 3 * fwd_flops  # loss + gradients: as a step
        out.append(
            {
                "variant": name,
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "tokens_per_s": tokens / med,
                "GFLOP_per_s": fl / med / 1e9,
                "pct_of_peak": 100 * fl / med / peak,
            }
        )
    log(
        f"f32 matmul peak ({n_peak}^3, best of before / after): jax {peak / 1e9:.1f} GFLOP/s"
        + (f", torch {torch_peak / 1e9:.1f} GFLOP/s" if torch_peak else "")
    )
    log(f"model FLOPs per step: {3 * fwd_flops / 1e9:.2f} GFLOP (3 x forward)")
    log(table(out, ["variant", "median_s", "min_s", "max_s", "tokens_per_s", "GFLOP_per_s", "pct_of_peak"]))
    result.update(rows=out, peak_flops=peak, torch_peak_flops=torch_peak, step_flops=3 * fwd_flops)
    if worker is not None:
        best = min((f"PyTorch {th}t" for th in threads), key=lambda n: median(times[n]))
        ratio = median(times[best]) / median(times["malt-jax"])
        fratio = median(times[f"{best} forward"]) / median(times["malt-jax forward"])
        log(
            f"RATIO tokens/s malt-jax / PyTorch (its faster thread count, {best}): step {ratio:.2f}x, "
            f"forward alone {fratio:.2f}x"
        )
        result.update(torch_best=best, ratio_jax_over_torch=ratio, ratio_forward_jax_over_torch=fratio)
        breakdown = {}
        for name in ("malt-jax", best):
            step_s, grad_s, fwd_s = (median(times[n]) for n in (name, f"{name} grad", f"{name} forward"))
            breakdown[name] = {"forward": fwd_s, "backward": grad_s - fwd_s, "optimizer": step_s - grad_s}
            log(
                f"  {name} step {step_s:.3f}s: forward {fwd_s:.3f}s ({100 * fwd_s / step_s:.0f}%), backward "
                f"{grad_s - fwd_s:.3f}s ({100 * (grad_s - fwd_s) / step_s:.0f}%), clipping + AdamW "
                f"{step_s - grad_s:.3f}s ({100 * (step_s - grad_s) / step_s:.0f}%) (differences of medians)"
            )
        result["breakdown_s"] = breakdown
    log(f"load average at end {os.getloadavg()} (a machine shared with other jobs)")
    result["load_average_end"] = os.getloadavg()
    save_json(args.json, result)


if __name__ == "__main__":
    main()
