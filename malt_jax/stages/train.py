"""Stage 3, training: one LoRA adapter per role on the frozen base (SFT, then DPO).

    <run>/adapters/{G,V,R}.safetensors        adapter after DPO (written last: marks the role done)
    <run>/adapters/{G,V,R}_sft.safetensors    adapter after SFT only
    <run>/adapters/training.json, {G,V,R}_{history,epochs}.jsonl, {G,V,R}_ckpt/ (orbax checkpoints)

The training loop itself is :func:`malt_jax.training.role.train_role`; this stage holds out questions to
choose epochs on, applies the configured caps and writes the role's files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.config import RunConfig
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import is_lead
from malt_jax.roles import ROLE_NAMES
from malt_jax.runtime import tblog
from malt_jax.stages.rundir import load_adapter, load_datasets, save_adapter, training_counts, write_atomic, write_rows

log = logging.getLogger(__name__)

__all__ = ["heldout_questions", "report_questions", "run_train"]


def _subsample(rows: list, cap: int, seed: int) -> list:
    """A seeded random subset of at most ``cap`` rows (in their original order); cap 0 = all."""
    if not cap or len(rows) <= cap:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), cap, replace=False))
    return [rows[i] for i in keep]


def heldout_questions(n_questions: int, fraction: float, seed: int) -> set[int]:
    """The training questions whose examples are held out to choose epochs (about ``fraction``
    of them, at least one when ``fraction > 0``; seeded, the same for every role)."""
    if fraction <= 0 or n_questions < 2:
        return set()
    k = min(n_questions - 1, max(1, round(fraction * n_questions)))
    return set(np.random.default_rng([seed, 0x4E1D]).choice(n_questions, k, replace=False).tolist())


def report_questions(held: set[int], fraction: float, seed: int) -> set[int]:
    """The held-out questions whose examples only report held-out metrics and never choose an
    epoch (about ``fraction`` of ``held``, at least one when ``fraction > 0``, always leaving at
    least one to choose epochs; none when ``held`` has fewer than two; seeded, the same for every
    role). The held-out metrics of the selected epoch on the *other* questions, which chose it,
    are optimistic; these are not."""
    if fraction <= 0 or len(held) < 2:
        return set()
    k = min(len(held) - 1, max(1, round(fraction * len(held))))
    pool = sorted(held)
    return {pool[i] for i in np.random.default_rng([seed, 0x4E1D, 1]).choice(len(pool), k, replace=False).tolist()}


def _split(examples: list, questions: list[int], held: set[int]) -> tuple[list, list]:
    return (
        [e for e, q in zip(examples, questions) if q not in held],
        [e for e, q in zip(examples, questions) if q in held],
    )


def run_train(
    cfg: RunConfig,
    model: Model,
    run_dir: Path,
    mesh=None,
    progress: bool = True,
    roles: Sequence[str] | None = None,
    *,
    init: Path | None = None,
) -> dict[str, Params]:
    """Stage 3: SFT for every role, then DPO for V and R (and G if ``train.generator_dpo``).

    ``roles``: the roles to train, default the run's (``TreeConfig.roles``: G and R only without
    a critique, ``tree.critique: false``, whose credit stage gives V no data; V gets no adapter).

    ``init``: a directory holding ``{G,V,R}.safetensors`` (e.g. the ``adapters`` directory of an
    earlier round of iterative MALT) that each role's training starts from, checked against the
    run's model and ``lora`` config; default fresh adapters (the base model).

    The examples of a seeded ``train.heldout_fraction`` of the training questions are held out
    (by question, so no prompt is shared) to choose each stage's epochs; ``train.max_sft_examples``
    / ``max_dpo_pairs`` then cap the training part. With ``train.heldout_report_fraction`` a
    seeded part of those held-out questions (:func:`report_questions`) is kept apart from epoch
    selection and only reports the held-out metrics at the start and at the selected epoch
    (``report/...`` in the epoch records). The counts before and after are written to
    ``adapters/training.json`` (and the report): ``heldout`` = the epoch-selection set,
    ``report`` = the report-only set (``heldout_use`` says so). A role without any example keeps
    the base model.
    """
    from malt_jax.training.role import train_role

    out = run_dir / "adapters"
    out.mkdir(parents=True, exist_ok=True)
    n_questions = int(json.loads((run_dir / "credit" / "summary.json").read_text())["questions"])
    held = heldout_questions(n_questions, cfg.train.heldout_fraction, cfg.train.seed)
    report = report_questions(held, cfg.train.heldout_report_fraction, cfg.train.seed)
    select = held - report
    counts = training_counts(run_dir)
    adapters = {}
    for role in cfg.tree.roles if roles is None else roles:
        final = out / f"{role}.safetensors"
        if final.exists():
            adapters[role] = load_adapter(final)
            continue
        sft, dpo, sft_q, dpo_q = load_datasets(run_dir, role, with_questions=True)
        if role == "G" and not cfg.train.generator_dpo:
            dpo, dpo_q = [], []
        (sft_train, sft_ho), (dpo_train, dpo_ho) = _split(sft, sft_q, held), _split(dpo, dpo_q, held)
        sft_held, sft_rep = _split(sft_ho, [q for q in sft_q if q in held], report)
        dpo_held, dpo_rep = _split(dpo_ho, [q for q in dpo_q if q in held], report)
        c: dict[str, Any] = {
            "heldout_questions": len(select),
            "report_questions": len(report),
            # "heldout" examples choose the epochs (their figures at the selected epoch are
            # optimistic); "report" examples never do
            "heldout_use": "epoch selection",
            "sft": {
                "examples": len(sft),
                "heldout": len(sft_held),
                "report": len(sft_rep),
                "train": len(sft_train),
            },
            "dpo": {"pairs": len(dpo), "heldout": len(dpo_held), "report": len(dpo_rep), "train": len(dpo_train)},
        }
        sft_train = _subsample(sft_train, cfg.train.max_sft_examples, cfg.train.seed)
        dpo_train = _subsample(dpo_train, cfg.train.max_dpo_pairs, cfg.train.seed)
        c["sft"]["train_after_cap"], c["dpo"]["train_after_cap"] = len(sft_train), len(dpo_train)
        for kind, cap in (("sft", cfg.train.max_sft_examples), ("dpo", cfg.train.max_dpo_pairs)):
            if c[kind]["train_after_cap"] < c[kind]["train"]:
                log.warning(
                    "%s: train.max_%s caps %d %s training examples to %d",
                    role,
                    "sft_examples" if kind == "sft" else "dpo_pairs",
                    c[kind]["train"],
                    kind,
                    cap,
                )
        pad_id = model.tokenizer.pad_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad (or eos) token to pad training rows with")
        start = None if init is None else load_adapter(Path(init) / f"{role}.safetensors", cfg)
        result = train_role(
            model.params,
            model.cfg,
            cfg.lora,
            cfg.train,
            sft_train,
            dpo_train,
            ROLE_NAMES[role],
            out / f"{role}_ckpt",
            mesh=mesh,
            progress=progress,
            pad_id=pad_id,
            sft_heldout=sft_held,
            dpo_heldout=dpo_held,
            sft_report=sft_rep,
            dpo_report=dpo_rep,
            init=start,
        )
        c["trained"] = result.trained
        write_rows(out / f"{role}_history.jsonl", result.history)
        write_rows(out / f"{role}_epochs.jsonl", result.epochs)
        if is_lead():  # event files and plots are not atomic: one writer
            tblog.write_training(run_dir, role, result.history, result.epochs)
        save_adapter(result.sft_adapter, out / f"{role}_sft.safetensors")
        counts[role] = c
        write_atomic(out / "training.json", json.dumps(counts, indent=2))
        save_adapter(result.adapter, final)  # last: its presence marks the role as finished
        adapters[role] = result.adapter
    return adapters
