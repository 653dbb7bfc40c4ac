"""Markdown + PNG report for a MALT run (host-side; matplotlib with the Agg canvas, no pyplot).

:func:`write_report` writes into ``run_dir``:

* ``report.md`` -- title, a meta table (model, task, questions, seeds, config hash, wall times,
  then any other ``meta`` entries), the accuracy table (system | accuracy | 95% Wilson CI | n),
  the paired comparison table (target vs baseline | diff | McNemar p | bootstrap 95% CI |
  bootstrap p) and, when a credit summary is given, a per-role table (positive rate, SFT
  examples, DPO pairs; plus valid nodes / mean value when present);
* ``accuracy.png`` -- one bar per system with asymmetric Wilson 95% error bars (only when there
  is at least one system);
* ``positive_rate.png`` -- positive rate per role of the expansion tree (only when the credit
  summary has a ``<role>/positive_rate`` entry).

A plot that is not produced is removed from ``run_dir`` if an older copy is there, so the
directory never shows a stale figure next to a fresh report.

:func:`format_table` renders the accuracy table as aligned plain text for a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from malt_jax.evaluate import SystemResult

__all__ = ["write_report", "format_table"]

ROLES = ("generator", "verifier", "refiner")
_ROLE_ALIASES = {"generator": "generator", "g": "generator", "verifier": "verifier", "v": "verifier",
                 "refiner": "refiner", "r": "refiner"}
_STAT_ALIASES = {"positive_rate": "positive_rate", "sft": "sft", "sft_examples": "sft",
                 "dpo_pairs": "dpo_pairs", "dpo": "dpo_pairs", "nodes": "nodes",
                 "mean_value": "mean_value"}
# (meta key, label); other meta keys follow in insertion order under their own names.
_META_ROWS = (("model", "Model"), ("task", "Task"), ("n_questions", "Questions"),
              ("seeds", "Seeds"), ("config_hash", "Config hash"), ("wall_times", "Wall time"))

ACCURACY_PNG = "accuracy.png"
POSITIVE_RATE_PNG = "positive_rate.png"


# --------------------------------------------------------------------------- formatting


def _is_nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _fmt_float(x: Any, digits: int = 4, sign: bool = False) -> str:
    if x is None or _is_nan(x):
        return "n/a"
    return f"{float(x):{'+' if sign else ''}.{digits}f}"


def _fmt_ci(lo: Any, hi: Any) -> str:
    if lo is None or hi is None or _is_nan(lo) or _is_nan(hi):
        return "n/a"
    return f"[{float(lo):.4f}, {float(hi):.4f}]"


def _fmt_p(p: Any) -> str:
    if p is None or _is_nan(p):
        return "n/a"
    p = float(p)
    return f"{p:.2e}" if 0.0 < p < 1e-4 else f"{p:.4f}"


def _fmt_int(x: Any) -> str:
    if x is None or _is_nan(x):
        return "n/a"
    return str(int(x))


def _fmt_seconds(s: Any) -> str:
    try:
        return f"{float(s):.1f} s"
    except (TypeError, ValueError):
        return str(s)


def _fmt_meta(key: str, value: Any) -> str:
    if key == "wall_times" or key.startswith("wall"):
        if isinstance(value, Mapping):
            return ", ".join(f"{k}: {_fmt_seconds(v)}" for k, v in value.items()) or "n/a"
        return _fmt_seconds(value)
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _accuracy_rows(results: Mapping[str, SystemResult]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        lo, hi = r.ci
        rows.append([name, _fmt_float(r.accuracy), _fmt_ci(lo, hi) if r.n else "n/a", str(r.n)])
    return rows


_ACC_HEADER = ("system", "accuracy", "95% Wilson CI", "n")


def format_table(results: Mapping[str, SystemResult]) -> str:
    """Accuracy table (system | accuracy | 95% Wilson CI | n) as aligned plain text."""
    rows = _accuracy_rows(results)
    table = [list(_ACC_HEADER), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_ACC_HEADER))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), sep, *(line(r) for r in rows)])


# --------------------------------------------------------------------------- credit summary


def _credit_by_role(summary: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Split ``{"generator/sft": 3, "G/dpo_pairs": 1, "threshold": 0.5}`` into per-role stats
    (role names normalised; a full role name wins over its G/V/R alias) and the other entries."""
    by_role: dict[str, dict[str, Any]] = {}
    explicit: set[tuple[str, str]] = set()
    other: dict[str, Any] = {}
    for key, value in summary.items():
        role_part, slash, stat_part = str(key).partition("/")
        role = _ROLE_ALIASES.get(role_part.strip().lower()) if slash else None
        if role is None:
            other[str(key)] = value
            continue
        stat = _STAT_ALIASES.get(stat_part.strip().lower(), stat_part.strip().lower())
        is_full = role_part.strip().lower() == role
        if (role, stat) in explicit and not is_full:
            continue
        if is_full:
            explicit.add((role, stat))
        by_role.setdefault(role, {})[stat] = value
    ordered = {r: by_role[r] for r in ROLES if r in by_role}
    return ordered, other


