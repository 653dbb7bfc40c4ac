"""Offline MALT vs iterative MALT vs online multi-agent GRPO vs single-agent GRPO on the testbed,
at equal sampled tokens (``make testbed-rl``).

    python experiments/testbed_rl_compare.py                  # every seed, resumable (rerun to continue)
    python experiments/testbed_rl_compare.py --seeds 0        # one seed

Declared before any run (no setting below was chosen on evaluation questions):

* **Base and budget**: the default testbed model (``models/testbed``,
  ``experiments/pretrain/testbed.yaml``), the 256 training questions of ``experiments/testbed.yaml``
  and its 3x3x3 trees. Offline MALT samples one tree per training question once; that run's
  sampled tokens (every G, V and R output of its expansion) are the budget ``B`` of its seed.
* **Systems**, each with seeds 0, 1, 2 (the MALT stage's / RL run's seed), evaluated on the same
  1000 test questions with the same evaluation seed:

  - ``offline``: MALT, one round (``experiments/testbed.yaml``); the testbed study's seed runs
    (``runs/testbed_study/v080f020_s<seed>``) are reused when present.
  - ``iterate``: iterative MALT, 2 rounds of 128 training questions each (the same 128 both
    rounds; 2 x 128 trees = the offline run's 256), thresholds 0.5 -> 0.9, the round kept by its
    validation accuracy (``malt-jax iterate``).
  - ``rl``: online multi-agent GRPO (``experiments/testbed_rl.yaml``), 8 iterations of 32
    questions = the 256 training questions once, one 3x3x3 tree each (the offline run's trees,
    sampled on-policy), ``rl.updates_per_iteration`` 1, GRPO advantages per role.
  - ``grpo-single``: the single-agent baseline, GRPO on G alone (``rl.agents: single``), 8
    answers per question, as many iterations of 32 questions as the budget ``B`` buys at the
    offline run's mean answer length (``rl.token_budget: B`` caps it), evaluated as G alone
    with MV@3 (``single-trained+MV@3``).

* **Primary comparison**: ``rl`` malt+MV@3 vs ``offline`` malt+MV@3, pooled over the seeds
  (sign-flip test over questions, ``evaluation.stats.seeds_paired_test``), each seed's exact
  McNemar test beside it. The others carry Holm-adjusted p-values within their family: ``rl``
  vs ``grpo-single`` (single-trained+MV@3), ``rl`` vs ``iterate``, ``iterate`` vs ``offline``,
  ``offline`` vs ``grpo-single``, ``grpo-single`` vs the untrained single+MV@3.
* Target (the issue's): ``rl`` beats ``offline`` and ``grpo-single`` with Holm-adjusted p < 0.05.

* **Held-out curves** (learning curves, not a test): during training each RL run evaluates its
  current adapters (``rl.eval_every``: every 2 of ``rl``'s 8 iterations, every 10 of
  ``grpo-single``'s; before the first update and after the last too) on 200 questions of the
  testbed's **validation** split (``rl.eval_questions``), disjoint from the training and the test
  questions, so the curves choose nothing and read no test question; the evaluation uses none of
  the run's RNG, so the trained adapters are those of a run without it.

Output: ``results/testbed_rl_compare.json`` (rewritten as runs land; ``"complete": false`` until
all have) with per-seed accuracies and token counts, the tests, the RL runs' reward curves
(training reward against sampled tokens, per iteration, with 95% Wilson intervals) and their
held-out curves (validation accuracy of the method's MV@3 system against sampled tokens, with 95%
Wilson intervals; none for a run made before ``rl.eval_every``), plotted in
``results/testbed_rl_compare.png``. Run directories under ``runs/testbed_rl_compare/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import testbed_study  # noqa: E402  (the offline seed runs are the testbed study's)

RUN_CONFIG = "experiments/testbed.yaml"
RL_CONFIG = "experiments/testbed_rl.yaml"
SEEDS = (0, 1, 2)
N_EVAL = testbed_study.N_EVAL
VOTES = 3
MV = f"+MV@{VOTES}"
METHODS = ("offline", "iterate", "rl", "grpo-single")
# method -> the system that stands for it
SYSTEM = {"offline": f"malt{MV}", "iterate": f"malt{MV}", "rl": f"malt{MV}", "grpo-single": f"single-trained{MV}"}
PRIMARY = ("rl", "offline")
FAMILY = [
    ("rl", "grpo-single"),
    ("rl", "iterate"),
    ("iterate", "offline"),
    ("offline", "grpo-single"),
    ("grpo-single", "single-untrained"),
]
ITERATE_QUESTIONS = 128
RL_ITERATIONS = 8
RL_QUESTIONS = 32
SINGLE_N = 8
# held-out (validation) points: rl.eval_every per RL method (5 points over rl's 8 iterations,
# about 9 over grpo-single's ~80), on EVAL_QUESTIONS validation questions
EVAL_EVERY = {"rl": 2, "grpo-single": 10}
EVAL_QUESTIONS = 200


def run_dir(method: str, seed: int) -> Path:
    if method == "offline":
        return ROOT / "runs/testbed_study" / f"{testbed_study.level_tag(testbed_study.DEFAULT_LEVEL)}_s{seed}"
    return ROOT / "runs/testbed_rl_compare" / f"{method}_s{seed}"


def expansion_tokens(run: Path) -> dict[str, Any]:
    """The tokens an offline run's expansion sampled (every role's outputs) and G's mean length."""
    import numpy as np

    from malt_jax.roles import ROLES

    total, g_sum, g_count = 0, 0, 0
    files = sorted((run / "expansion").glob("batch_*.npz"))
    if not files:
        raise FileNotFoundError(f"{run}/expansion: no batch_*.npz (run the offline MALT stage first)")
    for f in files:
        with np.load(f) as z:
            for r in ROLES:
                if f"{r}_lengths" in z:
                    total += int(z[f"{r}_lengths"].sum())
            g_sum += int(z["G_lengths"].sum())
            g_count += int(z["G_lengths"].size)
    return {"tokens": total, "generator_mean_length": g_sum / g_count}


