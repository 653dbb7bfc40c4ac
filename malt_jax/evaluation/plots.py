"""The run report's PNG figures (matplotlib's Agg canvas, no pyplot): accuracy per system with
Wilson intervals, positive rate per role, and per-epoch training curves of every role."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malt_jax.evaluation.fmt import fmt_float, fmt_int, is_nan
from malt_jax.evaluation.stats import SystemResult
from malt_jax.roles import NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "plot_accuracy", "plot_positive_rate", "plot_training_curves", "stage_records", "selected"]


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure of width x height inches at 100 dpi on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_rate_plot(fig, ax, ylabel: str, title: str, path: Path) -> None:
    """Common finish of the rate plots: [0, 1] y axis, labels, grid, PNG."""
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_accuracy(results: Mapping[str, SystemResult], path: Path) -> None:
    names = list(results)
    accs, err_lo, err_hi = [], [], []
    for r in results.values():
        acc = 0.0 if r.n == 0 else r.accuracy
        lo, hi = r.ci
        accs.append(acc)
        err_lo.append(max(0.0, acc - lo))
        err_hi.append(max(0.0, hi - acc))
    fig = new_figure(max(4.0, 1.2 * len(names) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(names)))
    ax.bar(x, accs, yerr=[err_lo, err_hi], capsize=5, color="tab:blue", alpha=0.8, error_kw={"elinewidth": 1.2})
    for xi, acc, r in zip(x, accs, results.values()):
        ax.text(
            xi + 0.06, min(acc + 0.01, 0.96), "n/a" if r.n == 0 else f"{acc:.3f}", ha="left", va="bottom", fontsize=8
        )  # beside the error bar, not on it
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    _save_rate_plot(fig, ax, "accuracy", "Accuracy per system (95% Wilson CI)", path)


def plot_positive_rate(by_role: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    roles = [r for r in NAMES if r in by_role]
    rates = [by_role[r].get("positive_rate") for r in roles]
    heights = [0.0 if v is None or is_nan(v) else float(v) for v in rates]
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(roles)))
    ax.bar(x, heights, color=["tab:green", "tab:orange", "tab:purple"][: len(roles)], alpha=0.85)
    for xi, role, rate, h in zip(x, roles, rates, heights):
        stats = by_role[role]
        label = fmt_float(rate, 3)
        extra = []
        if "sft" in stats:
            extra.append(f"SFT {fmt_int(stats['sft'])}")
        if "dpo_pairs" in stats:
            extra.append(f"DPO {fmt_int(stats['dpo_pairs'])}")
        if extra:
            label += "\n" + ", ".join(extra)
        ax.text(xi, min(h + 0.02, 0.85), label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(roles)
    _save_rate_plot(fig, ax, "positive rate", "Positive rate per role (expansion tree)", path)


def stage_records(records: Sequence[Mapping[str, Any]], stage: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in records if r.get("stage") == stage), key=lambda r: int(r.get("epoch", 0)))


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is not None and not is_nan(v):
            xs.append(int(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def selected(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in records if r.get("best")), None)


def plot_training_curves(epochs_by_role: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """PNG of the per-epoch training records (``train_role(...).epochs``) of every role.

    One column per role; top row SFT train loss and held-out loss, bottom row DPO held-out loss
    with held-out ``rewards/accuracies`` on a second [0, 1] axis; x = epoch (0 = before training);
    the selected epoch (``best``) is marked with a dashed vertical line and a ring.
    """
    from matplotlib.ticker import MaxNLocator

    roles = list(epochs_by_role)
    fig = new_figure(max(4.0, 4.0 * len(roles)), 6.5)
    for col, role in enumerate(roles):
        records = list(epochs_by_role[role])
        for row, stage in enumerate(("sft", "dpo")):
            ax = fig.add_subplot(2, max(len(roles), 1), row * max(len(roles), 1) + col + 1)
            recs = stage_records(records, stage)
            ax.set_title(f"{role}: {stage.upper()}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if not recs:
                ax.text(
                    0.5,
                    0.5,
                    "not trained:\nkeeps the base model" if not records else f"no {stage.upper()} stage",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=9,
                )
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            best = selected(recs)
            handles = []
            if stage == "sft":
                for key, label, style in (
                    ("train/loss", "train loss", "o-"),
                    ("heldout/loss", "held-out (selection) loss", "s-"),
                ):
                    xs, ys = series(recs, key)
                    if xs:
                        handles += ax.plot(xs, ys, style, label=label, markersize=4)
                ax.set_ylabel("cross-entropy")
            else:
                xs, ys = series(recs, "heldout/loss")
                if xs:
                    handles += ax.plot(
                        xs, ys, "s-", color="tab:red", label="held-out (selection) DPO loss", markersize=4
                    )
                ax.set_ylabel("DPO loss")
                xs, ys = series(recs, "heldout/rewards/accuracies")
                if xs:
                    ax2 = ax.twinx()
                    handles += ax2.plot(
                        xs, ys, "^--", color="tab:green", label="held-out (selection) reward acc.", markersize=4
                    )
                    ax2.set_ylim(0.0, 1.05)
                    ax2.set_ylabel("reward accuracy")
            if best is not None:
                e = int(best["epoch"])
                ax.axvline(e, color="gray", linestyle="--", linewidth=1)
                y = best.get("heldout/loss")
                if y is not None and not is_nan(y):
                    ax.plot([e], [float(y)], "o", markersize=10, markerfacecolor="none", color="black")
                handles.append(ax.plot([], [], "--", color="gray", label=f"selected: epoch {e}")[0])
            locator = ax.xaxis.get_major_locator()
            if isinstance(locator, MaxNLocator):  # the default AutoLocator
                locator.set_params(integer=True)
            if handles:
                ax.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Training curves per role (x: epoch; 0 = before training)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