def _credit_section(summary: Mapping[str, Any]) -> list[str]:
    by_role, other = _credit_by_role(summary)
    lines = ["## Credit assignment (expansion tree)", ""]
    if not by_role:
        lines += ["No per-role credit statistics were recorded.", ""]
    else:
        header = ["role"]
        cols: list[tuple[str, Any]] = []
        if any("nodes" in s for s in by_role.values()):
            cols.append(("nodes", _fmt_int))
        cols.append(("positive_rate", _fmt_float))
        if any("mean_value" in s for s in by_role.values()):
            cols.append(("mean_value", _fmt_float))
        cols += [("sft", _fmt_int), ("dpo_pairs", _fmt_int)]
        names = {"nodes": "valid nodes", "positive_rate": "positive rate",
                 "mean_value": "mean value", "sft": "SFT examples", "dpo_pairs": "DPO pairs"}
        header += [names[c] for c, _ in cols]
        rows = [[role] + [fmt(stats.get(c)) for c, fmt in cols] for role, stats in by_role.items()]
        lines += _md_table(header, rows) + [""]
        if any("positive_rate" in s for s in by_role.values()):
            lines += [f"![positive rate per role]({POSITIVE_RATE_PNG})", ""]
    if other:
        lines += [", ".join(f"{k}: {_fmt_meta(k, v)}" for k, v in other.items()), ""]
    return lines


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
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


def _plot_accuracy(results: Mapping[str, SystemResult], path: Path) -> None:
    names = list(results)
    accs, err_lo, err_hi = [], [], []
    for r in results.values():
        acc = 0.0 if r.n == 0 else r.accuracy
        lo, hi = r.ci
        accs.append(acc)
        err_lo.append(max(0.0, acc - lo))
        err_hi.append(max(0.0, hi - acc))
    fig = _new_figure(max(4.0, 1.2 * len(names) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(names)))
    ax.bar(x, accs, yerr=[err_lo, err_hi], capsize=5, color="tab:blue", alpha=0.8,
           error_kw={"elinewidth": 1.2})
    for xi, acc, r in zip(x, accs, results.values()):
        ax.text(xi + 0.06, min(acc + 0.01, 0.96), "n/a" if r.n == 0 else f"{acc:.3f}",
                ha="left", va="bottom", fontsize=8)  # beside the error bar, not on it
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    _save_rate_plot(fig, ax, "accuracy", "Accuracy per system (95% Wilson CI)", path)