def common_overrides(method: str, seed: int) -> list[str]:
    return [
        f"name=testbed_rl_compare_{method}_s{seed}",
        f"run_dir={run_dir(method, seed).relative_to(ROOT)}",
        "results=''",
        f"task.num_eval={N_EVAL}",
    ]


def run_offline(seed: int, progress: bool) -> dict:
    if not (run_dir("offline", seed) / "summary.json").exists():
        testbed_study.run_malt(testbed_study.DEFAULT_LEVEL, seed, ablations=True, progress=progress)
    return json.loads((run_dir("offline", seed) / "summary.json").read_text())


def run_iterate(seed: int, progress: bool) -> dict:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.iterate import run_iterative

    over = [
        *common_overrides("iterate", seed),
        f"train.seed={seed}",
        f"task.num_train={ITERATE_QUESTIONS}",
        "iterate.rounds=2",
        "eval.sft_chain=false",
    ]
    cfg = load_run_config(RUN_CONFIG, over)
    return run_iterative(cfg, progress=progress, command=" ".join(["malt-jax iterate", RUN_CONFIG, *over]))


def rl_overrides(method: str, seed: int, budget: dict) -> list[str]:
    over = [
        *common_overrides(method, seed),
        f"rl.seed={seed}",
        f"rl.questions_per_iteration={RL_QUESTIONS}",
        f"rl.eval_every={EVAL_EVERY[method]}",
        f"rl.eval_questions={EVAL_QUESTIONS}",
    ]
    if method == "rl":
        return [*over, f"rl.iterations={RL_ITERATIONS}"]
    per_iteration = RL_QUESTIONS * SINGLE_N * budget["generator_mean_length"]
    iterations = max(1, math.ceil(budget["tokens"] / per_iteration))
    return [
        *over,
        "rl.agents=single",
        "rl.roles=[G]",
        f"tree.n={SINGLE_N}",
        f"rl.iterations={iterations}",
        f"rl.token_budget={budget['tokens']}",
    ]


def run_rl(method: str, seed: int, budget: dict, progress: bool) -> dict:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.rl import run_rl as run

    summary_path = run_dir(method, seed) / "rl" / "summary.json"
    if summary_path.exists() and (run_dir(method, seed) / "eval").exists():
        return json.loads(summary_path.read_text())
    over = rl_overrides(method, seed, budget)
    cfg = load_run_config(RL_CONFIG, over)
    return run(cfg, progress=progress, command=" ".join(["malt-jax rl", RL_CONFIG, *over]))


def correctness(run: Path) -> dict[str, Any]:
    """system name -> (question ids, boolean correctness) of every evaluated system of a run."""
    import numpy as np

    from malt_jax.stages.eval import System, system_results
    from malt_jax.stages.rundir import read_rows

    out = {}
    for path in sorted((run / "eval").glob("*.jsonl")):
        rows = read_rows(path, N_EVAL)
        if rows is None:
            continue
        votes = len(rows[0]["pass_correct"])
        system = System(path.stem, 1, votes, False, False)
        ids = [r["id"] for r in rows]
        out.update({n: (ids, np.asarray(r.correct)) for n, r in system_results(system, rows).items()})
    return out


