"""A learning-curve study: MALT on nested training sets, every system on one held-out set.

    malt-jax study experiments/study_synthetic.yaml        # resumable; make study

One run directory holds the whole study::

    <run>/expansion/           trees of all task.num_train training questions (expanded once)
    <run>/eval/                the baselines (single-greedy, single, single+MV, chain, chain+MV)
    <run>/n0040/credit|adapters|eval   per training-set size k: credit on the first k trees,
                               SFT (+DPO) adapters, the SFT-only chain and MALT evaluated
    <results>/<name>_n0040.json  one summary per size; <name>.json the curve; <name>.png the plot

Sizes are nested (the first k questions of one seeded training list), so the curve measures
more data, not other data. Every size is compared with the same baseline rows; the primary
comparison is declared before the run (``stages.eval.primary_names``: MALT+MV@k vs single+MV@k)
and the other comparisons of a size carry Holm-adjusted p-values. Each stage skips finished
work, so rerunning the command resumes the study.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from malt_jax.config import ConfigError, RunConfig
from malt_jax.model.base_model import Model
from malt_jax.stages import run_credit, run_eval, run_expand, run_train
from malt_jax.stages.eval import default_systems, primary_names
from malt_jax.stages.rundir import (
    load_adapters,
    load_splits,
    lock_run_dir,
    prepare_run_dir,
    read_json,
    split_questions,
    stamp_run_dir,
    write_atomic,
)
from malt_jax.tasks import Task
from malt_jax.workflows.pipeline import make_task, sharded_model
from malt_jax.workflows.summary import experiment_summary, system_table

log = logging.getLogger(__name__)

__all__ = ["run_study", "size_dir"]


def size_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"n{k:04d}"


def _link_rows(src: Path, dst: Path) -> None:
    """Makes the baseline rows visible in a size's eval dir (so they are not sampled again)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.jsonl"):
        target = dst / f.name
        if not target.exists():
            shutil.copyfile(f, target)


def _plot(curve: list[dict], baselines: dict, votes: int, path: Path) -> None:
    """Accuracy vs training questions (95% Wilson intervals), baselines as bands."""
    from malt_jax.evaluation.plots import new_figure

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = [c["n_train"] for c in curve]
    mv = f"+MV@{votes}" if votes > 1 else ""
    for name, color in ((f"malt{mv}", "C3"), ("malt", "C1"), (f"sft-chain{mv}", "C2")):
        pts = [(c["n_train"], c["systems"][name]) for c in curve if name in c["systems"]]
        if not pts:
            continue
        acc = [p["accuracy"] for _, p in pts]
        err = [[a - p["ci95"][0] for a, (_, p) in zip(acc, pts)], [p["ci95"][1] - a for a, (_, p) in zip(acc, pts)]]
        ax.errorbar([x for x, _ in pts], acc, yerr=err, marker="o", capsize=3, color=color, label=name)
    for name, color in ((f"single{mv}", "C0"), (f"chain{mv}", "C7"), ("single-greedy", "C4")):
        if name in baselines:
            b = baselines[name]
            ax.axhline(b["accuracy"], color=color, linestyle="--", linewidth=1, label=f"{name} (untrained)")
            ax.axhspan(b["ci95"][0], b["ci95"][1], color=color, alpha=0.08)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("training questions (log scale)")
    ax.set_ylabel("accuracy on held-out questions")
    ax.set_title(f"MALT learning curve (n_eval = {curve[0]['n_eval'] if curve else 0}, 95% Wilson intervals)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def run_study(
    cfg: RunConfig, progress: bool = True, command: str = "", model: Model | None = None, task: Task | None = None
) -> dict[str, Any]:
    """Runs (or resumes) the study of ``cfg.study``; returns the curve summary (also written).
    Holds the run directory's writer lock throughout (a second process is refused at once)."""
    sizes = sorted(cfg.study.train_sizes)
    if not sizes:
        raise ConfigError("study.train_sizes: empty; a study needs at least one training-set size")
    if not cfg.tree.critique:
        raise ConfigError("tree.critique: false is not supported by malt-jax study; it is a malt-jax run option")
    with lock_run_dir(cfg.run_dir):
        return _run_study(cfg, sizes, progress, command, model, task)


