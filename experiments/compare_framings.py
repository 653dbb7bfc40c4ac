"""Single model vs the untrained G -> V -> R chain, in the chat and the separate role framing.

    python experiments/compare_framings.py experiments/smollm2_synthetic.yaml --questions 200 \
        --out results/framing_synthetic.json

Both framings are evaluated on the same questions of the task's *validation* split (never the
test questions the study reports), with the config's sampling (3 passes per system). Prints and
writes accuracies with Wilson intervals, exact McNemar tests (chain vs single in each framing,
separate vs chat chain) and the verifier's verdict confusion. The better framing (higher
chain+MV accuracy) is the default of the experiment configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from malt_jax.config import load_run_config
from malt_jax.evaluation.stats import compare
from malt_jax.workflows import pipeline


def _counts(c: dict) -> dict:
    """A comparison's paired questions and McNemar discordant counts (a wrong & b right, a right & b wrong)."""
    return {"n": c["n"], "b01": c["b01"], "b10": c["b10"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--run-dir", default="runs/framings")
    ap.add_argument("--out", default="results/framing_synthetic.json")
    args = ap.parse_args()
    t0 = time.time()
    base = load_run_config(args.config, args.overrides)
    task = pipeline.make_task(base)
    examples = task.load(args.split)[: args.questions]
    if len(examples) < args.questions:
        raise SystemExit(f"--questions {args.questions}: the {args.split} split has only {len(examples)}")
    model = pipeline.load_model(base.weights, base.model)
    systems = [
        pipeline.System("single", 1, base.eval.votes, False, False),
        pipeline.System("chain", 3, base.eval.votes, False, False),
    ]
    summary: dict = {
        "experiment": "framing",
        "command": "python experiments/compare_framings.py "
        + " ".join([args.config, *args.overrides, f"--questions {args.questions}", f"--out {args.out}"]),
        "split": args.split,
        "n_eval": len(examples),
        "framings": {},
    }
    chains = {}
    for framing in ("chat", "separate"):
        cfg = dataclasses.replace(base, task=dataclasses.replace(base.task, framing=framing))
        out = Path(args.run_dir) / f"{framing}-{cfg.hash()}"
        ev = pipeline.run_eval(cfg, model, task, examples, out, None, systems, out=out)
        res = ev["results"]
        chains[framing] = res
        tests = compare(res, "chain", ["single"]) + compare(
            res, f"chain+MV@{base.eval.votes}", [f"single+MV@{base.eval.votes}"]
        )
        summary["framings"][framing] = {
            "systems": {
                n: {"accuracy": r.accuracy, "ci95": list(r.ci), "correct": r.successes} for n, r in res.items()
            },
            "comparisons": [
                {"a": c["target"], "b": c["baseline"], **_counts(c), "diff": c["diff"], "p": c["mcnemar_p"]}
                for c in tests
            ],
            "verifier": ev["verifier"].get("chain"),
        }
        print(framing, {n: round(r.accuracy, 3) for n, r in res.items()}, flush=True)
    mv = f"chain+MV@{base.eval.votes}"
    both = {f"{f}:{mv}": chains[f][mv] for f in chains}
    both.update({f"{f}:chain": chains[f]["chain"] for f in chains})
    summary["separate_vs_chat"] = [
        {"a": c["target"], "b": c["baseline"], **_counts(c), "diff": c["diff"], "p": c["mcnemar_p"]}
        for c in compare(both, f"separate:{mv}", [f"chat:{mv}"]) + compare(both, "separate:chain", ["chat:chain"])
    ]
    summary["wall_time_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["separate_vs_chat"]), f"({summary['wall_time_s']} s) -> {args.out}")


if __name__ == "__main__":
    main()
