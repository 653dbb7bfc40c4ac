"""Online multi-agent GRPO with a joint outcome reward (``malt-jax rl``, :func:`run_rl`).

Every iteration samples G -> V -> R trees on-policy with the current role adapters for
``rl.questions_per_iteration`` training questions, rewards the leaves with the task's grader,
credits each role group-relatively among its siblings (``credit.advantages``) and updates each
trained role's LoRA adapter with the clipped policy-gradient loss and a k3 KL to the reference
(``training.pg_loss``); the pieces are :mod:`malt_jax.stages.rl`. Writes, in the run directory::

    config.yaml splits.json                         as every run
    rl/metrics.jsonl                                one row per role and update (TRL / Tunix names)
    rl/checkpoints/<iteration>/                     orbax: adapters, optimizer states, RNG key
    rl/heldout.jsonl                                with rl.eval_every: held-out accuracy against
                                                    sampled tokens (per evaluation point and system)
    rl/heldout/<iteration>/<system>.jsonl           its per-question rows (texts, passes, vote)
    rl/summary.json rl/report.md                    written when the run ends
    adapters/{G,V,R}.safetensors                    the final adapters (the train stage's layout)
    tensorboard/<role>/rl                           the metrics as train/<name> (tensorboardX)
    tensorboard/rl_heldout                          heldout/<system> at step = sampled tokens
    eval/<system>.jsonl                             with evaluation: the trained chain ("malt" ...)

``rl.agents: single`` trains the single-agent GRPO baseline instead: each iteration samples G's
``tree.n`` answers per question (depth-1 trees), rewards each with the task's grade of that answer
and updates G alone (advantages over a question's answers); V's and R's adapters stay their start
adapters, and evaluation runs G's trained adapter alone ("single-trained", +MV@k) against the
untrained single model (``stages.eval.default_systems`` with ``agents="single"``).

With ``rl.eval_every`` k > 0 the current adapters are evaluated on ``rl.eval_questions`` questions
of the task's validation split (``stages.rundir.validation_questions``: disjoint from the training
and evaluation questions; their ids in ``validation.json``) before the first update, after every
k-th iteration and after the last: the trained system of the final evaluation ("malt", or
"single-trained" with ``rl.agents: single``, each with its ``+MV@k`` vote) run by
``stages.eval.run_eval`` with the ``eval`` section's votes, temperature and seed. It reads none of
the run's RNG, so the adapters are those of a run without it. A point's row holds the sampled
tokens so far (``num_tokens`` of the metrics rows), the correct answers of ``n`` and the 95%
Wilson interval; the run's ``rl/report.md`` tabulates them.

A rerun resumes from the latest checkpoint (every ``rl.checkpoint_every`` iterations and at the
end): the iteration's questions and sampling seed are functions of the iteration and of the
checkpointed key, so an interrupted run ends with the adapters of an uninterrupted one. Metrics
and held-out rows of iterations after the checkpoint are dropped and redone; held-out rows up to
it are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from malt_jax.config import ConfigError, RunConfig, run_config_of, to_dict
from malt_jax.evaluation.fmt import fmt_ci, fmt_float, md_table
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import is_lead, put
from malt_jax.roles import ROLES, role_name
from malt_jax.runtime import tblog
from malt_jax.runtime.checkpoint import Checkpointer, CheckpointError
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages import rl as rl_stage
from malt_jax.stages.eval import SINGLE_TRAINED, System, run_eval
from malt_jax.stages.rundir import (
    load_adapter,
    load_splits,
    load_validation,
    lock_run_dir,
    prepare_run_dir,
    read_json,
    read_jsonl,
    save_adapter,
    split_questions,
    stamp_run_dir,
    validation_questions,
    write_atomic,
    write_rows,
)
from malt_jax.tasks import Example, Task
from malt_jax.training.steps import TrainState
from malt_jax.workflows.pipeline import make_task, sharded_model
from malt_jax.workflows.summary import system_table

log = logging.getLogger(__name__)

__all__ = [
    "run_rl",
    "initial_adapters",
    "METRIC_KEYS",
    "HELDOUT",
    "heldout_systems",
    "is_heldout_point",
    "heldout_rows",
    "heldout_section",
    "rl_report",
]

# the keys every metrics row holds (besides iteration / role / update / step / token counts)
METRIC_KEYS = (
    "loss",
    "pg_loss",
    "kl",
    "clip_ratio",
    "reward_mean",
    "reward_std",
    "completion_length",
    "entropy",
    "advantage_mean",
    "grad_norm",
    "learning_rate",
)
_ADV_METRICS = ("reward_mean", "reward_std", "frac_reward_zero_std", "advantage_abs_mean", "groups")
HELDOUT = "heldout.jsonl"  # <run>/rl/heldout.jsonl: the held-out rows (rl.eval_every)


def heldout_systems(cfg: RunConfig) -> list[System]:
    """What a held-out point evaluates: the run's trained system of the final evaluation, with
    ``eval.votes`` passes (and so its ``+MV@k`` vote): the chain "malt", or G's adapter alone,
    "single-trained", with ``rl.agents: single``."""
    if cfg.rl.agents == "single":
        return [System(SINGLE_TRAINED, 1, cfg.eval.votes, False, True)]
    return [System("malt", 3, cfg.eval.votes, False, True)]


def is_heldout_point(iteration: int, every: int, last: bool) -> bool:
    """Whether the adapters after ``iteration`` iterations are evaluated on the validation
    questions: never with ``every`` 0; otherwise before the first update (0), after every
    ``every``-th iteration, and after the last (``last``: the iterations or the token budget ran
    out)."""
    return every > 0 and (iteration == 0 or iteration % every == 0 or last)


def heldout_rows(ev: dict, iteration: int, num_tokens: int) -> list[dict[str, Any]]:
    """A held-out point's rows, one per evaluated system (``ev``: its ``run_eval`` output):
    ``iteration`` (the adapters after that many iterations; 0 = the start adapters),
    ``num_tokens`` (tokens sampled by then, as the metrics rows count them), ``system``, and
    ``accuracy``, ``ci95`` (95% Wilson), ``correct``, ``n``."""
    return [
        {"iteration": iteration, "num_tokens": num_tokens, "system": name, **scores}
        for name, scores in system_table(ev["results"]).items()
    ]


def heldout_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's "Held-out accuracy against sampled tokens" section: one line per evaluation
    point (its iteration and sampled tokens), per system its accuracy, 95% Wilson interval and
    correct / n; no lines without rows."""
    if not rows:
        return []
    systems = list(dict.fromkeys(r["system"] for r in rows))
    points = sorted({(r["iteration"], r["num_tokens"]) for r in rows})
    by = {(r["iteration"], r["system"]): r for r in rows}
    table = []
    for it, tokens in points:
        cells = [str(it), f"{tokens:,}"]
        for name in systems:
            r = by.get((it, name))
            cells.append(
                "" if r is None else f"{fmt_float(r['accuracy'])} {fmt_ci(*r['ci95'])} ({r['correct']} / {r['n']})"
            )
        table.append(cells)
    n = rows[0]["n"]
    return [
        "## Held-out accuracy against sampled tokens",
        "",
        f"The adapters after each evaluated iteration (0: the start adapters) on {n} questions of the task's "
        "validation split (disjoint from the training and evaluation questions), with the evaluation's votes, "
        "temperature and seed; 95% Wilson intervals.",
        "",
        *md_table(["iteration", "sampled tokens", *(f"{s} [95% CI] (correct / n)" for s in systems)], table),
    ]


