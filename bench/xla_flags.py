"""XLA:CPU compiler options against the testbed's pretraining step: does a flag close the gap to
PyTorch (docs/performance.md)?

    .venv/bin/python bench/xla_flags.py [--rounds 2] [--reps 5] [--json PATH]

XLA flags are read once per process, so each variant runs ``bench/pretrain_step.py`` (the jitted
full-parameter step of the testbed model, batch 16 x 256) in its own process; the variants
alternate round by round (default, A, B, ..., default, A, B, ...) so that a slow spell of the
machine hits all of them. Reported: each variant's median step time over its rounds' medians and
its ratio to the default's (below 1 = faster), and the forward pass alone beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import log, machine, median, save_json, table

VARIANTS: dict[str, str] = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn-dot": "--xla_cpu_experimental_xnn_fusion_type=+dot",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=+dot",
    "vector-512": "--xla_cpu_prefer_vector_width=512",
}


def run_variant(flags: str, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        env = {**os.environ, "XLA_FLAGS": flags}
        step = Path(__file__).with_name("pretrain_step.py")
        subprocess.run(
            [sys.executable, str(step), "--reps", str(reps), "--json", str(out)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = ["default", *(v for v in args.variants if v != "default")]
    log(f"machine: {machine()}")
    steps: dict[str, list[float]] = {n: [] for n in names}
    forwards: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            res = run_variant(VARIANTS[n], args.reps)
            rows = {row["variant"]: row for row in res["rows"]}
            steps[n].append(rows["flat"]["median_s"])
            forwards[n].append(rows["forward"]["median_s"])
            step_s, fwd_s = rows["flat"]["median_s"], rows["forward"]["median_s"]
            log(f"round {r + 1} {n}: step {step_s:.3f} s, forward {fwd_s:.3f} s")
    base = median(steps["default"])
    out = [
        {
            "variant": n,
            "XLA_FLAGS": VARIANTS[n] or "(none)",
            "step_s": median(steps[n]),
            "forward_s": median(forwards[n]),
            "step_vs_default": median(steps[n]) / base,
        }
        for n in names
    ]
    log(table(out, ["variant", "XLA_FLAGS", "step_s", "forward_s", "step_vs_default"]))
    save_json(args.json, {"benchmark": "xla_flags", "rounds": args.rounds, "reps": args.reps, "rows": out})


if __name__ == "__main__":
    main()
