"""The MALT pipeline: :func:`run` runs the four stages over one run directory and writes the report.

    expand  -> <run>/expansion/batch_*.npz (+ .jsonl texts)   trees of G/V/R samples and leaf rewards
    credit  -> <run>/credit/{G,V,R}_{sft,dpo}.jsonl, summary.json
    train   -> <run>/adapters/{G,V,R}.safetensors            one LoRA adapter per role
    eval    -> <run>/eval/<system>.jsonl, report.md, *.png, summary.json

With ``tree.critique: false`` the run is the paper's role ablation "G and R trained with an empty
critique": the trees' verifier level is left empty (G -> (no critique) -> R), only G and R get
training data and adapters, and the run's trained chains (``malt``, ``sft-chain``) are evaluated
without a critique; the report and ``summary.json`` say so (:data:`NO_CRITIQUE`).

The stages live in :mod:`malt_jax.stages`, the run directory's files in :mod:`malt_jax.stages.rundir`,
the prompt codec in :mod:`malt_jax.sampling.codec` and the base model in :mod:`malt_jax.model.base_model`; their
names used by earlier callers stay importable from here. Every stage skips work whose output
already exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from malt_jax.config import RunConfig
from malt_jax.evaluation.report import RunRecord, format_table, write_report
from malt_jax.model.base_model import Model, load_model
from malt_jax.parallel.distributed import is_lead
from malt_jax.roles import ROLE_NAMES, ROLES
from malt_jax.runtime import tblog
from malt_jax.runtime.rss import PeakRSS
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec
from malt_jax.stages.credit import build_datasets, node_context, node_output, run_credit
from malt_jax.stages.eval import (
    System,
    critique_verdict,
    default_systems,
    evaluate_system,
    primary_names,
    run_eval,
    system_results,
    verifier_stats,
)
from malt_jax.stages.expand import decode_level, decode_tree, grade_leaves, question_keys, run_expand, sample_trees
from malt_jax.stages.rundir import (
    load_adapter,
    load_adapters,
    load_datasets,
    load_expansion,
    load_splits,
    lock_run_dir,
    prepare_run_dir,
    read_json,
    role_epochs,
    save_adapter,
    split_questions,
    stamp_run_dir,
    training_counts,
    write_atomic,
)
from malt_jax.stages.train import heldout_questions, run_train
from malt_jax.tasks import Example, Task
from malt_jax.workflows.summary import experiment_summary

log = logging.getLogger(__name__)

__all__ = [
    "run",
    "run_record",
    "NO_CRITIQUE",
    "make_task",
    "make_run_mesh",
    # moved to base_model, codec, roles, rundir and stages/*; importable from here as before
    "Model",
    "load_model",
    "PromptCodec",
    "ExpansionSpec",
    "ROLES",
    "ROLE_NAMES",
    "Example",
    "Task",
    "load_adapter",
    "load_adapters",
    "load_datasets",
    "load_expansion",
    "load_splits",
    "prepare_run_dir",
    "save_adapter",
    "training_counts",
    "write_atomic",
    "build_datasets",
    "node_context",
    "node_output",
    "run_credit",
    "System",
    "critique_verdict",
    "default_systems",
    "evaluate_system",
    "primary_names",
    "run_eval",
    "system_results",
    "verifier_stats",
    "decode_level",
    "decode_tree",
    "grade_leaves",
    "question_keys",
    "run_expand",
    "sample_trees",
    "heldout_questions",
    "run_train",
]


def make_run_mesh(cfg: RunConfig):
    """The run's mesh (``cfg.mesh``; default: every device on ``data``), or None on one device."""
    from malt_jax.parallel.sharding import make_mesh

    if jax.device_count() == 1 and not cfg.mesh:
        return None
    return make_mesh(dict(cfg.mesh) or None)


def sharded_model(cfg: RunConfig, model: Model | None = None) -> tuple[Model, Any]:
    """The run's model (``model``, else loaded from ``cfg.weights``) with its parameters placed on
    the run's mesh (:func:`make_run_mesh`; ``None`` on one device), and that mesh."""
    model = model or load_model(cfg.weights, cfg.model)
    mesh = make_run_mesh(cfg)
    if mesh is not None:
        from malt_jax.parallel.distributed import shard_params

        model = dataclasses.replace(model, params=shard_params(model.params, mesh))
    return model, mesh


