"""Iterative MALT (``malt-jax iterate``, :func:`run_iterative`): several offline MALT rounds, each
sampling its trees with the chain the round before trained.

MALT is one offline round (expand -> credit -> train); the paper names iterating it as future
work, with the labelling threshold raised from 0.5 towards 1 as the chain improves. Round r
(1-based) of ``iterate.rounds``:

1. expands the training questions into G -> V -> R trees sampled by round r - 1's trained chain
   (round 1: the base model; the same training questions every round) with the per-question
   keys of seed ``train.seed + r - 1``;
2. credits them at the round's value threshold (``iterate.round_thresholds``: given, or linear
   from ``train.value_threshold`` to 0.9 at the last round);
3. trains the three adapters, starting from round r - 1's (``iterate.init: previous``) or from
   fresh ones (``base``);
4. evaluates its trained chain (MALT and MALT+MV@k) on ``iterate.val_questions`` questions of
   the task's validation split, disjoint from the training and evaluation questions
   (``stages.rundir.validation_questions``); with ``iterate.stop_on_no_gain`` a round whose
   validation MALT+MV@k accuracy is not above the previous round's ends the iteration, and the
   previous round's adapters are the final ones.

Round 1 is exactly the plain pipeline's expand / credit / train (same seeds, same files), so
``rounds: 1`` gives the adapters of ``malt-jax run``. The final adapters are copied to
``<run>/adapters`` (so ``ask`` and ``export`` read the run as any other) and evaluated on the
evaluation questions with every system of ``malt-jax run`` (``stages.eval.run_eval``). Files::

    <run>/config.yaml splits.json validation.json timings.json peak_rss_gb.json
    <run>/round_<r>/expansion|credit|adapters   the round's trees, training data, adapters
    <run>/round_<r>/eval/malt.jsonl             its chain on the validation questions
    <run>/iterate.json                          per round: threshold, start, validation accuracy
                                                (Wilson 95%), gain; the final round, the stop reason
    <run>/adapters/ eval/ report.md summary.json   the final adapters and their evaluation

Every stage skips finished work, so rerunning the command continues an interrupted run.

Why a command of its own rather than ``malt-jax run`` doing rounds when ``iterate.rounds > 1``:
the rounds write another layout (``round_<r>/``), add a validation step and a stopping rule,
and the single-stage commands (``expand``, ``credit``, ...) have no meaning for a round; as
with ``study`` and ``rl``, ``run`` keeps its one-round contract, and refuses a config with
``iterate.rounds > 1`` (its ``eval/`` rows would be taken for the final round's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.config import RunConfig
from malt_jax.evaluation.fmt import fmt_ci, fmt_float, fmt_p, md_table
from malt_jax.evaluation.stats import mcnemar_exact
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.roles import ROLES
from malt_jax.runtime.rss import PeakRSS
from malt_jax.stages import run_credit, run_eval, run_expand, run_train
from malt_jax.stages.eval import System, primary_names
from malt_jax.stages.rundir import (
    load_adapter,
    load_adapters,
    load_splits,
    load_validation,
    lock_run_dir,
    prepare_run_dir,
    read_json,
    split_questions,
    stamp_run_dir,
    validation_questions,
    write_atomic,
)
from malt_jax.tasks import Task
from malt_jax.workflows.pipeline import make_task, publish_eval, run_record, sharded_model
from malt_jax.workflows.summary import system_table

log = logging.getLogger(__name__)

__all__ = ["run_iterative", "round_dir", "validation_accuracy", "round_adapters"]


def round_dir(run_dir: str | Path, r: int) -> Path:
    """The directory of round ``r`` (1-based): ``<run>/round_<r>``."""
    return Path(run_dir) / f"round_{r}"


def round_adapters(cfg: RunConfig, rdir: Path, suffix: str = "") -> dict[str, Params]:
    """A finished round's adapters (``suffix`` "" = after DPO, "_sft" = after SFT), checked
    against the run's model and ``lora`` config."""
    return {r: load_adapter(rdir / "adapters" / f"{r}{suffix}.safetensors", cfg) for r in ROLES}


def validation_accuracy(ev: dict, votes: int, r: int) -> dict[str, dict[str, Any]]:
    """The scores that judge round ``r``: ``{system: {accuracy, ci95, correct, n}}`` of its chain
    on the validation questions (``ev``: its ``run_eval`` output; ``malt`` and, with ``votes`` > 1,
    ``malt+MV@k``; 95% Wilson intervals). The stopping rule reads ``primary_names(votes)[0]``
    (MALT+MV@k)."""
    return system_table(ev["results"])