def _plot_positive_rate(by_role: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    roles = [r for r in ROLES if r in by_role]
    rates = [by_role[r].get("positive_rate") for r in roles]
    heights = [0.0 if v is None or _is_nan(v) else float(v) for v in rates]
    fig = _new_figure(5.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(roles)))
    ax.bar(x, heights, color=["tab:green", "tab:orange", "tab:purple"][: len(roles)], alpha=0.85)
    for xi, role, rate, h in zip(x, roles, rates, heights):
        stats = by_role[role]
        label = _fmt_float(rate, 3)
        extra = []
        if "sft" in stats:
            extra.append(f"SFT {_fmt_int(stats['sft'])}")
        if "dpo_pairs" in stats:
            extra.append(f"DPO {_fmt_int(stats['dpo_pairs'])}")
        if extra:
            label += "\n" + ", ".join(extra)
        ax.text(xi, min(h + 0.02, 0.85), label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(roles)
    _save_rate_plot(fig, ax, "positive rate", "Positive rate per role (expansion tree)", path)


# --------------------------------------------------------------------------- report


def _meta_section(meta: Mapping[str, Any], results: Mapping[str, SystemResult]) -> list[str]:
    meta = dict(meta)
    if "n_questions" not in meta and results:
        ns = sorted({r.n for r in results.values()})
        meta["n_questions"] = ns[0] if len(ns) == 1 else ", ".join(map(str, ns))
    rows = []
    known = {k for k, _ in _META_ROWS} | {"title"}
    for key, label in _META_ROWS:
        if key in meta:
            rows.append([label, _fmt_meta(key, meta[key])])
    for key, value in meta.items():
        if key not in known:
            rows.append([str(key), _fmt_meta(str(key), value)])
    if not rows:
        return []
    return ["## Run", ""] + _md_table(["field", "value"], rows) + [""]


def _comparison_section(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Paired comparisons", ""]
    if not comparisons:
        return lines + ["No paired comparisons.", ""]
    rows = []
    for c in comparisons:
        rows.append([
            f"{c['target']} vs {c['baseline']}",
            _fmt_float(c.get("diff"), sign=True),
            _fmt_p(c.get("mcnemar_p")),
            _fmt_ci(c.get("bootstrap_lo"), c.get("bootstrap_hi")),
            _fmt_p(c.get("bootstrap_p")),
        ])
    lines += _md_table(["target vs baseline", "diff", "McNemar p", "bootstrap 95% CI", "bootstrap p"], rows)
    lines += ["", "diff = target accuracy - baseline accuracy; McNemar: exact two-sided test on "
              "discordant questions; bootstrap: paired resampling of questions (percentile CI).", ""]
    return lines


def write_report(
    run_dir: str | Path,
    results: Mapping[str, SystemResult],
    comparisons: Sequence[Mapping[str, Any]],
    credit_summary: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> Path:
    """Write ``report.md`` (+ ``accuracy.png`` / ``positive_rate.png``) into ``run_dir``.

    ``results`` maps a system name to its :class:`~malt_jax.evaluate.SystemResult` (table order
    = mapping order); ``comparisons`` are the rows of :func:`malt_jax.evaluate.compare`;
    ``credit_summary`` is :func:`malt_jax.credit.summary` output (keys ``"<role>/<stat>"`` with
    role ``generator|verifier|refiner`` or ``G|V|R``; ``None`` omits the section); ``meta`` may
    hold ``title``, ``model``, ``task``, ``n_questions`` (derived from ``results`` if absent),
    ``seeds``, ``config_hash``, ``wall_times`` (seconds, or a ``{stage: seconds}`` mapping) and
    any other fields. Returns the path of ``report.md``. ``run_dir`` is created if needed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = str(meta.get("title", "MALT evaluation report"))
    lines = [f"# {title}", ""]
    lines += _meta_section(meta, results)

    lines += ["## Accuracy", ""]
    acc_png = run_dir / ACCURACY_PNG
    if results:
        lines += _md_table(_ACC_HEADER, _accuracy_rows(results)) + [""]
        _plot_accuracy(results, acc_png)
        lines += [f"![accuracy per system]({ACCURACY_PNG})", ""]
    else:
        lines += ["No systems were evaluated.", ""]
        acc_png.unlink(missing_ok=True)

    lines += _comparison_section(comparisons)

    rate_png = run_dir / POSITIVE_RATE_PNG
    wrote_rates = False
    if credit_summary is not None:
        lines += _credit_section(credit_summary)
        by_role, _ = _credit_by_role(credit_summary)
        if any("positive_rate" in s for s in by_role.values()):
            _plot_positive_rate(by_role, rate_png)
            wrote_rates = True
    if not wrote_rates:
        rate_png.unlink(missing_ok=True)

    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