def make_task(cfg: RunConfig) -> Task:
    """The run's task (``cfg.task``); an unknown task or a bad option is a ``ConfigError``."""
    from malt_jax.config import ConfigError
    from malt_jax.tasks import get_task

    opts = {k: v for k, v in cfg.task.options if k not in ("train_split", "eval_split")}
    try:
        return get_task(cfg.task.name, path=cfg.task.path or None, **opts)
    except (TypeError, ValueError) as e:  # unknown task / option, bad option value
        raise ConfigError(f"task {cfg.task.name!r} (options {opts}): {e}") from None


#: What the report and ``summary.json`` (``trained_chain``) say about a run without a critique
#: (``tree.critique: false``).
NO_CRITIQUE = (
    "G -> (empty critique) -> R: G and R trained and evaluated with an empty critique (tree.critique: false); "
    "no verifier is trained or run, and this run's malt and sft-chain systems are that chain"
)


def run_record(cfg: RunConfig, n_train: int, n_eval: int, timings: Mapping[str, float]) -> RunRecord:
    """What the report says about a run (its "Run" table; a run without a critique says so in
    its title and a "Trained chain" row)."""
    no_critique: dict[str, Any] = {}
    if not cfg.tree.critique:
        no_critique = {
            "title": "MALT evaluation report: G and R trained with an empty critique",
            "extra": {"Trained chain": NO_CRITIQUE},
        }
    return RunRecord(
        **no_critique,
        model=cfg.weights,
        task=cfg.task.name,
        n_questions=n_eval,
        n_train=n_train,
        framing=cfg.task.framing,
        tree=f"{cfg.tree.n}x{cfg.tree.m}x{cfg.tree.l}",
        seeds=f"split {cfg.task.seed}, train {cfg.train.seed}, eval {cfg.eval.seed}",
        config_hash=cfg.hash(),
        wall_times=dict(timings),
    )


def run(
    cfg: RunConfig,
    stages: Sequence[str] = ("expand", "credit", "train", "eval"),
    progress: bool = True,
    model: Model | None = None,
    task: Task | None = None,
    command: str = "",
) -> dict:
    """Runs the MALT pipeline (each stage resumable) and writes the report and ``summary.json``
    (also to ``<cfg.results>/<name>.json`` when ``results`` is set); returns a summary.

    Holds the run directory's writer lock throughout (:func:`~malt_jax.stages.rundir.lock_run_dir`):
    a second process on the same directory is refused at once. A config of several rounds of
    iterative MALT (``iterate.rounds > 1``) is refused: ``malt-jax iterate`` runs it."""
    if cfg.iterate.rounds > 1:
        from malt_jax.config import ConfigError

        raise ConfigError(
            f"iterate.rounds: {cfg.iterate.rounds} rounds are run by malt-jax iterate "
            "(workflows.iterate.run_iterative); malt-jax run and its stage commands run one round"
        )
    with lock_run_dir(cfg.run_dir):
        return _run(cfg, stages, progress, model, task, command)


