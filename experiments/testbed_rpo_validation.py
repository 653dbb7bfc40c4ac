"""The testbed's DPO recipe, chosen on validation questions: MALT with plain DPO vs DPO + the
chosen completions' NLL (``train.rpo_alpha`` 1.0, RPO), every other setting as
``experiments/testbed.yaml``, evaluated on 400 questions of the task's validation split (never
the test questions the README reports).

    python experiments/testbed_rpo_validation.py      # resumable; -> results/testbed_rpo_validation.json

Why it was run: on the study's first seed (test questions, plain DPO) MALT fell below its own
SFT stage because the refiner's DPO taught it to move right answers (docs/experiments.md,
"Testbed"); this run decides the recipe without looking at the test questions again.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "experiments/testbed.yaml"
VARIANTS = {"dpo": 0.0, "dpo+nll": 1.0}


def overrides(name: str, alpha: float) -> list[str]:
    tag = "rpo0" if alpha == 0 else "rpo1"
    return [
        f"name=testbed_val_{tag}",
        f"run_dir=runs/testbed_val_{tag}",
        "results=''",
        "task.options.eval_split=validation",
        "task.num_eval=400",
        f"train.rpo_alpha={alpha}",
    ]


def main() -> int:
    from malt_jax.config import load_run_config
    from malt_jax.runtime.machine import machine_info
    from malt_jax.workflows.pipeline import run

    os.chdir(ROOT)
    t0 = time.perf_counter()
    out: dict = {
        "experiment": "testbed_rpo_validation",
        "command": "python experiments/testbed_rpo_validation.py",
        "split": "validation",
        "variants": {},
    }
    for name, alpha in VARIANTS.items():
        over = overrides(name, alpha)
        cfg = load_run_config(CONFIG, over)
        run(cfg, progress=sys.stderr.isatty(), command=" ".join(["malt-jax run", CONFIG, *over]))
        s = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
        out["variants"][name] = {
            "rpo_alpha": alpha,
            "command": s["command"],
            "n_eval": s["n_eval"],
            "systems": s["systems"],
            "comparisons": s["comparisons"],
            "skills": s["skills"],
            "training": s["training"],
            "wall_time_s": s["wall_time_s"],
        }
    out["n_eval"] = next(iter(out["variants"].values()))["n_eval"]
    out["wall_time_s"] = round(sum(v["wall_time_s"] for v in out["variants"].values()), 1)
    out["this_call_s"] = round(time.perf_counter() - t0, 1)
    out["date"] = datetime.date.today().isoformat()
    out["machine"] = machine_info()
    (ROOT / "results" / "testbed_rpo_validation.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