def rl_report(summary: dict[str, Any], heldout: Sequence[dict[str, Any]]) -> str:
    """``<run>/rl/report.md``: what ran, the held-out accuracy against sampled tokens (with
    ``rl.eval_every``) and the final evaluation's accuracy table (when evaluated)."""
    lines = [
        "# Online GRPO report",
        "",
        f"{summary['iterations']} iteration(s), {summary['num_tokens']:,} tokens sampled (stopped by "
        f"{summary['stopped_by']}); agents: {summary['agents']}; trained roles: {', '.join(summary['roles'])}.",
    ]
    section = heldout_section(heldout)
    if section:
        lines += ["", *section]
    if "table" in summary:
        lines += ["", "## Final evaluation (evaluation questions)", "", "```", summary["table"], "```"]
    return "\n".join(lines) + "\n"


def _check_recorded_validation(run_dir: Path, n: int) -> None:
    """A run whose ``validation.json`` records another number of validation questions than
    ``rl.eval_questions`` asks for: its held-out rows are on those, so refused naming the field."""
    old = read_json(run_dir / "validation.json", {})
    recorded = old.get("validation") if isinstance(old, dict) else None
    if isinstance(recorded, list) and len(recorded) != n:
        raise ConfigError(
            f"rl.eval_questions: {run_dir} evaluated its held-out points on {len(recorded)} validation questions "
            f"(validation.json), not {n}; keep rl.eval_questions={len(recorded)} or use a new run_dir"
        )