def reward_curve(run: Path, leaves: int) -> list[dict[str, Any]]:
    """Per iteration of an RL run: sampled tokens so far, the mean training reward of its leaves
    (the joint reward; G's own grade with ``agents: single``) and its 95% Wilson interval."""
    from malt_jax.evaluation.stats import wilson_interval
    from malt_jax.stages.rundir import read_jsonl

    rows = read_jsonl(run / "rl" / "metrics.jsonl")
    out = []
    for it in sorted({r["iteration"] for r in rows}):
        r = next(x for x in rows if x["iteration"] == it and x["role"] == "G")
        # ``leaves``: the iteration's graded samples (the trees' leaves; G's answers in single mode)
        ci = wilson_interval(round(r["chain_accuracy"] * leaves), leaves)
        out.append({"iteration": it, "num_tokens": r["num_tokens"], "reward": r["chain_accuracy"], "ci95": list(ci)})
    return out


def heldout_curve(run: Path, system: str) -> list[dict[str, Any]]:
    """Per held-out point of an RL run (``rl/heldout.jsonl``, ``rl.eval_every``): the iteration,
    sampled tokens so far, ``system``'s validation accuracy, its 95% Wilson interval, correct and
    n; empty for a run without held-out rows (made before ``rl.eval_every``, or without it)."""
    from malt_jax.stages.rundir import read_jsonl

    path = run / "rl" / "heldout.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    keys = ("iteration", "num_tokens", "accuracy", "ci95", "correct", "n")
    return sorted(({k: r[k] for k in keys} for r in rows if r["system"] == system), key=lambda p: p["iteration"])


def summarize(records: dict[int, dict[str, Any]], command: str, wall: float) -> dict[str, Any]:
    import numpy as np

    from malt_jax.runtime.machine import machine_info

    seeds = sorted(records)
    per_seed: dict[str, Any] = {}
    vectors: dict[int, dict[str, Any]] = {}
    for s in seeds:
        corr = {m: correctness(run_dir(m, s)) for m in METHODS if m in records[s]}
        vec = {m: corr[m][SYSTEM[m]] for m in corr if SYSTEM[m] in corr[m]}
        if "offline" in corr and f"single{MV}" in corr["offline"]:
            vec["single-untrained"] = corr["offline"][f"single{MV}"]
        ids = {m: tuple(v[0]) for m, v in vec.items()}
        if len(set(ids.values())) > 1:
            raise RuntimeError(f"seed {s}: the methods were evaluated on different questions: {sorted(ids)}")
        vectors[s] = {m: v[1] for m, v in vec.items()}
        tests = testbed_study.seed_tests(vectors[s], [PRIMARY, *FAMILY])
        per_seed[str(s)] = {
            "accuracy": {m: float(v.mean()) for m, v in vectors[s].items()},
            "tokens": {m: records[s][m].get("tokens") for m in METHODS if m in records[s]},
            "tests": tests,
            "runs": {m: str(run_dir(m, s).relative_to(ROOT)) for m in METHODS if m in records[s]},
            "wall_time_s": {m: records[s][m].get("wall_time_s") for m in METHODS if m in records[s]},
        }
    pooled = testbed_study.pooled_tests(vectors, [PRIMARY, *FAMILY])
    accuracy = {
        m: {
            "mean": float(np.mean([vectors[s][m].mean() for s in seeds if m in vectors[s]])),
            "sd": float(np.std([vectors[s][m].mean() for s in seeds if m in vectors[s]], ddof=1))
            if sum(m in vectors[s] for s in seeds) > 1
            else None,
            "seeds": [s for s in seeds if m in vectors[s]],
        }
        for m in [*METHODS, "single-untrained"]
        if any(m in vectors[s] for s in seeds)
    }
    targets = {
        f"rl beats {b}": bool(
            f"rl vs {b}" in pooled
            and pooled[f"rl vs {b}"]["diff"] > 0
            and pooled[f"rl vs {b}"].get("p_holm", pooled[f"rl vs {b}"]["p_value"]) < 0.05
        )
        for b in ("offline", "grpo-single")
    }
    curves = {
        f"{m}_s{s}": reward_curve(run_dir(m, s), RL_QUESTIONS * (27 if m == "rl" else SINGLE_N))
        for s in seeds
        for m in ("rl", "grpo-single")
        if m in records[s] and (run_dir(m, s) / "rl" / "metrics.jsonl").exists()
    }
    heldout = {
        f"{m}_s{s}": heldout_curve(run_dir(m, s), SYSTEM[m]) for s in seeds for m in EVAL_EVERY if m in records[s]
    }
    complete = seeds == list(SEEDS) and all(set(METHODS) <= set(records[s]) for s in seeds)
    return {
        "experiment": "testbed_rl_compare",
        "command": command,
        "complete": complete,
        "primary": f"{PRIMARY[0]} {SYSTEM[PRIMARY[0]]} vs {PRIMARY[1]} {SYSTEM[PRIMARY[1]]}",
        "systems": SYSTEM,
        "seeds": seeds,
        "n_eval": N_EVAL,
        "votes": VOTES,
        "accuracy": accuracy,
        "per_seed": per_seed,
        "pooled": pooled,
        "targets": targets,
        "reward_curves": curves,
        "heldout_curves": {k: v for k, v in heldout.items() if v},
        # the runs' own times summed (a rerun that only summarises finished runs takes seconds)
        "wall_time_s": round(sum(w for s in seeds for w in per_seed[str(s)]["wall_time_s"].values() if w), 1),
        "this_call_s": round(wall, 1),
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
    }