def _run(
    cfg: RunConfig, stages: Sequence[str], progress: bool, model: Model | None, task: Task | None, command: str
) -> dict:
    run_dir = prepare_run_dir(cfg, stamp=False)
    timings_path = run_dir / "timings.json"
    timings = read_json(timings_path, {})
    memory_path = run_dir / "peak_rss_gb.json"  # per stage, of the call that last ran it
    memory = read_json(memory_path, {})
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        task = task or make_task(cfg)  # data and task errors surface before the (slow) model load
        split = split_questions(cfg, task)
        stamp_run_dir(cfg, run_dir)  # only a config whose task and data load is recorded
        train, evals = load_splits(cfg, task, run_dir, split)
        model, mesh = sharded_model(cfg, model)
    timings["load"] = round(time.perf_counter() - t0, 1)
    if rss.peak_gb is not None:
        memory["load"] = rss.peak_gb
    summary: dict[str, Any] = {"run_dir": str(run_dir)}

    def timed(name, fn):
        from malt_jax.parallel.sharding import mesh_context

        t = time.perf_counter()
        with mesh_context(mesh), PeakRSS() as rss:  # the stage's jitted calls see the mesh
            out = fn()
        dt = time.perf_counter() - t
        timings[name] = round(timings.get(name, 0.0) + dt, 1)
        write_atomic(timings_path, json.dumps(timings, indent=2))
        if rss.peak_gb is not None:
            memory[name] = rss.peak_gb
            write_atomic(memory_path, json.dumps(memory, indent=2))
            log.info("%s: %.1f s, peak resident memory %.2f GB", name, dt, rss.peak_gb)
        return out

    if "expand" in stages:
        timed("expand", lambda: run_expand(cfg, model, task, train, run_dir, progress, mesh=mesh))
    credit_summary = None
    if "credit" in stages:
        credit_summary = timed("credit", lambda: run_credit(cfg, model, task, run_dir))
        summary["credit"] = credit_summary
    if "train" in stages:
        timed("train", lambda: run_train(cfg, model, run_dir, mesh=mesh, progress=progress))
    if "eval" in stages:
        adapters, sft_adapters = load_adapters(run_dir)
        ev = timed(
            "eval",
            lambda: run_eval(
                cfg, model, task, evals, run_dir, adapters, progress=progress, mesh=mesh, sft_adapters=sft_adapters
            ),
        )
        # a run without a critique says so in its summary.json
        no_critique: dict[str, Any] = {} if cfg.tree.critique else {"critique": False, "trained_chain": NO_CRITIQUE}
        if credit_summary is None and (run_dir / "credit" / "summary.json").exists():
            credit_summary = read_json(run_dir / "credit" / "summary.json")
        publish_eval(
            cfg,
            run_dir,
            ev,
            summary,
            run_record(cfg, len(train), len(evals), timings),
            len(train),
            len(evals),
            credit_summary,
            command,
            timings,
            memory,
            **no_critique,
        )
    summary["timings"] = timings
    summary["peak_rss_gb"] = memory
    return summary


def publish_eval(
    cfg: RunConfig,
    run_dir: Path,
    ev: dict,
    summary: dict,
    record: RunRecord,
    n_train: int,
    n_eval: int,
    credit_summary: dict | None,
    command: str,
    timings: Mapping[str, float],
    memory: Mapping[str, float],
    report_tail: Sequence[str] = (),
    **extra: Any,
) -> dict:
    """After an evaluation: the run's ``report.md`` (``report_tail``: lines appended to it),
    ``summary.json`` (``extra``: more summary fields), TensorBoard, ``<results>/<name>.json``;
    updates ``summary`` (the returned dict of ``run``) and returns the JSON summary."""
    report = run_dir / "report.md"
    if is_lead():
        write_report(
            run_dir,
            ev["results"],
            ev["comparisons"],
            credit_summary,
            record,
            verifier=ev["verifier"],
            epochs_by_role=role_epochs(run_dir),
            training_counts=training_counts(run_dir),
            skills=ev.get("skills"),
        )
        if report_tail:
            write_atomic(report, report.read_text().rstrip("\n") + "\n\n" + "\n".join(report_tail) + "\n")
    summary.update(
        table=format_table(ev["results"]),
        report=str(report),
        comparisons=ev["comparisons"],
        verifier=ev["verifier"],
    )
    out = experiment_summary(
        cfg.name,
        command,
        cfg.hash(),
        ev,
        run_dir,
        n_train,
        n_eval,
        cfg.eval.votes,
        primary_names(cfg.eval.votes),
        sum(timings.values()),
        credit=credit_summary,
        **extra,
        timings_s=dict(timings),
        peak_rss_gb=dict(memory),
    )
    write_atomic(run_dir / "summary.json", json.dumps(out, indent=2) + "\n")
    if is_lead() and tblog.write_eval(run_dir, out["systems"], out["verifier"]):
        summary["tensorboard"] = tblog.command(run_dir)
    if cfg.results:
        Path(cfg.results).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(cfg.results) / f"{cfg.name}.json", json.dumps(out, indent=2) + "\n")
    return out
