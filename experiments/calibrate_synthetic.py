"""Sampling temperature and per-role token budgets of the embedded task, measured on validation.

    python experiments/calibrate_synthetic.py experiments/smollm2_synthetic.yaml --questions 200 \
        --temperatures 0,0.3,0.7 --out results/calibration_synthetic.json

For each temperature, the untrained G -> V -> R chain (the config's framing and prompts, 3
passes) runs on the first ``--questions`` questions of the *validation* split with generous
budgets (``--budget`` new tokens for every role), and the script reports the generator's
accuracy (one sample and the vote), the share of answers stating an explicit final answer, the
refiner's accuracy, and the token lengths of every role (mean, p90, p99, share cut off at the
budget). The config's temperature and ``sampling.role_max_new_tokens`` are chosen from these
numbers (budgets at about the p99 of the lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from malt_jax.config import load_run_config
from malt_jax.workflows import pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--temperatures", default="0.3,0.7")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--run-dir", default="runs/calibration")
    ap.add_argument("--out", default="results/calibration_synthetic.json")
    args = ap.parse_args()
    t0 = time.time()
    base = load_run_config(args.config, args.overrides)
    task = pipeline.make_task(base)
    examples = task.load("validation")[: args.questions]
    model = pipeline.load_model(base.weights, base.model)
    tok = model.tokenizer
    out = {
        "experiment": "calibration",
        "command": "python experiments/calibrate_synthetic.py "
        + " ".join(
            [
                args.config,
                *args.overrides,
                f"--questions {args.questions}",
                f"--temperatures {args.temperatures}",
                f"--budget {args.budget}",
                f"--out {args.out}",
            ]
        ),
        "split": "validation",
        "n": len(examples),
        "framing": base.task.framing,
        "budget": args.budget,
        "temperatures": {},
    }
    for temp in [float(t) for t in args.temperatures.split(",")]:
        sampling = dataclasses.replace(base.sampling, role_max_new_tokens=(args.budget,) * 3)
        cfg = dataclasses.replace(
            base, sampling=sampling, eval=dataclasses.replace(base.eval, temperature=temp, max_new_tokens=args.budget)
        )
        system = pipeline.System("chain", 3, base.eval.votes, temp == 0, False)
        run_dir = Path(args.run_dir) / f"{cfg.hash()}"
        rows = pipeline.evaluate_system(system, cfg, model, task, examples, None, run_dir / "chain.jsonl")
        res = {}
        for role in ("G", "V", "R"):
            texts = [t for r in rows for t in r["texts"][role]]
            prefix = task.prompts.prefix(role)
            lens = np.array([len(tok.encode(t[len(prefix) :], add_special_tokens=False)) for t in texts])
            res[role] = {
                "tokens_mean": round(float(lens.mean()), 1),
                "tokens_p90": float(np.percentile(lens, 90)),
                "tokens_p99": float(np.percentile(lens, 99)),
                "at_budget": round(float((lens >= args.budget).mean()), 3),
            }
        g_ok = [bool(task.grade_example(t, ex)) for r, ex in zip(rows, examples) for t in r["texts"]["G"]]
        g_explicit = [task.has_explicit_answer(t, ex) for r, ex in zip(rows, examples) for t in r["texts"]["G"]]
        res["G"].update(accuracy=round(float(np.mean(g_ok)), 3), explicit_answer=round(float(np.mean(g_explicit)), 3))
        res["R"].update(
            accuracy=round(float(np.mean([c for r in rows for c in r["pass_correct"]])), 3),
            vote_accuracy=round(float(np.mean([r["vote_correct"] for r in rows])), 3),
            distinct_answers_per_question=round(float(np.mean([len(set(r["pass_answers"])) for r in rows])), 2),
        )
        out["temperatures"][str(temp)] = res
        print(temp, json.dumps(res), flush=True)
    out["wall_time_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