def _run_study(
    cfg: RunConfig, sizes: list[int], progress: bool, command: str, model: Model | None, task: Task | None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    run_dir = prepare_run_dir(cfg, stamp=False)
    task = task or make_task(cfg)
    split = split_questions(cfg, task)
    train, evals = split
    overlap = {e.question for e in train} & {e.question for e in evals}
    if overlap:
        raise ConfigError(
            f"task.options.eval_split: {len(overlap)} evaluation question(s) are also training "
            f"questions (e.g. {sorted(overlap)[0]!r}); a study needs disjoint sets"
        )
    stamp_run_dir(cfg, run_dir)  # only a config whose task and data are usable is recorded
    train, evals = load_splits(cfg, task, run_dir, split)
    results_dir = Path(cfg.study.results or run_dir / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "timings.json"
    timings = read_json(timings_path, {})

    def timed(name: str, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kw)
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 1)
        write_atomic(timings_path, json.dumps(timings, indent=2))
        return out

    model, mesh = sharded_model(cfg, model) if model is not None else timed("load", sharded_model, cfg)
    timed("expand", lambda: run_expand(cfg, model, task, train, run_dir, progress, mesh=mesh))
    votes = cfg.eval.votes
    all_systems = default_systems(votes, sft_chain=True)
    base_systems = [s for s in all_systems if not s.trained]
    base = timed(
        "eval/baselines",
        lambda: run_eval(
            cfg, model, task, evals, run_dir, None, base_systems, progress, mesh=mesh, out=run_dir / "eval"
        ),
    )
    baselines = system_table(base["results"])
    curve = []
    for k in sizes:
        sub = size_dir(run_dir, k)
        sub.mkdir(exist_ok=True)
        credit = timed(f"n{k}/credit", run_credit, cfg, model, task, run_dir, out=sub / "credit", n_questions=k)
        timed(f"n{k}/train", run_train, cfg, model, sub, mesh=mesh, progress=progress)
        adapters, sft_adapters = load_adapters(sub)
        _link_rows(run_dir / "eval", sub / "eval")
        systems = (
            all_systems
            if (k == sizes[-1] or cfg.study.sft_chain == "all")
            else [s for s in all_systems if s.stage != "sft"]
        )
        ev = timed(
            f"n{k}/eval",
            run_eval,
            cfg,
            model,
            task,
            evals,
            sub,
            adapters,
            systems,
            progress,
            mesh=mesh,
            sft_adapters=sft_adapters,
        )
        summary = experiment_summary(
            f"{cfg.name}_n{k}",
            command,
            cfg.hash(),
            ev,
            sub,
            k,
            len(evals),
            votes,
            primary_names(votes),
            sum(v for n, v in timings.items() if n.startswith(f"n{k}/")),
            credit=credit,
        )
        write_atomic(results_dir / f"{cfg.name}_n{k:04d}.json", json.dumps(summary, indent=2) + "\n")
        curve.append(summary)
        log.info("study: size %d done", k)
    out = {
        "experiment": cfg.name,
        "command": command,
        "config_hash": cfg.hash(),
        "train_sizes": sizes,
        "n_eval": len(evals),
        "votes": votes,
        "primary": "{} vs {}".format(*primary_names(votes)),
        "baselines": baselines,
        "curve": [
            {
                "n_train": c["n_train"],
                "systems": {n: v for n, v in c["systems"].items() if n not in baselines},
                "primary": next((x for x in c["comparisons"] if x["primary"]), None),
                "verifier": c["verifier"],
                "training": c["training"],
            }
            for c in curve
        ],
        "timings_s": timings,
        "wall_time_s": round(sum(timings.values()), 1),
        "this_call_s": round(time.perf_counter() - t_start, 1),
    }
    write_atomic(results_dir / f"{cfg.name}.json", json.dumps(out, indent=2) + "\n")
    _plot([{**c, "n_eval": len(evals)} for c in curve], baselines, votes, results_dir / f"{cfg.name}.png")
    return out