def _seed_style(name: str) -> tuple[str, str]:
    """A curve's colour (its method) and line style (its seed) from its name ``<method>_s<seed>``."""
    method, _, seed = name.rpartition("_s")
    styles = ("-", "--", ":")
    style = styles[int(seed) % len(styles)] if seed.isdigit() else "-"
    return ("C3" if method == "rl" else "C0"), style


def plot(summary: dict, path: Path) -> None:
    from malt_jax.evaluation.plots import new_figure

    fig = new_figure(12.8, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    for name, pts in sorted(summary["reward_curves"].items()):
        xs = [p["num_tokens"] for p in pts]
        ys = [p["reward"] for p in pts]
        color = "C3" if name.startswith("rl_") else "C0"
        ax.plot(xs, ys, marker=".", color=color, alpha=0.8, label=name)
        ax.fill_between(xs, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color=color, alpha=0.12)
    ax.set_xlabel("sampled tokens")
    ax.set_ylabel("training reward (95% Wilson)")
    ax.set_title("Testbed: online GRPO reward against sampled tokens")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for name, pts in sorted(summary.get("heldout_curves", {}).items()):
        color, style = _seed_style(name)
        xs = [p["num_tokens"] for p in pts]
        ys = [p["accuracy"] for p in pts]
        err = [[y - p["ci95"][0] for y, p in zip(ys, pts)], [p["ci95"][1] - y for y, p in zip(ys, pts)]]
        method = name.rpartition("_s")[0]
        label = f"{name} ({SYSTEM.get(method, '?')})"
        ax.errorbar(xs, ys, yerr=err, color=color, linestyle=style, marker=".", capsize=2, alpha=0.8, label=label)
    ax.set_xlabel("sampled tokens")
    ax.set_ylabel(f"validation accuracy (95% Wilson), {EVAL_QUESTIONS} questions")
    ax.set_title("Held-out (validation) accuracy against sampled tokens")
    if summary.get("heldout_curves"):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no held-out rows (runs without rl.eval_every)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)
    progress = not args.no_progress
    command = "python experiments/testbed_rl_compare.py" + (
        "" if args.seeds == list(SEEDS) else " --seeds " + " ".join(map(str, args.seeds))
    )
    t0 = time.perf_counter()
    testbed_study.ensure_model(testbed_study.DEFAULT_LEVEL, progress)
    out = ROOT / "results" / "testbed_rl_compare.json"
    records: dict[int, dict[str, Any]] = {}
    for s in args.seeds:
        records[s] = {}
        off = run_offline(s, progress)
        budget = expansion_tokens(run_dir("offline", s))
        records[s]["offline"] = {"tokens": budget["tokens"], "wall_time_s": off.get("wall_time_s")}
        for m in args.methods:
            if m == "offline":
                continue
            if m == "iterate":
                res = run_iterate(s, progress)
                tokens = sum(expansion_tokens(r)["tokens"] for r in sorted(run_dir(m, s).glob("round_*")) if r.is_dir())
            else:
                res = run_rl(m, s, budget, progress)
                tokens = res["num_tokens"]
            wall = res.get("wall_time_s")
            if wall is None and (run_dir(m, s) / "timings.json").exists():  # iterate: its stages' times
                wall = round(sum(json.loads((run_dir(m, s) / "timings.json").read_text()).values()), 1)
            records[s][m] = {"tokens": tokens, "wall_time_s": wall}
            summary = summarize(records, command, time.perf_counter() - t0)
            out.write_text(json.dumps(summary, indent=2) + "\n")
            plot(summary, out.with_suffix(".png"))
            print(f"testbed rl compare: seed {s} {m} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
