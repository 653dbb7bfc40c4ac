"""Which verifier prompt gives the untrained chain a verifier that discriminates at all?

    python experiments/probe_verifier_designs.py experiments/smollm2_synthetic.yaml \
        --questions 96 --temperatures 0.3,0.7 --out results/probe_verifier_designs.json

Runs the untrained G -> V -> R chain (3 passes) on the first ``--questions`` questions of the
*validation* split with three verifier designs (everything else as in the config):

* ``verdict``: reply primed with "Verdict:" (a correct/incorrect label first);
* ``inverse-check``: reply primed with "Check:", told to check with the inverse operation;
* ``re-solve``: reply primed with "The correct answer is" (the verifier solves the problem and
  its verdict is whether its answer agrees with the generator's; the default).

For each it reports the generator and refiner accuracy, the verdict confusion against the
generator's real correctness (``pipeline.critique_verdict``; balanced accuracy 0.5 = chance)
and how the refiner reacts (copies the generator's answer or not, after agreement or not).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.config import load_run_config
from malt_jax.evaluation.stats import verifier_confusion
from malt_jax.workflows import pipeline

DESIGNS = {
    "verdict": dict(
        verifier_separate="Check the proposed solution with the inverse operation. Is its final answer correct? "
        'Start with "Verdict: correct" or "Verdict: incorrect", then give the correct number.'
        "\n\nProblem: {question}\n\nProposed solution:\n{answer}",
        verifier_prefix="Verdict:",
    ),
    "inverse-check": dict(
        verifier_separate="Check the proposed solution with the inverse operation: for a subtraction add the answer "
        "back, for a division multiply the answer back. Then say whether the proposed final answer "
        "is correct.\n\nProblem: {question}\n\nProposed solution:\n{answer}",
        verifier_prefix="Check:",
    ),
    "re-solve": dict(),  # the task's default prompts
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--questions", type=int, default=96)
    ap.add_argument("--temperatures", default="0.3,0.7")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--run-dir", default="runs/verifier_designs")
    ap.add_argument("--out", default="results/probe_verifier_designs.json")
    args = ap.parse_args()
    t0 = time.time()
    base = load_run_config(args.config, args.overrides)
    task = pipeline.make_task(base)
    examples = task.load("validation")[: args.questions]
    model = pipeline.load_model(base.weights, base.model)
    default = task.prompts
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "experiment": "verifier_designs",
        "command": "python experiments/probe_verifier_designs.py "
        + " ".join(
            [
                args.config,
                *args.overrides,
                f"--questions {args.questions}",
                f"--temperatures {args.temperatures}",
                f"--out {args.out}",
            ]
        ),
        "split": "validation",
        "n": len(examples),
        "framing": base.task.framing,
        "runs": {},
    }
    for temp in [float(t) for t in args.temperatures.split(",")]:
        for name in args.designs.split(","):
            task.prompts = dataclasses.replace(default, **DESIGNS[name])
            cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, temperature=temp))
            path = Path(args.run_dir) / f"{name}-{temp}-{cfg.hash()}.jsonl"
            rows = pipeline.evaluate_system(
                pipeline.System("chain", 3, base.eval.votes, False, False),
                cfg,
                model,
                task,
                examples,
                None,
                path,
                progress=False,
            )
            right: list[bool] = []
            said: list[bool | None] = []
            react: collections.Counter[str] = collections.Counter()
            for r, ex in zip(rows, examples):
                for g, v, fin in zip(r["texts"]["G"], r["texts"]["V"], r["texts"]["R"]):
                    right.append(bool(task.grade_example(g, ex)))
                    said.append(pipeline.critique_verdict(task, v, g, ex))
                    same = task.answer_key(fin, ex) == task.answer_key(g, ex)
                    react[f"verdict={said[-1]}, R {'copies G' if same else 'differs from G'}"] += 1
            cm = verifier_confusion(right, said)
            out["runs"][f"{name}@{temp}"] = {
                "G_accuracy": round(float(np.mean(right)), 3),
                "R_accuracy": round(float(np.mean([c for r in rows for c in r["pass_correct"]])), 3),
                "verdicts": cm,
                "refiner_reaction": dict(sorted(react.items())),
            }
            print(
                f"{name} T={temp}: G {np.mean(right):.3f}, BA {cm['balanced_accuracy']:.3f}, "
                f"says correct {cm['says_correct_rate']:.2f}",
                flush=True,
            )
    out["wall_time_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
