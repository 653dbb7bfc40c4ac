"""TensorBoard event files of a run (optional: ``pip install 'malt-jax[tensorboard]'``, i.e.
tensorboardX). The run directory's JSONL files stay the record; this mirrors them under TRL's
metric names so the usual dashboards read them:

    <run>/tensorboard/<role>/<stage>   train/loss, train/learning_rate, train/grad_norm,
                                       train/mean_token_accuracy (SFT), train/rewards/{chosen,
                                       rejected,accuracies,margins}, train/logps/{chosen,rejected}
                                       (DPO) per optimizer step; eval/loss, eval/mean_token_accuracy,
                                       eval/rewards/{accuracies,margins,chosen,rejected} per epoch
                                       (the held-out slice)
    <run>/tensorboard/eval             eval/accuracy/<system> (malt+MV@3 -> malt_MV_3),
                                       eval/verifier/<chain>/balanced_accuracy
    <run>/tensorboard/rl_heldout       heldout/<system>: malt-jax rl's held-out accuracy at step =
                                       the tokens sampled by then (rl.eval_every)

    tensorboard --logdir <run>/tensorboard
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["available", "tag", "trl_name", "write_training", "write_eval", "write_scalars", "command"]

_RENAME = {"accuracy": "mean_token_accuracy"}
_SKIP = {"stage", "step", "epoch", "best", "n_tokens", "tokens_per_s"}


def available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


_warned = False


def _writer(logdir: Path) -> Any:
    global _warned
    if not available():
        if not _warned:
            log.info("TensorBoard event files off (pip install 'malt-jax[tensorboard]'); the JSONL records are kept")
            _warned = True
        return None
    from tensorboardX import SummaryWriter

    for old in Path(logdir).glob("events.out.tfevents.*"):  # a mirror: rewritten, never appended twice
        old.unlink()
    return SummaryWriter(str(logdir), flush_secs=1)


def tag(name: str) -> str:
    """A system name as a TensorBoard tag (``malt+MV@3`` -> ``malt_MV_3``)."""
    return re.sub(r"[^\w.\-/]", "_", name)


def trl_name(key: str, split: str = "train") -> str:
    """A history / epoch key as TRL logs it: ``loss`` -> ``train/loss``, ``heldout/loss`` ->
    ``eval/loss``, ``accuracy`` -> ``train/mean_token_accuracy``."""
    if key.startswith("heldout/"):
        split, key = "eval", key.removeprefix("heldout/")
    elif key.startswith("train/"):
        key = key.removeprefix("train/")
    return f"{split}/{_RENAME.get(key, key)}"


def _numbers(row: dict) -> Iterable[tuple[str, float]]:
    for k, v in row.items():
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, float(v)


def write_training(run_dir: Path, role: str, history: list[dict], epochs: list[dict]) -> bool:
    """One role's per-step history and per-epoch held-out metrics; False if TensorBoard is off."""
    for stage in sorted({h["stage"] for h in history} | {e["stage"] for e in epochs}):
        w = _writer(Path(run_dir) / "tensorboard" / role / stage)
        if w is None:
            return False
        for h in (h for h in history if h["stage"] == stage):
            for k, v in _numbers(h):
                w.add_scalar(trl_name(k), v, int(h["step"]))
        for e in (e for e in epochs if e["stage"] == stage):
            for k, v in _numbers(e):
                if k.startswith("heldout/"):
                    w.add_scalar(trl_name(k), v, int(e["step"]))
        w.close()
    return True


def write_eval(run_dir: Path, systems: dict[str, dict], verifier: dict[str, dict], step: int = 0) -> bool:
    """Evaluation accuracies (``{name: {"accuracy": ...}}``) and verifier balanced accuracies."""
    w = _writer(Path(run_dir) / "tensorboard" / "eval")
    if w is None:
        return False
    for name, s in systems.items():
        w.add_scalar(f"eval/accuracy/{tag(name)}", float(s["accuracy"]), step)
    for name, c in verifier.items():
        if c.get("balanced_accuracy") is not None:
            w.add_scalar(f"eval/verifier/{tag(name)}/balanced_accuracy", float(c["balanced_accuracy"]), step)
    w.close()
    return True


def write_scalars(run_dir: Path, name: str, scalars: Iterable[tuple[str, float, int]]) -> bool:
    """Scalars ``(tag, value, step)`` into ``<run>/tensorboard/<name>`` (rewritten); False if
    TensorBoard is off."""
    w = _writer(Path(run_dir) / "tensorboard" / name)
    if w is None:
        return False
    for t, value, step in scalars:
        w.add_scalar(t, float(value), int(step))
    w.close()
    return True


def command(run_dir: Path) -> str:
    return f"tensorboard --logdir {Path(run_dir) / 'tensorboard'}"