def _copy_file(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    write_atomic(dst, lambda f: f.write(data))


def _publish(src: Path, dst: Path) -> None:
    """Copies a round's adapters and their training records (no checkpoints) to ``dst`` (the
    run's ``adapters``), each file atomically, the final adapters last."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    finals = {f"{r}.safetensors" for r in ROLES}
    for p in sorted(files, key=lambda p: p.name in finals):
        _copy_file(p, dst / p.name)
    stale = {p.name for p in dst.iterdir() if p.is_file()} - {p.name for p in files}
    for name in stale:  # e.g. a file of another round's run written before a rerun chose this one
        if not name.startswith("."):
            (dst / name).unlink(missing_ok=True)  # the hosts of a multi-host run all do this


def run_iterative(
    cfg: RunConfig,
    *,
    progress: bool = True,
    model: Model | None = None,
    task: Task | None = None,
    evaluate: bool = True,
    stop_after: int | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Runs (or resumes) iterative MALT over ``cfg.run_dir`` (see the module docstring); returns
    its summary (also ``<run>/summary.json`` and, with ``results``, ``<results>/<name>.json``).

    ``evaluate``: evaluate the final adapters on the evaluation questions (every system of
    ``malt-jax run``) and write the report; without it only the rounds and ``iterate.json``.
    ``stop_after``: return once that many rounds are done, as if the process were killed there
    (for tests of resumption).

    Raises ConfigError before anything is written for a task without enough validation questions
    (``iterate.val_questions``); RunDirError for a run directory of another config. Holds the
    run directory's writer lock throughout."""
    with lock_run_dir(cfg.run_dir):
        return _run_iterative(cfg, progress, model, task, evaluate, stop_after, command)


def _run_iterative(
    cfg: RunConfig,
    progress: bool,
    model: Model | None,
    task: Task | None,
    evaluate: bool,
    stop_after: int | None,
    command: str,
) -> dict[str, Any]:
    from malt_jax.parallel.sharding import mesh_context

    it = cfg.iterate
    t_start = time.perf_counter()
    run_dir = prepare_run_dir(cfg, stamp=False)  # another config's directory: refused, untouched
    timings_path, memory_path = run_dir / "timings.json", run_dir / "peak_rss_gb.json"
    timings, memory = read_json(timings_path, {}), read_json(memory_path, {})
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        task = task or make_task(cfg)
        split = split_questions(cfg, task)
        val = validation_questions(cfg, task, *split, it.val_questions)  # too few: refused before the stamp
        stamp_run_dir(cfg, run_dir)
        train, evals = load_splits(cfg, task, run_dir, split)
        load_validation(cfg, run_dir, val)
        model, mesh = sharded_model(cfg, model)
    timings["load"] = round(time.perf_counter() - t0, 1)
    if rss.peak_gb is not None:
        memory["load"] = rss.peak_gb

    def timed(name: str, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        with mesh_context(mesh), PeakRSS() as rss:  # the stage's jitted calls see the mesh
            out = fn(*args, **kw)
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 1)
        write_atomic(timings_path, json.dumps(timings, indent=2))
        if rss.peak_gb is not None:
            memory[name] = rss.peak_gb
            write_atomic(memory_path, json.dumps(memory, indent=2))
        return out

    votes = cfg.eval.votes
    key = primary_names(votes)[0]  # MALT+MV@k: what judges a round
    thresholds = it.round_thresholds(cfg.train.value_threshold)
    val_system = System("malt", 3, votes, False, True)
    rounds: list[dict[str, Any]] = []
    correct: list[np.ndarray] = []  # per round: the validation MALT+MV@k correctness
    final_round, stop_reason = it.rounds, f"all {it.rounds} round(s) ran"
    state: dict[str, Any] = {}

    def record(done: bool) -> dict[str, Any]:
        out = {
            "rounds_max": it.rounds,
            "rounds_run": len(rounds),
            "init": it.init,
            "stop_on_no_gain": it.stop_on_no_gain,
            "thresholds": list(thresholds),
            "judge": f"{key} on {len(val)} validation questions",
            "val_questions": len(val),
            "final_round": final_round if done else None,
            "stop_reason": stop_reason if done else None,
            "rounds": rounds,
        }
        write_atomic(run_dir / "iterate.json", json.dumps(out, indent=2) + "\n")
        return out

    for r in range(1, it.rounds + 1):
        rdir = round_dir(run_dir, r)
        rdir.mkdir(exist_ok=True)
        rcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, value_threshold=thresholds[r - 1]))
        prev = round_dir(run_dir, r - 1) if r > 1 else None
        sampler = round_adapters(cfg, prev) if prev is not None else None
        timed(
            f"round_{r}/expand",
            run_expand,
            rcfg,
            model,
            task,
            train,
            rdir,
            progress,
            mesh,
            adapters=sampler,
            seed_offset=r - 1,
        )
        credit = timed(f"round_{r}/credit", run_credit, rcfg, model, task, rdir)
        init = prev / "adapters" if prev is not None and it.init == "previous" else None
        timed(f"round_{r}/train", run_train, rcfg, model, rdir, mesh=mesh, progress=progress, init=init)
        adapters = round_adapters(cfg, rdir)
        ev = timed(
            f"round_{r}/validate",
            run_eval,
            cfg,
            model,
            task,
            val,
            rdir,
            adapters,
            [val_system],
            progress,
            mesh=mesh,
            out=rdir / "eval",
        )
        scores = validation_accuracy(ev, votes, r)
        correct.append(np.asarray(ev["results"][key].correct, bool))
        vs_prev = None
        gain = None
        if rounds:
            before = rounds[-1]["validation"][key]["accuracy"]
            test = mcnemar_exact(correct[-1], correct[-2])
            vs_prev = {
                "diff": scores[key]["accuracy"] - before,
                "b01": test["b01"],
                "b10": test["b10"],
                "p": test["p_value"],
            }
            gain = scores[key]["accuracy"] > before
        rounds.append(
            {
                "round": r,
                "threshold": thresholds[r - 1],
                "sampled_by": f"round_{r - 1}" if prev is not None else "base model",
                "trained_from": f"round_{r - 1}" if init is not None else "fresh adapters",
                "expansion_seed": cfg.train.seed + r - 1,
                "leaf_accuracy": credit.get("leaf_accuracy"),
                "training_data": {
                    role: {"sft": credit.get(f"{role}/sft"), "dpo_pairs": credit.get(f"{role}/dpo_pairs")}
                    for role in ("generator", "verifier", "refiner")
                },
                "validation": scores,
                "vs_previous": vs_prev,
                "gain": gain,
            }
        )
        log.info(
            "iterate: round %d (threshold %.3f): validation %s %.4f%s",
            r,
            thresholds[r - 1],
            key,
            scores[key]["accuracy"],
            "" if vs_prev is None else f" ({vs_prev['diff']:+.4f} vs round {r - 1})",
        )
        if gain is False and it.stop_on_no_gain:
            final_round = r - 1
            stop_reason = (
                f"no gain: round {r}'s validation {key} accuracy {scores[key]['accuracy']:.4f} is not above "
                f"round {r - 1}'s {rounds[-2]['validation'][key]['accuracy']:.4f}; round {r - 1}'s adapters are final"
            )
            break
        if r == it.rounds and not it.stop_on_no_gain and it.rounds > 1:
            stop_reason += " (iterate.stop_on_no_gain off: the last round's adapters are final)"
        if stop_after is not None and r >= stop_after and r < it.rounds:
            state = record(done=False)
            return {"run_dir": str(run_dir), "stopped_at": r, "iterate": state}
    state = record(done=True)
    final_dir = round_dir(run_dir, final_round)
    _publish(final_dir / "adapters", run_dir / "adapters")
    log.info("iterate: %s", stop_reason)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "iterate": state}
    if evaluate:
        final_adapters, sft_adapters = load_adapters(run_dir)
        ev = timed(
            "eval",
            run_eval,
            cfg,
            model,
            task,
            evals,
            run_dir,
            final_adapters,
            progress=progress,
            mesh=mesh,
            sft_adapters=sft_adapters,
        )
        credit_summary = read_json(final_dir / "credit" / "summary.json")
        rec = run_record(cfg, len(train), len(evals), timings)
        extra = {
            "Iterative MALT": f"final adapters of round {final_round} of {len(rounds)} run "
            f"(at most {it.rounds}; training from {it.init})",
        }
        publish_eval(
            cfg,
            run_dir,
            ev,
            summary,
            dataclasses.replace(rec, title="Iterative MALT evaluation report", extra=extra),
            len(train),
            len(evals),
            credit_summary,
            command,
            timings,
            memory,
            report_tail=iterations_section(state),
            iterate=state,
        )
    summary["timings"] = timings
    summary["this_call_s"] = round(time.perf_counter() - t_start, 1)
    return summary


