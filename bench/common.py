"""Shared helpers of the side-by-side benchmarks (bench/*.py).

The machine these run on is small and shared (2 cores, other jobs around), so absolute times
are noisy. Every benchmark therefore measures the variants it compares in ONE process,
interleaving their repetitions (A, B, A, B, ...), and reports medians and the RATIO of medians;
a slow spell then hits both variants alike. Compile / warm-up runs are always excluded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python bench/x.py`
    sys.path.insert(0, str(ROOT))

# A bench script run as a command restarts itself with glibc's malloc settings (malt_jax/runtime/allocator.py,
# as the malt-jax command does; both sides of a peer comparison run in the same process, under
# them). Not when a test imports this module.
if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:
    from malt_jax.runtime.allocator import reexec

    reexec()

# Persistent XLA compilation cache for the benchmarks (compile time is never timed, but on 2 cores
# it is most of a run's wall time; re-runs reuse it). Set before jax is imported; override with
# JAX_COMPILATION_CACHE_DIR, or set it to "" to disable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "runs" / "bench" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# Fixed chat prompts (different lengths, so batches are ragged like real ones).
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "What is 17 + 25? Think step by step.",
    "Give me three tips for learning a new language.",
    "Who wrote Pride and Prejudice, and when was it published?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
]


def leading_agreement(ours: Any, theirs: Any, stop_ids: Any) -> list[tuple[int, int]]:
    """Per row of two greedy token arrays [B, N]: (leading tokens that agree, tokens before our
    first stop id) -- the peer benchmarks' sanity check that both sides decode the same model."""
    out = []
    for a, b in zip(ours, theirs):
        stop = next((k for k, t in enumerate(a) if t in stop_ids), len(a))
        k = 0
        while k < stop and a[k] == b[k]:
            k += 1
        out.append((k, stop))
    return out


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def in_dtype(cfg: Any, params: Any, dtype: str) -> tuple[Any, Any]:
    """``cfg`` and ``params`` with weights and compute in ``dtype`` (``ModelConfig`` ``dtype`` and
    ``param_dtype``; float32 leaves cast); float32: unchanged."""
    if dtype == "float32":
        return cfg, params
    import jax
    import numpy as np

    cast = jax.tree.map(lambda w: w.astype(dtype) if w.dtype == np.float32 else w, params)
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), cast


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (``fn`` must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int | dict[str, int] = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Times every variant ``reps`` times, round-robin, after ``warmup`` untimed calls each
    (an int, or ``{name: count}`` with 0 for names left out).

    Returns ``{name: [seconds, ...]}``.
    """
    for name, fn in variants.items():
        for _ in range(warmup if isinstance(warmup, int) else warmup.get(name, 0)):
            t = timed(fn)
            if log:
                log(f"  warm-up {name}: {t:.2f}s")
    out: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(reps):
        for name, fn in variants.items():
            out[name].append(timed(fn))
        if log:
            log(f"  rep {r + 1}/{reps}: " + ", ".join(f"{n}={v[-1]:.2f}s" for n, v in out.items()))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """'median (min-max)' of a list of seconds."""
    return f"{median(xs):.3f}s ({min(xs):.3f}-{max(xs):.3f})"


def machine() -> str:
    """One line naming the machine (CPU model and vector ISA: ``malt_jax.runtime.machine``)."""
    from malt_jax.runtime.machine import machine_info

    m = machine_info()
    return (
        f"{m['cores']} cores, {m['cpu']} ({m['isa']}), {platform.system()} {platform.machine()}, "
        f"python {platform.python_version()}"
    )


def table(rows: list[dict], cols: list[str]) -> str:
    """A small markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def save_json(path: str | None, payload: dict) -> None:
    """Writes a benchmark's results with the date and the machine that measured them (CPU model,
    vector ISA, cores: the same script runs several times slower on an AVX2-only CPU)."""
    if path:
        from malt_jax.runtime.machine import machine_info

        payload = {**payload, "date": time.strftime("%Y-%m-%d"), "machine": machine_info()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float))


def log(s: str) -> None:
    print(s, flush=True)


def peer_start(title: str, threads: list[int], versions: dict[str, str]) -> Any:
    """Common start of the peer benchmarks (malt-jax vs a PyTorch library, peers env only):
    sets torch's thread count to the first of ``threads``, prints the header (machine, jax /
    torch versions, ``versions`` of the peer libraries, load average) and loads the embedded
    SmolLM2 model, which it returns."""
    import jax
    import torch

    from malt_jax.workflows.pipeline import load_model

    torch.set_num_threads(threads[0])
    peers = ", ".join(f"{k} {v}" for k, v in versions.items())
    log(
        f"# {title}\nmachine: {machine()}\njax {jax.__version__} (backend {jax.default_backend()}), "
        f"torch {torch.__version__} (threads {threads}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), {peers}\nload average at start: {os.getloadavg()}"
    )
    return load_model("smollm2")
