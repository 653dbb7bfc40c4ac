"""Runs every available benchmark (``make bench``; ``make bench ARGS=--quick`` for a smoke run).

* always (main env): ``flops.py`` (measured peak + bandwidth), ``sampler.py``,
  ``decode_breakdown.py`` (where a decode step's time goes) and ``dpo_step_options.py`` (the
  DPO step with its speed options off one by one);
* only when the optional peers env exists and imports torch/transformers/trl/peft + malt_jax
  (``make peers`` creates ``.venv-peers``): ``vs_transformers.py`` and ``dpo_vs_trl.py``, and
  ``vs_llamacpp.py`` when that env also imports ``llama_cpp`` (built from source by ``make peers``).
  Otherwise it prints how to install them.

Each benchmark is its own process (its variants are compared side by side inside it) and
writes its results as JSON under ``--out`` (default ``runs/bench``). Exit status is non-zero
if a benchmark that was run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
PEERS_CHECK = "import torch, transformers, trl, peft, datasets, malt_jax"


def peers_python() -> tuple[Path | None, str]:
    if not PEERS_PY.exists():
        return None, f"{PEERS_PY.relative_to(ROOT)} not found"
    r = subprocess.run([str(PEERS_PY), "-c", PEERS_CHECK], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        return None, "peers env does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return PEERS_PY, ""


def py_ok(py: Path, code: str) -> bool:
    return py.exists() and subprocess.run([str(py), "-c", code], capture_output=True, cwd=ROOT).returncode == 0


def run(py: Path | str, script: str, extra: list[str], out: Path) -> tuple[int, float]:
    name = Path(script).stem
    cmd = [str(py), str(HERE / script), *extra]
    if name != "flops":
        cmd += ["--json", str(out / f"{name}.json")]
    print(f"\n{'=' * 100}\n$ {' '.join(cmd)}\n{'=' * 100}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # The Makefile exports 8 fake host devices for the sharding tests; the benchmarks are
    # single-device, so run them as a plain `python bench/x.py` would (1 CPU device).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    dt = time.perf_counter() - t0
    print(f"--- {name}: exit {rc} after {dt:.0f}s", flush=True)
    return rc, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for every benchmark")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="JSON results folder")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset: flops,sampler,decode_breakdown,dpo_step_options,vs_transformers,dpo_vs_trl,"
        "vs_llamacpp",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--quick"] if args.quick else []
    only = {s for s in args.only.split(",") if s}
    want = lambda n: not only or n in only  # noqa: E731

    results = {}
    if want("flops"):
        results["flops"] = run(sys.executable, "flops.py", extra, out)
    if want("sampler"):
        results["sampler"] = run(sys.executable, "sampler.py", extra, out)
    if want("decode_breakdown"):
        results["decode_breakdown"] = run(sys.executable, "decode_breakdown.py", extra, out)
    if want("dpo_step_options"):
        results["dpo_step_options"] = run(sys.executable, "dpo_step_options.py", extra, out)
    peer_scripts = [s for s in ("vs_transformers", "dpo_vs_trl") if want(s)]
    if peer_scripts:
        py, why = peers_python()
        if py is None:
            print(
                f"\n[skipped] {', '.join(peer_scripts)}: {why}.\n"
                "  These compare against PyTorch transformers / TRL, which live in a separate optional env.\n"
                "  Install it with:  make peers   (creates .venv-peers: torch==2.13.0 CPU, transformers, trl, "
                "peft, malt-jax)\n  then re-run:  make bench",
                flush=True,
            )
        else:
            for s in peer_scripts:
                results[s] = run(py, f"{s}.py", extra, out)
    if want("vs_llamacpp") and py_ok(PEERS_PY, "import llama_cpp, malt_jax"):
        results["vs_llamacpp"] = run(PEERS_PY, "vs_llamacpp.py", extra, out)
    elif want("vs_llamacpp"):
        print("\n[skipped] vs_llamacpp: .venv-peers does not import llama_cpp (make peers builds it).", flush=True)
    print(
        "\nsummary: "
        + ", ".join(f"{k}: {'ok' if rc == 0 else f'FAILED ({rc})'} ({dt:.0f}s)" for k, (rc, dt) in results.items())
    )
    print(f"JSON results in {out}")
    sys.exit(1 if any(rc for rc, _ in results.values()) else 0)


if __name__ == "__main__":
    main()