def iterations_section(state: dict[str, Any]) -> list[str]:
    """The report's "Iterations" section: per round its threshold, where its trees and its
    training came from, its validation accuracies (95% Wilson intervals) and the change against
    the round before (exact McNemar on the same questions), then the final round and why."""
    names = list(state["rounds"][0]["validation"]) if state["rounds"] else []
    header = ["round", "threshold", "trees sampled by", "training from"]
    header += [f"validation {n} [95% CI]" for n in names] + ["vs previous round (McNemar p)"]
    rows = []
    for rec in state["rounds"]:
        cells = [
            str(rec["round"]) + (" (final)" if rec["round"] == state["final_round"] else ""),
            fmt_float(rec["threshold"], 3),
            rec["sampled_by"],
            rec["trained_from"],
        ]
        for n in names:
            v = rec["validation"][n]
            cells.append(f"{fmt_float(v['accuracy'])} {fmt_ci(*v['ci95'])} ({v['correct']} / {v['n']})")
        d = rec["vs_previous"]
        cells.append("" if d is None else f"{fmt_float(d['diff'], sign=True)} (p {fmt_p(d['p'])})")
        rows.append(cells)
    return [
        "## Iterations",
        "",
        f"Judged by {state['judge']} (the task's validation split, disjoint from the training and "
        f"evaluation questions); stop on no gain: {'on' if state['stop_on_no_gain'] else 'off'}.",
        "",
        *md_table(header, rows),
        "",
        f"Final adapters: round {state['final_round']}. Stop reason: {state['stop_reason']}.",
    ]
