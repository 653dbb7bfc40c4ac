"""LoRA training of one MALT role (:func:`train_role`): SFT on positive trajectories, then DPO on
preference pairs, with epoch selection on held-out examples and exact resume from checkpoints.

The parts live in modules of their own, whose public names are re-exported here: the optimizer
(``optim.py``), the pure update steps (``steps.py``), the compiled and sharded step with its
NaN/Inf guard (``stepper.py``), and the gradient-free passes: DPO reference log-probs, held-out
metrics, the frozen layers' hidden states (``scoring.py``).

* DPO reference: ``train.dpo_reference`` is ``"sft"`` (the role's adapter when DPO starts, i.e.
  after SFT, as in the MALT paper) or ``"base"`` (no adapter). Its log-probs are computed once,
  before DPO, and stored in DPO checkpoints, so resuming is exact.
* Epoch selection: ``sft_epochs`` / ``dpo_epochs`` are maxima. Given held-out examples, a stage
  scores them before its first update and after every epoch, keeps its best adapter by held-out
  loss and stops after ``early_stop_patience`` epochs without improvement. The warmup is
  ``warmup_ratio`` of the stage's (maximum) number of updates. Held-out figures of the selected
  epoch are measured on the set that selected it (optimistic); a separate report set
  (``sft_report`` / ``dpo_report``) is scored only at the start and at the selected epoch
  (``report/...``) and never chooses an epoch.
* Checkpoints are written every ``checkpoint_every`` steps and at stage ends; an update with a
  NaN/Inf loss or gradient is not applied and raises :class:`NonFiniteError`, so it never
  reaches a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from malt_jax.config import LoraConfig, ModelConfig, TrainConfig, config_hash, to_dict
from malt_jax.model.llama import Params
from malt_jax.model.lora import init_lora, lora_scale
from malt_jax.parallel.distributed import fetch, put
from malt_jax.parallel.sharding import param_shardings
from malt_jax.runtime.checkpoint import Checkpointer
from malt_jax.training import data as data_lib
from malt_jax.training.data import DPOExample, SFTExample
from malt_jax.training.optim import (
    ScheduleState,
    current_lr,
    make_optimizer,
    optax_schedule,
    scale_by_warmup_cosine,
    warmup_cosine,
    warmup_steps,
)
from malt_jax.training.scoring import HiddenCache, heldout_metrics, reference_logps
from malt_jax.training.stepper import NonFiniteError, Stepper, state_shardings, step_base
from malt_jax.training.steps import TrainState

__all__ = [
    "TrainState",
    "NonFiniteError",
    "make_optimizer",
    "warmup_cosine",
    "warmup_steps",
    "optax_schedule",
    "scale_by_warmup_cosine",
    "current_lr",
    "ScheduleState",
    "reference_logps",
    "HiddenCache",
    "state_shardings",
    "Stepper",
    "train_role",
    "RoleTraining",
    "heldout_metrics",
]

log = logging.getLogger(__name__)


def _n_tokens(examples: Sequence[Any], max_len: int) -> int:
    n = 0
    for ex in examples:
        if ex is None:
            continue
        if isinstance(ex, DPOExample):
            n += min(len(ex.prompt) + len(ex.chosen), max_len) + min(len(ex.prompt) + len(ex.rejected), max_len)
        else:
            n += min(len(ex.prompt) + len(ex.completion), max_len)
    return n


@dataclasses.dataclass
class _Stage:
    name: str
    examples: list
    heldout: list
    epochs: int  # the maximum
    learning_rate: float
    report: list = dataclasses.field(default_factory=list)  # scored, never used to choose an epoch

    def steps_per_epoch(self, batch_size: int) -> int:
        return data_lib.num_batches(len(self.examples), batch_size)

    def total(self, batch_size: int) -> int:
        return self.epochs * self.steps_per_epoch(batch_size) if self.examples else 0


@dataclasses.dataclass
class RoleTraining:
    """What :func:`train_role` returns.

    Attributes:
      adapter: the final adapter (the selected DPO adapter, or the selected SFT adapter when no
        DPO stage ran; the fresh adapter, equal to the base model, when nothing was trained).
      sft_adapter: the selected SFT adapter (the initial adapter if no SFT stage ran).
      history: one dict of float metrics per optimizer step (plus ``stage``, ``step`` = the
        stage's update count, ``epoch`` = 0-based epoch of the step, ``tokens_per_s``).
      epochs: one dict per (stage, epoch) in run order, epoch 0 = before the first update:
        ``stage``, ``epoch`` (epochs completed), ``step``, ``learning_rate`` (of the epoch's last
        update), ``train/loss`` (mean over the epoch's steps), held-out ``heldout/loss`` and
        ``heldout/accuracy`` with its unweighted ``heldout/correct_tokens`` / ``heldout/tokens``
        (SFT) or ``heldout/rewards/{accuracies,margins,chosen,rejected}`` with the unweighted
        ``heldout/rewards/accurate_pairs`` / ``heldout/pairs`` (DPO), for DPO also
        ``train/rewards/{accuracies,margins}``; ``None`` where not measured (epoch 0's train
        values, held-out values without a held-out set); ``best`` marks the epoch whose adapter
        the stage returned. The ``heldout/`` values are those of the epoch-selection set (at the
        selected epoch: optimistic). With a report set, the stage's epoch-0 record and its
        selected record also carry the same metrics on it as ``report/...``.
      trained: False when no stage ran (no data): the adapter then equals the base model.
      counts: ``{"sft", "sft_heldout", "sft_report", "dpo", "dpo_heldout", "dpo_report"}``
        example / pair counts (``*_heldout``: the epoch-selection sets).
    """

    adapter: Params
    sft_adapter: Params
    history: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    trained: bool
    counts: dict[str, int]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _better(loss: float | None, best: float | None) -> bool:
    """Strictly better held-out loss (ties keep the earlier epoch; NaN never wins over a number)."""
    if best is None:
        return True
    if loss is None or not math.isfinite(loss):
        return False
    return not math.isfinite(best) or loss < best


@dataclasses.dataclass
class _StageRun:
    """One stage in progress: its compiled step and state, the epoch selection so far (best
    adapter by held-out loss, epochs without improvement) and, for DPO, the reference log-probs."""

    stage: _Stage
    total: int  # updates of the whole stage
    stepper: Stepper
    state: TrainState
    best: Params
    start: Params  # the adapter the stage started from (placed; DPO: the selected SFT adapter)
    step: int = 0  # updates done
    best_epoch: int = 0
    best_loss: float | None = None
    bad: int = 0  # epochs without improvement
    done: bool = False  # stopped early
    ref: np.ndarray | None = None  # [N, 2] reference log-probs of the DPO pairs
    ho_ref: np.ndarray | None = None  # [N, 2] of the held-out pairs

    @property
    def is_dpo(self) -> bool:
        return self.stage.name == "dpo"


class _RoleRun:
    """One :func:`train_role` call: the frozen base, the role's history and epoch records, and its
    checkpoints (``ckpt``, which the caller closes)."""

    def __init__(
        self,
        base: Params,
        cfg: ModelConfig,
        lora_cfg: LoraConfig,
        train_cfg: TrainConfig,
        role: str,
        ckpt: Checkpointer,
        ckpt_dir: str | Path,
        mesh: Mesh | None,
        progress: bool,
        pad_id: int,
        stop_after_steps: int | None,
    ):
        self.cfg, self.lora_cfg, self.train_cfg, self.role, self.mesh = cfg, lora_cfg, train_cfg, role, mesh
        self.ckpt, self.ckpt_dir, self.progress, self.pad_id = ckpt, ckpt_dir, progress, pad_id
        self.stop_after_steps = stop_after_steps
        self.B, self.scale = train_cfg.batch_size, lora_scale(lora_cfg)
        self.patience = int(train_cfg.early_stop_patience)
        if mesh is not None:
            self.base = put(base, param_shardings(base, mesh))
        else:  # steps, reference log-probs and frozen-layer states read per-layer copies on CPU
            self.base = step_base(put(base, jax.devices()[0]), cfg, lora_cfg, train_cfg)
        self.common_meta = {
            "role": role,
            "model_hash": config_hash(cfg, identity_only=False),
            "lora": to_dict(lora_cfg),
        }
        self.history: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.global_step = self.steps_this_call = 0
        self.sft_adapter: Params  # the selected SFT adapter, set by train()

    def train(self, stages: list[_Stage], adapter: Params, trained: bool, counts: dict[str, int]) -> RoleTraining:
        """Runs the stages from the latest checkpoint (or from ``adapter``)."""
        self.sft_adapter = adapter
        resume_stage, resume_step, meta = self.resume_point(stages)
        for si, st in enumerate(stages):
            if si < resume_stage:
                continue
            if st.total(self.B) == 0:
                log.warning(
                    "%s: skipping %s stage (%s)",
                    self.role,
                    st.name,
                    "no examples" if not st.examples else f"{st.name}_epochs = 0",
                )
                continue
            run = self.start_stage(st, adapter)
            if meta is not None and si == resume_stage:
                self.restore(run, meta, resume_step)
            if run.is_dpo and run.ref is None:
                ref_adapter = None if self.train_cfg.dpo_reference == "base" else run.state.adapter
                run.ref = reference_logps(
                    self.base, ref_adapter, st.examples, self.cfg, self.train_cfg, self.scale, self.mesh, self.pad_id
                )
                if st.heldout:
                    run.ho_ref = reference_logps(
                        self.base, ref_adapter, st.heldout, self.cfg, self.train_cfg, self.scale, self.mesh, self.pad_id
                    )
            if not self.train_stage(run):  # interrupted (stop_after_steps)
                return RoleTraining(
                    adapter=run.state.adapter,
                    sft_adapter=self.sft_adapter,
                    history=self.history,
                    epochs=self.epochs,
                    trained=trained,
                    counts=counts,
                )
            if st.heldout:
                log.info(
                    "%s/%s: selected epoch %d of %d run (held-out loss %.4f, on the selection set)",
                    self.role,
                    st.name,
                    run.best_epoch,
                    run.step // st.steps_per_epoch(self.B),
                    run.best_loss,
                )
            if st.report:
                self.score_report(run)
            adapter = run.best
            if st.name == "sft":
                self.sft_adapter = adapter
        return RoleTraining(
            adapter=adapter,
            sft_adapter=self.sft_adapter,
            history=self.history,
            epochs=self.epochs,
            trained=trained,
            counts=counts,
        )

    def resume_point(self, stages: list[_Stage]) -> tuple[int, int, dict | None]:
        """(stage index, updates done in it, checkpoint metadata) of the latest checkpoint, whose
        history and epoch records it loads; ``(0, 0, None)`` without one. Raises ValueError for a
        checkpoint that cannot be resumed exactly."""
        if self.ckpt.latest_step() is None:
            return 0, 0, None
        ckpt_dir, role = self.ckpt_dir, self.role
        meta = self.ckpt.metadata()
        if meta.get("role") != role:
            raise ValueError(f"{ckpt_dir}: checkpoint belongs to role {meta.get('role')!r}, not {role!r}")
        if "epochs" not in meta:
            raise ValueError(
                f"{ckpt_dir}: checkpoint was written by an older malt-jax (no epoch records); "
                "it cannot be resumed. Use a fresh checkpoint directory."
            )
        resume_stage = [s.name for s in stages].index(meta["stage"])
        resume_step = int(meta["stage_step"])
        self.global_step = int(meta["global_step"])
        self.history = list(meta.get("history", []))
        self.epochs = [dict(r) for r in meta["epochs"]]
        st, B = stages[resume_stage], self.B
        if (
            meta["n_examples"] != len(st.examples)
            or meta["stage_total"] != st.total(B)
            or meta.get("n_heldout", 0) != len(st.heldout)
        ):
            raise ValueError(
                f"{ckpt_dir}: the checkpoint's {st.name} stage had {meta['n_examples']} examples / "
                f"{meta.get('n_heldout', 0)} held-out / {meta['stage_total']} steps, now {len(st.examples)} / "
                f"{len(st.heldout)} / {st.total(B)}; it cannot be resumed exactly. Use a fresh checkpoint "
                "directory."
            )
        log.info("%s: resuming %s at step %d/%d from %s", role, st.name, resume_step, st.total(B), ckpt_dir)
        return resume_stage, resume_step, meta

    def start_stage(self, st: _Stage, adapter: Params) -> _StageRun:
        """A fresh stage from ``adapter``: its optimizer (the schedule spans the maximum epochs),
        compiled step and placed state."""
        total = st.total(self.B)
        optimizer = make_optimizer(self.train_cfg, total, st.learning_rate)
        stepper = Stepper(
            st.name, self.cfg, self.lora_cfg, self.train_cfg, optimizer, mesh=self.mesh, role=self.role, donate=False
        )
        _, state = stepper.place({}, TrainState.create(adapter, optimizer))
        return _StageRun(stage=st, total=total, stepper=stepper, state=state, best=state.adapter, start=state.adapter)

    def restore(self, run: _StageRun, meta: dict, resume_step: int) -> None:
        """Loads the stage's state, best adapter and selection counters (for DPO also the selected
        SFT adapter and the reference log-probs) from the checkpoint described by ``meta``."""
        st, state = run.stage, run.state
        target: dict[str, Any] = {"state": state, "best_adapter": state.adapter}
        if run.is_dpo:
            target["sft_adapter"] = state.adapter
            target["ref_logps"] = np.zeros((len(st.examples), 2), np.float32)
            if st.heldout:
                target["heldout_ref_logps"] = np.zeros((len(st.heldout), 2), np.float32)
        sh = None
        if self.mesh is not None:
            st_sh = state_shardings(state, self.mesh)
            sh = {"state": st_sh, "best_adapter": st_sh.adapter}
            if run.is_dpo:
                sh["sft_adapter"] = st_sh.adapter
                sh["ref_logps"] = NamedSharding(self.mesh, P())
                if st.heldout:
                    sh["heldout_ref_logps"] = NamedSharding(self.mesh, P())
        restored, _ = self.ckpt.restore(target, step=self.global_step, shardings=sh)  # checks shapes
        model_hash = self.common_meta["model_hash"]
        if meta.get("model_hash", model_hash) != model_hash:
            raise ValueError(
                f"{self.ckpt_dir}: checkpoint was trained on another model config (hash "
                f"{meta.get('model_hash')}, this model is {model_hash}); use a fresh checkpoint directory"
            )
        run.state, run.best = restored["state"], restored["best_adapter"]
        if run.is_dpo:
            self.sft_adapter = run.start = restored["sft_adapter"]  # where this DPO stage started
            run.ref = fetch(restored["ref_logps"])
            if st.heldout:
                run.ho_ref = fetch(restored["heldout_ref_logps"])
        run.step = resume_step
        run.best_epoch, run.best_loss = int(meta["best_epoch"]), meta["best_loss"]
        run.bad, run.done = int(meta["bad_epochs"]), bool(meta["stage_done"])

    def train_stage(self, run: _StageRun) -> bool:
        """The stage's remaining updates, until its last epoch or an early stop; False when
        ``stop_after_steps`` interrupted it (without saving)."""
        from tqdm.auto import tqdm

        st, B, train_cfg = run.stage, self.B, self.train_cfg
        spe = st.steps_per_epoch(B)
        if run.step == 0:
            self.end_of_epoch(run, 0)
        # The layers below the adapter are frozen and do not depend on it: their output for
        # every training example is computed once per stage instead of at every step.
        cfg, lora_cfg = self.cfg, self.lora_cfg
        first = cfg.n_layers - lora_cfg.top_layers if 0 < lora_cfg.top_layers < cfg.n_layers else 0
        shared = run.is_dpo and train_cfg.dpo_shared_prompt
        frozen = (
            HiddenCache(self.base, st.examples, cfg, train_cfg, first, self.pad_id, shared_prompt=shared)
            if first and run.step < run.total and not run.done
            else None
        )
        bar = tqdm(total=run.total, initial=run.step, desc=f"{self.role}/{st.name}", disable=not self.progress)
        try:
            while run.step < run.total and not run.done:
                epoch, b0 = divmod(run.step, spe)
                for _, idx, batch in data_lib.batches(
                    st.examples,
                    B,
                    train_cfg.max_seq_len,
                    train_cfg.seed,
                    epoch,
                    start=b0,
                    pad_id=self.pad_id,
                    shared_prompt=shared,
                ):
                    if self.stop_after_steps is not None and self.steps_this_call >= self.stop_after_steps:
                        return False
                    m = self.update(run, idx, batch, frozen, epoch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    k = run.step
                    if k % spe == 0:
                        self.end_of_epoch(run, k // spe)
                    if k % max(train_cfg.checkpoint_every, 1) == 0 or k == run.total or run.done:
                        self.save(run)
                    if run.done:
                        break
        finally:
            bar.close()
        return True

    def update(
        self, run: _StageRun, idx: np.ndarray, batch: dict, frozen: HiddenCache | None, epoch: int
    ) -> dict[str, Any]:
        """One optimizer update on the batch of examples ``idx``; returns its history record."""
        st = run.stage
        t0 = time.perf_counter()
        if frozen is not None:
            batch = {**batch, "hidden": frozen.rows(idx, batch["tokens"].shape[1])}
        if run.is_dpo:
            assert run.ref is not None  # computed (or restored) before the stage's first step
            # reference log-probs of this batch's pairs, interleaved like its rows
            r = np.where((idx >= 0)[:, None], run.ref[np.maximum(idx, 0)], 0.0).astype(np.float32)
            run.state, m = run.stepper(self.base, run.state, batch, r.reshape(-1))
        else:
            run.state, m = run.stepper(self.base, run.state, batch)
        dt = max(time.perf_counter() - t0, 1e-9)
        exs = data_lib.gather(st.examples, idx)
        run.step += 1
        self.global_step += 1
        self.steps_this_call += 1
        record: dict[str, Any] = {
            **m,
            "stage": st.name,
            "step": run.step,
            "epoch": epoch,
            "tokens_per_s": _n_tokens(exs, self.train_cfg.max_seq_len) / dt,
        }
        self.history.append(record)
        return record

    def end_of_epoch(self, run: _StageRun, e: int) -> None:
        """Epoch ``e``'s record (held-out metrics of the current adapter), best adapter, patience."""
        st = run.stage
        steps = [h for h in self.history if h["stage"] == st.name and h["epoch"] == e - 1] if e else []
        rec: dict[str, Any] = {
            "stage": st.name,
            "epoch": e,
            "step": run.step,
            "learning_rate": steps[-1]["learning_rate"] if steps else None,
            "train/loss": _mean([h["loss"] for h in steps]),
        }
        names = _metric_names(run.is_dpo)
        if run.is_dpo:
            for n in ("rewards/accuracies", "rewards/margins"):
                rec[f"train/{n}"] = _mean([h[n] for h in steps])
        hm = (
            heldout_metrics(
                st.name,
                self.base,
                run.state.adapter,
                st.heldout,
                self.cfg,
                self.train_cfg,
                self.scale,
                self.mesh,
                self.pad_id,
                ref_logps=run.ho_ref,
            )
            if st.heldout
            else {}
        )
        for n in names:
            rec[f"heldout/{n}"] = hm.get(n)
        if not st.heldout:
            run.best, run.best_epoch = run.state.adapter, e  # all epochs run, the last one is kept
        elif _better(rec["heldout/loss"], run.best_loss):
            run.best, run.best_epoch, run.best_loss, run.bad = run.state.adapter, e, rec["heldout/loss"], 0
        else:
            run.bad += 1
            run.done = self.patience > 0 and run.bad >= self.patience
        self.epochs.append(rec)
        for r in self.epochs:
            if r["stage"] == st.name:
                r["best"] = r["epoch"] == run.best_epoch
        log.info(
            "%s/%s epoch %d: train loss %s, held-out loss %s%s",
            self.role,
            st.name,
            e,
            "n/a" if rec["train/loss"] is None else f"{rec['train/loss']:.4f}",
            "n/a" if rec["heldout/loss"] is None else f"{rec['heldout/loss']:.4f}",
            f" (no improvement for {run.bad} epoch(s), stopping)" if run.done else "",
        )

    def score_report(self, run: _StageRun) -> None:
        """The stage's report set, which never chooses an epoch, scored with the adapter the stage
        started from and with the selected one: ``report/...`` in the stage's epoch-0 record and
        in its selected record (the same one when epoch 0 was selected). For DPO its reference
        log-probs come from the training reference (the adapter DPO started from, or the base)."""
        st, start = run.stage, run.start
        args = (self.cfg, self.train_cfg, self.scale, self.mesh, self.pad_id)
        ref = None
        if run.is_dpo:
            ref = reference_logps(
                self.base, None if self.train_cfg.dpo_reference == "base" else start, st.report, *args
            )
        recs = [r for r in self.epochs if r["stage"] == st.name]
        chosen = next((r for r in recs if r.get("best")), recs[-1])
        for adapter, rec in ((start, recs[0]), (run.best, chosen)):
            hm = heldout_metrics(st.name, self.base, adapter, st.report, *args, ref_logps=ref)
            for n in _metric_names(run.is_dpo):
                rec[f"report/{n}"] = hm.get(n)
        log.info(
            "%s/%s: report set (%d, never used to select): loss %.4f at epoch 0, %.4f at the selected epoch %d",
            self.role,
            st.name,
            len(st.report),
            recs[0]["report/loss"],
            chosen["report/loss"],
            chosen["epoch"],
        )

    def save(self, run: _StageRun) -> None:
        """A checkpoint of everything an exact resume needs."""
        st, k = run.stage, run.step
        e2, b2 = divmod(k, st.steps_per_epoch(self.B))
        tree: dict[str, Any] = {"state": run.state, "best_adapter": run.best}
        if run.is_dpo:
            tree["sft_adapter"] = self.sft_adapter
            tree["ref_logps"] = run.ref
            if st.heldout:
                tree["heldout_ref_logps"] = run.ho_ref
        self.ckpt.save(
            self.global_step,
            tree,
            {
                **self.common_meta,
                "stage": st.name,
                "stage_step": k,
                "stage_total": run.total,
                "epoch": e2,
                "batch_in_epoch": b2,
                "global_step": self.global_step,
                "n_examples": len(st.examples),
                "n_heldout": len(st.heldout),
                "history": self.history,
                "epochs": self.epochs,
                "best_epoch": run.best_epoch,
                "best_loss": run.best_loss,
                "bad_epochs": run.bad,
                "stage_done": run.done or k == run.total,
            },
        )


def _metric_names(dpo: bool) -> tuple[str, ...]:
    """The held-out metrics an epoch record keeps (``heldout/<name>``, ``report/<name>``)."""
    if dpo:
        return (
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accurate_pairs",
            "pairs",
        )
    return ("loss", "accuracy", "correct_tokens", "tokens")


def train_role(
    base: Params,
    cfg: ModelConfig,
    lora_cfg: LoraConfig,
    train_cfg: TrainConfig,
    sft_examples: Sequence[SFTExample] | None,
    dpo_examples: Sequence[DPOExample] | None,
    role: str,
    ckpt_dir: str | Path,
    mesh: Mesh | None = None,
    progress: bool = True,
    *,
    pad_id: int = 0,
    stop_after_steps: int | None = None,
    sft_heldout: Sequence[SFTExample] | None = None,
    dpo_heldout: Sequence[DPOExample] | None = None,
    sft_report: Sequence[SFTExample] | None = None,
    dpo_report: Sequence[DPOExample] | None = None,
    init: Params | None = None,
) -> RoleTraining:
    """Trains one role's adapter: up to ``sft_epochs`` of SFT, then up to ``dpo_epochs`` of DPO.

    ``init``: the adapter training starts from (e.g. an earlier round's, in iterative MALT; its
    shapes must be those of ``lora_cfg``); default a fresh one (LoRA ``b = 0``, i.e. the base
    model, seeded by ``train_cfg.seed`` and the role). It is also what a role without data
    returns, and what epoch 0 (before the first update) of SFT scores.

    Epoch selection: with a held-out set for a stage (``sft_heldout`` / ``dpo_heldout``; split by
    question by the caller, so no prompt is shared with the training examples), the held-out
    set is evaluated without gradients before the first update (epoch 0) and after every epoch
    (:func:`heldout_metrics`); the stage returns the adapter of its best epoch by held-out loss
    (SFT cross-entropy / DPO loss; ties -> the earlier epoch; epoch 0 -> the adapter the stage
    started from) and stops after ``early_stop_patience`` epochs without improvement (0 = run
    every epoch). DPO starts from the selected SFT adapter, and its held-out reference log-probs
    come from the same reference as training. Without a held-out set every epoch runs and the
    last adapter is kept. The learning-rate schedule always spans the maximum epochs.

    The held-out figures of the selected epoch are measured on the set that selected it, so they
    are optimistic. A report set (``sft_report`` / ``dpo_report``, also split by question, disjoint
    from the held-out set) never chooses an epoch: it is scored only when the stage ends, with the
    adapter the stage started from and with the selected one (``report/...`` in the stage's
    epoch-0 and selected records), so those figures are not.

    A stage without data is skipped with a log message; a role with neither SFT examples nor
    DPO pairs is not trained at all: a WARNING says it keeps the base model and the fresh
    adapter (LoRA ``b = 0``, i.e. exactly the base model) is returned with ``trained=False``.

    Checkpoints (``ckpt_dir``) are written every ``checkpoint_every`` steps and at the end of
    each stage; they hold the training state, the stage's best adapter so far, the epoch records
    and the patience counter (and for DPO the selected SFT adapter and the reference log-probs),
    so that a rerun on a directory holding a checkpoint of this role resumes exactly.
    ``stop_after_steps`` stops after that many updates in this call without saving (simulates a
    preemption; for tests).

    Returns:
      :class:`RoleTraining`.
    Raises:
      NonFiniteError on NaN/Inf; ValueError for a checkpoint that cannot be resumed exactly.
    """
    sft, dpo = list(sft_examples or []), list(dpo_examples or [])
    sft_ho, dpo_ho = list(sft_heldout or []), list(dpo_heldout or [])
    sft_rep, dpo_rep = list(sft_report or []), list(dpo_report or [])
    counts = {
        "sft": len(sft),
        "sft_heldout": len(sft_ho),
        "sft_report": len(sft_rep),
        "dpo": len(dpo),
        "dpo_heldout": len(dpo_ho),
        "dpo_report": len(dpo_rep),
    }
    if init is None:
        key = jax.random.fold_in(jax.random.key(train_cfg.seed), zlib.crc32(role.encode()) & 0x7FFFFFFF)
        adapter = init_lora(cfg, lora_cfg, key)  # b = 0: equals the base model
    else:
        adapter = init
    if not sft and not dpo:
        log.warning(
            "role %r: no positive trajectories (0 SFT examples) and no DPO pairs, so there is nothing to "
            "train on: it keeps %s. To train it, make the task easier, use "
            "more training questions, or draw more samples per question (larger tree n/m/l or a higher "
            "temperature).",
            role,
            "the base model (untrained adapter)" if init is None else "the adapter it was to start from",
        )
        return RoleTraining(adapter=adapter, sft_adapter=adapter, history=[], epochs=[], trained=False, counts=counts)
    stages = [
        _Stage("sft", sft, sft_ho, train_cfg.sft_epochs, train_cfg.learning_rate, sft_rep),
        _Stage("dpo", dpo, dpo_ho, train_cfg.dpo_epochs, train_cfg.dpo_learning_rate, dpo_rep),
    ]
    trained = any(st.total(train_cfg.batch_size) > 0 for st in stages)
    ckpt = Checkpointer(ckpt_dir)
    try:
        run = _RoleRun(base, cfg, lora_cfg, train_cfg, role, ckpt, ckpt_dir, mesh, progress, pad_id, stop_after_steps)
        return run.train(stages, adapter, trained, counts)
    finally:
        ckpt.close()
