"""Online multi-agent GRPO with a joint outcome reward (``malt-jax rl``, :func:`run_rl`).

Every iteration samples G -> V -> R trees on-policy with the current role adapters for
``rl.questions_per_iteration`` training questions, rewards the leaves with the task's grader,
credits each role group-relatively among its siblings (``credit.advantages``) and updates each
trained role's LoRA adapter with the clipped policy-gradient loss and a k3 KL to the reference
(``training.pg_loss``); the pieces are :mod:`malt_jax.stages.rl`. Writes, in the run directory::

    config.yaml splits.json                         as every run
    rl/metrics.jsonl                                one row per role and update (TRL / Tunix names)
    rl/checkpoints/<iteration>/                     orbax: adapters, optimizer states, RNG key
    rl/summary.json                                 written when the run ends
    adapters/{G,V,R}.safetensors                    the final adapters (the train stage's layout)
    tensorboard/<role>/rl                           the metrics as train/<name> (tensorboardX)
    eval/<system>.jsonl                             with evaluation: the trained chain ("malt" ...)

``rl.agents: single`` trains the single-agent GRPO baseline instead: each iteration samples G's
``tree.n`` answers per question (depth-1 trees), rewards each with the task's grade of that answer
and updates G alone (advantages over a question's answers); V's and R's adapters stay their start
adapters, and evaluation runs G's trained adapter alone ("single-trained", +MV@k) against the
untrained single model (``stages.eval.default_systems`` with ``agents="single"``).

A rerun resumes from the latest checkpoint (every ``rl.checkpoint_every`` iterations and at the
end): the iteration's questions and sampling seed are functions of the iteration and of the
checkpointed key, so an interrupted run ends with the adapters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from malt_jax.config import ConfigError, RunConfig, run_config_of, to_dict
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import is_lead, put
from malt_jax.roles import ROLES, role_name
from malt_jax.runtime import tblog
from malt_jax.runtime.checkpoint import Checkpointer, CheckpointError
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages import rl as rl_stage
from malt_jax.stages.eval import System, run_eval
from malt_jax.stages.rundir import (
    load_adapter,
    load_splits,
    lock_run_dir,
    prepare_run_dir,
    read_jsonl,
    save_adapter,
    split_questions,
    stamp_run_dir,
    write_atomic,
    write_rows,
)
from malt_jax.tasks import Task
from malt_jax.training.steps import TrainState
from malt_jax.workflows.pipeline import make_task, sharded_model

log = logging.getLogger(__name__)

__all__ = ["run_rl", "initial_adapters", "METRIC_KEYS"]

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
    start_adapters, reference = initial_adapters(cfg)  # a bad rl.sft_run: refused before any write
    stamp_run_dir(cfg, run_dir)
    train, evals = load_splits(cfg, task, run_dir, split)
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

        def budget_spent() -> bool:
            return bool(rl.token_budget) and num_tokens >= rl.token_budget

        def save(iteration: int) -> None:
            ckpt.save(
                iteration,
                {"states": states, "rng": key},
                {"iteration": iteration, "num_tokens": num_tokens, "config_hash": identity, "roles": trained},
            )

        bar = tqdm(total=rl.iterations, initial=start, desc="rl", unit="it", disable=not progress, dynamic_ncols=True)
        it = start
        try:
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
                bar.update(1)
                bar.set_postfix(reward=f"{arrays['rewards'].mean():.3f}", tokens=num_tokens)
                if stop_after is not None and it >= stop_after and it < rl.iterations and not budget_spent():
                    return {"run_dir": str(run_dir), "stopped_at": it, "num_tokens": num_tokens}
        finally:
            bar.close()
    finally:
        ckpt.close()

    final = {r: states[r].adapter if r in states else start_adapters[r] for r in ROLES}
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