def initial_adapters(cfg: RunConfig) -> tuple[dict[str, Params], dict[str, Params | None]]:
    """``(start, reference)`` adapters per role. ``rl.reference: base``: fresh adapters (LoRA
    ``b = 0``, exactly the base model) to start from, the base model (None) as reference;
    ``sft``: the SFT adapters of the run directory ``rl.sft_run`` as both. A missing or
    mismatched SFT run is a ConfigError naming ``rl.sft_run``."""
    from malt_jax.model.lora import init_lora

    rl = cfg.rl
    if rl.reference == "base":
        key = jax.random.key(rl.seed)
        start = {r: init_lora(cfg.model, cfg.lora, jax.random.fold_in(key, i)) for i, r in enumerate(ROLES)}
        return start, dict.fromkeys(ROLES)
    run = Path(rl.sft_run)
    if (run / "config.yaml").is_file():
        other = run_config_of(run)
        for name in ("weights", "model", "lora"):
            if to_dict(getattr(other, name)) != to_dict(getattr(cfg, name)):
                raise ConfigError(f"rl.sft_run: {run} was trained with another {name} than this run's")
    start = {}
    for r in ROLES:
        path = run / "adapters" / f"{r}_sft.safetensors"
        if not path.is_file():
            raise ConfigError(f"rl.sft_run: {path} is missing (run the train stage of {run} first)")
        try:
            start[r] = load_adapter(path, cfg)
        except Exception as e:  # WeightError: a shape or key that is not this run's adapter
            raise ConfigError(f"rl.sft_run: {e}") from None
    return start, dict(start)


def run_rl(
    cfg: RunConfig,
    *,
    progress: bool = True,
    model: Model | None = None,
    task: Task | None = None,
    evaluate: bool = True,
    systems: Sequence[System] | None = None,
    stop_after: int | None = None,
    command: str = "",
) -> dict:
    """Online multi-agent GRPO over ``cfg.run_dir`` (see the module docstring); resumes from the
    latest checkpoint. With ``evaluate``, the final adapters are evaluated on the run's held-out
    questions by ``stages.eval.run_eval`` (``systems``: default the run's ``eval`` systems; the
    RL-trained chain is the trained system, "malt"; with ``rl.agents: single``, G's trained
    adapter alone, "single-trained"). Returns a summary dict (with evaluation: ``eval``
    accuracies, ``table``, and ``primary``, the pre-declared primary comparison's row of
    ``run_eval``, None when those systems were not evaluated).

    ``stop_after``: return once that many iterations are done, as if the process were killed
    there (nothing beyond the regular checkpoints is saved); for tests of resumption.

    Raises ConfigError for a config that is not an RL run (``rl.iterations: 0``) or a bad
    ``rl.sft_run``; RunDirError for a run directory of another config (nothing in it is touched).
    """
    if cfg.rl.iterations < 1:
        raise ConfigError("rl.iterations: expected >= 1 for malt-jax rl (0 = not an RL run), got 0")
    with lock_run_dir(cfg.run_dir):
        return _run_rl(cfg, progress, model, task, evaluate, systems, stop_after, command)


