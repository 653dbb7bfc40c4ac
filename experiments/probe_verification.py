"""Can the embedded model solve, and can it check? Greedy solve accuracy per operation family,
and the zero-shot verifier's ranking of right vs wrong proposed answers.

    python experiments/probe_verification.py --items 64 --out results/probe_verification.json

For each family (single-digit addition and multiplication, subtraction ``a - b`` with
``a <= 50``, division ``(q·b) ÷ b`` with ``q, b <= 12``) it samples ``--items`` random problems
(its own seeded generator, not the task's splits), and reports

* ``solve_accuracy``: greedy answers (the synthetic task's generator prompt, 48 new tokens)
  graded by the task's grader;
* ``verify_auc``: a proposed answer is shown (right for half of the items, off by 1-2 for the
  other half) with the verifier prompt and the reply primed with "Verdict:"; the score is
  log p(" correct") - log p(" incorrect") of the next token, and the AUC says how well it ranks
  right above wrong answers (0.5 = chance).

This is the measurement behind the "inverse" task family: checking a subtraction or division
uses addition or multiplication, which the model does far better than the inverse.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import SamplingConfig
from malt_jax.model.llama import causal_positions, forward
from malt_jax.sampling.decode import StopCriteria, generate, pad_batch, trim
from malt_jax.tasks import get_task
from malt_jax.tasks.prompts import role_messages, separate_messages
from malt_jax.workflows import pipeline


def families(rng: random.Random) -> dict:
    def add():
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}?", a + b

    def mul():
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} × {b}?", a * b

    def sub():
        a = rng.randint(2, 50)
        b = rng.randint(1, a - 1)
        return f"What is {a} - {b}?", a - b

    def div():
        q, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {q * b} ÷ {b}?", q

    return {"add (1-9)": add, "multiply (2-9)": mul, "subtract (a<=50)": sub, "divide (q,b<=12)": div}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/probe_verification.json")
    args = ap.parse_args()
    t0 = time.time()
    model = pipeline.load_model("smollm2")
    tok = model.tokenizer
    task = get_task("synthetic", style="inverse")
    p = task.prompts
    stop = StopCriteria(stop_ids=tuple(tok.stop_ids))
    fwd = jax.jit(lambda params, x: forward(params, x, causal_positions(*x.shape), model.cfg)[0])
    yes = [tok.encode(s, add_special_tokens=False)[0] for s in (" correct", " Correct")]
    no = [tok.encode(s, add_special_tokens=False)[0] for s in (" incorrect", " Incorrect")]
    rng = random.Random(args.seed)
    out = {
        "experiment": "probe_verification",
        "command": f"python experiments/probe_verification.py --items {args.items} --seed {args.seed} --out {args.out}",
        "items": args.items,
        "families": {},
    }
    for name, fam in families(rng).items():
        items = [fam() for _ in range(args.items)]
        ids = [tok.encode_chat(role_messages(p, "G", q)) for q, _ in items]
        x, n = pad_batch(ids, bucket=32)
        gen = generate(
            model.params,
            jnp.asarray(x),
            jnp.asarray(n),
            jax.random.split(jax.random.key(0), len(ids)),
            cfg=model.cfg,
            sampling=SamplingConfig(greedy=True),
            stop=stop,
            max_new_tokens=48,
        )
        texts = [tok.decode(t, skip_special_tokens=True) for t in trim(gen)]
        solved = np.mean([task.grade(t, str(a)) for t, (_, a) in zip(texts, items)])
        right = np.arange(len(items)) % 2 == 0
        shown = [a if r else a + rng.choice([-2, -1, 1, 2]) for (_, a), r in zip(items, right)]
        v_ids = [
            tok.encode_chat(separate_messages(p, "V", q, generator_out=f"Final Answer: {s}"))
            + tok.encode(p.verifier_prefix, add_special_tokens=False)
            for (q, _), s in zip(items, shown)
        ]
        vx, vn = pad_batch(v_ids, bucket=32)
        logits = np.asarray(fwd(model.params, jnp.asarray(vx)))[np.arange(len(v_ids)), vn - 1]
        score = np.logaddexp(*logits[:, yes].T) - np.logaddexp(*logits[:, no].T)
        out["families"][name] = {
            "solve_accuracy": round(float(solved), 3),
            "verify_auc": round(auc(score[right], score[~right]), 3),
            "says_correct": round(float((score > 0).mean()), 3),
        }
        print(name, out["families"][name], flush=True)
    out["wall_time_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
