"""Measures SmolLM2-135M-Instruct's single-model greedy accuracy on synthetic-task settings.

    python experiments/calibrate_synthetic.py --questions 60 --max-new 96

Prints one line per setting; used to pick the default difficulty of the embedded task
(target: 25-50% single-model greedy accuracy, so MALT sees positive and negative trajectories).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from malt_jax import pipeline
from malt_jax.config import SamplingConfig
from malt_jax.expansion import ExpansionSpec
from malt_jax.tasks import get_task

SETTINGS = [
    dict(max_value=9, steps=1, ops="+"),
    dict(max_value=9, steps=1, ops="+-"),
    dict(max_value=9, steps=(1, 2), ops="+-"),
    dict(max_value=20, steps=1, ops="+-"),
    dict(max_value=9, steps=2, ops="+-"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--settings", type=str, default="", help="JSON list of option dicts")
    args = ap.parse_args()
    settings = json.loads(args.settings) if args.settings else SETTINGS
    model = pipeline.load_model("smollm2")
    for opts in settings:
        task = get_task("synthetic", **opts)
        exs = task.load("test")[: args.questions]
        codec = pipeline.PromptCodec(model.tokenizer, task)
        spec = ExpansionSpec(n=1, depth=1, max_new=(args.max_new,) * 3, sampling=SamplingConfig(greedy=True),
                             stop=codec.stop)
        got: dict = {}
        t0 = time.time()
        pipeline.sample_trees(model, codec, exs, spec, seed=0, batch_size=len(exs), progress=False,
                              on_batch=lambda b, a: got.update(a))
        texts = pipeline.decode_level(model.tokenizer, got["G_tokens"], got["G_lengths"])
        acc = np.mean([task.grade_example(texts[i, 0], e) for i, e in enumerate(exs)])
        print(json.dumps({"options": opts, "greedy_accuracy": round(float(acc), 3), "n": len(exs),
                          "mean_tokens": float(got["G_lengths"].mean()),
                          "stopped": float(got["G_stopped"].mean()), "seconds": round(time.time() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