def _run_rl(
    cfg: RunConfig,
    progress: bool,
    model: Model | None,
    task: Task | None,
    evaluate: bool,
    systems: Sequence[System] | None,
    stop_after: int | None,
    command: str,
) -> dict:
    from tqdm.auto import tqdm

    from malt_jax.model.lora import lora_scale
    from malt_jax.parallel.sharding import param_shardings
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.stepper import state_shardings, step_base

    t0 = time.perf_counter()
    rl = cfg.rl
    run_dir = prepare_run_dir(cfg, stamp=False)  # another config's directory: refused, untouched
    task = task or make_task(cfg)
    split = split_questions(cfg, task)
    val: list[Example] = []
    if rl.eval_every:  # too few validation questions: refused before any write
        val = validation_questions(cfg, task, *split, rl.eval_questions, field="rl.eval_questions")
        _check_recorded_validation(run_dir, len(val))
    start_adapters, reference = initial_adapters(cfg)  # a bad rl.sft_run: refused before any write
    stamp_run_dir(cfg, run_dir)
    train, evals = load_splits(cfg, task, run_dir, split)
    if val:
        load_validation(cfg, run_dir, val)
    model, mesh = sharded_model(cfg, model)
    pad_id = model.tokenizer.pad_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad (or eos) token to pad training rows with")
    out = run_dir / "rl"
    out.mkdir(parents=True, exist_ok=True)
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    spec = rl_stage.rl_spec(cfg, codec)
    scale = lora_scale(cfg.lora)
    trained = [r for r in ROLES if r in rl.roles]
    optimizer = make_optimizer(cfg.train, rl.iterations * rl.updates_per_iteration, rl.learning_rate)

    def place(tree: Any) -> Any:
        """A state or adapter committed where the steps and the sampler read it (one compiled
        sampler serves trained and untrained roles alike)."""
        if mesh is None:
            return jax.device_put(tree, jax.devices()[0])
        if isinstance(tree, TrainState):
            return put(tree, state_shardings(tree, mesh))
        return put(tree, param_shardings(tree, mesh, lora=True))

    # the training passes read per-layer copies of the adapted layers on one CPU device (as the
    # train stage's steps do); sampling keeps the stacked weights
    base = model.params if mesh is not None else step_base(model.params, cfg.model, cfg.lora, cfg.train)
    start_adapters = {r: place(a) for r, a in start_adapters.items()}
    reference = {r: None if a is None else place(a) for r, a in reference.items()}
    states = {r: place(TrainState.create(start_adapters[r], optimizer)) for r in trained}
    key = np.asarray(jax.random.key_data(jax.random.key(rl.seed)))  # the run's RNG, checkpointed
    start, num_tokens = 0, 0
    identity = dataclasses.replace(cfg, run_dir=".").hash()  # a moved or copied run resumes
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=2)
    try:
        if ckpt.latest_step() is not None:
            meta = ckpt.metadata()
            if meta.get("config_hash") != identity or meta.get("roles") != trained:
                raise CheckpointError(
                    f"{ckpt.directory}: written by another config (hash {meta.get('config_hash')}, roles "
                    f"{meta.get('roles')}; this run is {identity}, {trained}); use a fresh run_dir"
                )
            restored, meta = ckpt.restore({"states": states, "rng": key})
            states, key = restored["states"], np.asarray(restored["rng"], np.uint32)
            start, num_tokens = int(meta["iteration"]), int(meta["num_tokens"])
            log.info("rl: resuming after iteration %d (%d tokens sampled) from %s", start, num_tokens, ckpt.directory)
        metrics_path = out / "metrics.jsonl"
        rows = [r for r in read_jsonl(metrics_path) if r["iteration"] < start] if metrics_path.exists() else []
        write_rows(metrics_path, rows)  # drops rows of iterations after the checkpoint (redone)
        heldout_path, heldout_dir = out / HELDOUT, out / "heldout"
        # held-out rows up to the checkpoint are kept; those after it are dropped (redone)
        heldout = [r for r in read_jsonl(heldout_path) if r["iteration"] <= start] if heldout_path.exists() else []
        if heldout_path.exists() or rl.eval_every:
            write_rows(heldout_path, heldout)
        for d in heldout_dir.iterdir() if heldout_dir.is_dir() else ():
            if d.is_dir() and not (d.name.isdigit() and int(d.name) <= start):
                shutil.rmtree(d, ignore_errors=True)  # the raw rows of a dropped point: sampled again

        def budget_spent() -> bool:
            return bool(rl.token_budget) and num_tokens >= rl.token_budget

        def current() -> dict[str, Any]:
            return {r: states[r].adapter if r in states else start_adapters[r] for r in ROLES}

        def evaluate_point(iteration: int) -> None:
            """The adapters after ``iteration`` iterations on the validation questions, when that
            is a held-out point not yet evaluated (the run's key is not read: training unchanged)."""
            last = iteration >= rl.iterations or budget_spent()
            done = any(r["iteration"] == iteration for r in heldout)
            if done or not is_heldout_point(iteration, rl.eval_every, last):
                return
            t_ev = time.perf_counter()
            ev = run_eval(
                cfg,
                model,
                task,
                val,
                run_dir,
                current(),
                heldout_systems(cfg),
                progress=False,
                mesh=mesh,
                out=heldout_dir / str(iteration),
            )
            new = heldout_rows(ev, iteration, num_tokens)
            heldout.extend(new)
            write_rows(heldout_path, heldout)
            _mirror_heldout(run_dir, heldout)
            log.info(
                "rl: held-out after iteration %d (%d tokens): %s (%.1f s)",
                iteration,
                num_tokens,
                ", ".join(f"{r['system']} {r['accuracy']:.4f}" for r in new),
                time.perf_counter() - t_ev,
            )

        def save(iteration: int) -> None:
            ckpt.save(
                iteration,
                {"states": states, "rng": key},
                {"iteration": iteration, "num_tokens": num_tokens, "config_hash": identity, "roles": trained},
            )

        bar = tqdm(total=rl.iterations, initial=start, desc="rl", unit="it", disable=not progress, dynamic_ncols=True)
        it = start
        try:
            evaluate_point(it)  # the start adapters, or a point whose checkpoint came before its evaluation
            while it < rl.iterations and not budget_spent():
                t_it = time.perf_counter()
                key, seed = rl_stage.iteration_seed(key)
                questions = [
                    train[i] for i in rl_stage.iteration_questions(len(train), rl.questions_per_iteration, rl.seed, it)
                ]
                adapters = tuple(states[r].adapter if r in states else start_adapters[r] for r in ROLES)
                arrays = rl_stage.sample_iteration(
                    model,
                    codec,
                    task,
                    questions,
                    spec,
                    seed=seed,
                    batch_size=min(cfg.tree.questions_per_batch, len(questions)),
                    adapters=adapters,  # type: ignore[arg-type]
                    lora_scale=scale,
                    mesh=mesh,
                )
                n_tok = rl_stage.sampled_tokens(arrays)
                num_tokens += n_tok
                adv = rl_stage.iteration_advantages(arrays["rewards"], cfg)
                adv_metrics = {k: float(v) for k, v in jax.device_get(adv.metrics).items()}
                new_rows = []
                for r in trained:
                    name = role_name(r)
                    states[r], history = rl_stage.update_role(
                        base,
                        states[r],
                        rl_stage.role_rows(arrays, r, codec.seps, codec.end_of_turn),
                        np.asarray(adv.advantages(r)),
                        reference[r],
                        cfg,
                        optimizer.update,
                        scale,
                        pad_id,
                        cfg.model,
                        role=r,
                        mesh=mesh,
                    )
                    for h in history:
                        u = h.pop("update")
                        new_rows.append(
                            {
                                "iteration": it,
                                "role": r,
                                "update": u,
                                "step": it * rl.updates_per_iteration + u + 1,  # the role's optimizer updates
                                **h,
                                **{k: adv_metrics[f"{name}/{k}"] for k in _ADV_METRICS},
                                "chain_accuracy": float(arrays["rewards"].mean()),
                                "iteration_tokens": n_tok,
                                "num_tokens": num_tokens,
                                "iteration_s": round(time.perf_counter() - t_it, 2),
                            }
                        )
                rows += new_rows
                write_rows(metrics_path, rows)
                it += 1
                if it % rl.checkpoint_every == 0 or it == rl.iterations or budget_spent():
                    save(it)
                    _mirror(run_dir, rows)
                evaluate_point(it)
                bar.update(1)
                bar.set_postfix(reward=f"{arrays['rewards'].mean():.3f}", tokens=num_tokens)
                if stop_after is not None and it >= stop_after and it < rl.iterations and not budget_spent():
                    return {"run_dir": str(run_dir), "stopped_at": it, "num_tokens": num_tokens}
        finally:
            bar.close()
    finally:
        ckpt.close()

    final = current()
    (run_dir / "adapters").mkdir(exist_ok=True)
    for r in ROLES:
        save_adapter(final[r], run_dir / "adapters" / f"{r}.safetensors")
    _mirror(run_dir, rows)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "config_hash": cfg.hash(),
        "command": command,
        "iterations": it,
        "stopped_by": "token_budget" if budget_spent() and it < rl.iterations else "iterations",
        "num_tokens": num_tokens,
        "roles": trained,
        "agents": rl.agents,
        "metrics": str(out / "metrics.jsonl"),
        "heldout": heldout,
        "last": {r: next((row for row in reversed(rows) if row["role"] == r), None) for r in trained},
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    if evaluate:
        from malt_jax.evaluation.report import format_table

        ev = run_eval(cfg, model, task, evals, run_dir, final, systems=systems, progress=progress, mesh=mesh)
        summary["eval"] = {name: res.accuracy for name, res in ev["results"].items()}
        summary["table"] = format_table(ev["results"])
        summary["primary"] = next((c for c in ev["comparisons"] if c["primary"]), None)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "report.md", rl_report(summary, heldout))
    if tblog.available():
        summary["tensorboard"] = tblog.command(run_dir)
    return summary


def _mirror(run_dir: Path, rows: list[dict]) -> None:
    """The metrics rows as TensorBoard scalars ``train/<name>`` per role (``tensorboard/<role>/rl``)."""
    if not is_lead():
        return
    skip = {"iteration", "update", "role"}
    for r in ROLES:
        history = [
            {"stage": "rl", **{k: v for k, v in row.items() if k not in skip}} for row in rows if row["role"] == r
        ]
        if history and not tblog.write_training(run_dir, r, history, []):
            return


def _mirror_heldout(run_dir: Path, rows: list[dict]) -> None:
    """The held-out rows as TensorBoard scalars ``heldout/<system>`` at step = the tokens sampled
    by then (``tensorboard/rl_heldout``)."""
    if is_lead():
        scalars = [(f"heldout/{tblog.tag(r['system'])}", r["accuracy"], r["num_tokens"]) for r in rows]
        tblog.write_scalars(run_dir, "rl_heldout", scalars)
