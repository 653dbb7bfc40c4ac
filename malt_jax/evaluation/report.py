"""Markdown report for a MALT run, with the PNG figures of ``plots.py``.

:func:`write_report` writes into ``run_dir``:

* ``report.md`` -- title, the "Run" table of a :class:`RunRecord` (model, task, questions, seeds,
  config hash, wall times, training questions, framing, tree, then any ``extra`` rows), the
  accuracy table (system | accuracy | 95% Wilson CI | n), the paired comparison table (target
  vs baseline | diff | McNemar p | bootstrap 95% CI | bootstrap p) and, when a credit summary
  is given, a per-role table (positive rate, SFT examples, DPO pairs; plus valid nodes / mean
  value when present);
* ``accuracy.png`` -- one bar per system with asymmetric Wilson 95% error bars (only when there
  is at least one system);
* ``positive_rate.png`` -- positive rate per role of the expansion tree (only when the credit
  summary has a ``<role>/positive_rate`` entry).

A plot that is not produced is removed from ``run_dir`` if an older copy is there, so the
directory never shows a stale figure next to a fresh report.

:func:`format_table` renders the accuracy table as aligned plain text for a terminal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from malt_jax.evaluation.fmt import fmt_ci, fmt_float, fmt_int, fmt_meta, fmt_p, md_table
from malt_jax.evaluation.plots import plot_accuracy, plot_positive_rate, plot_training_curves, selected, stage_records
from malt_jax.evaluation.stats import SystemResult
from malt_jax.roles import NAMES, ROLE_NAMES, as_role_name

__all__ = [
    "RunRecord",
    "write_report",
    "format_table",
    "training_section",
    "verifier_section",
    "skills_section",
    "data_section",
]

_STAT_ALIASES = {
    "positive_rate": "positive_rate",
    "sft": "sft",
    "sft_examples": "sft",
    "dpo_pairs": "dpo_pairs",
    "dpo": "dpo_pairs",
    "nodes": "nodes",
    "mean_value": "mean_value",
}

ACCURACY_PNG = "accuracy.png"
POSITIVE_RATE_PNG = "positive_rate.png"
TRAINING_PNG = "training.png"


def _accuracy_rows(results: Mapping[str, SystemResult]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        lo, hi = r.ci
        rows.append([name, fmt_float(r.accuracy), fmt_ci(lo, hi) if r.n else "n/a", str(r.n)])
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
        role = as_role_name(role_part) if slash else None
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
    ordered = {r: by_role[r] for r in NAMES if r in by_role}
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
            cols.append(("nodes", fmt_int))
        cols.append(("positive_rate", fmt_float))
        if any("mean_value" in s for s in by_role.values()):
            cols.append(("mean_value", fmt_float))
        cols += [("sft", fmt_int), ("dpo_pairs", fmt_int)]
        names = {
            "nodes": "valid nodes",
            "positive_rate": "positive rate",
            "mean_value": "mean value",
            "sft": "SFT examples",
            "dpo_pairs": "DPO pairs",
        }
        header += [names[c] for c, _ in cols]
        rows = [[role] + [fmt(stats.get(c)) for c, fmt in cols] for role, stats in by_role.items()]
        lines += md_table(header, rows) + [""]
        if any("positive_rate" in s for s in by_role.values()):
            lines += [f"![positive rate per role]({POSITIVE_RATE_PNG})", ""]
    if other:
        lines += [", ".join(f"{k}: {fmt_meta(k, v)}" for k, v in other.items()), ""]
    return lines


def _acc_k_n(rec: Mapping[str, Any], prefix: str) -> str:
    """A (pair-weighted) DPO reward accuracy with the unweighted ``k / n`` pairs beside it."""
    cell = fmt_float(rec.get(f"{prefix}/rewards/accuracies"))
    k, n = rec.get(f"{prefix}/rewards/accurate_pairs"), rec.get(f"{prefix}/pairs")
    return cell if k is None or n is None else f"{cell} ({int(k)} / {int(n)})"


def training_section(
    epochs_by_role: Mapping[str, Sequence[Mapping[str, Any]]], counts_by_role: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Markdown lines: per role and stage the training / held-out counts, epochs run, the selected
    epoch, held-out loss at epoch 0 and at the selected epoch, and (DPO) held-out
    ``rewards/accuracies`` (with the unweighted k / n pairs, when recorded) and
    ``rewards/margins`` at the selected epoch. The held-out set is the one that chose the epoch,
    so the columns say "selection set"; when a report set was held out from selection too
    (``report/...`` records, ``<stage>_report`` counts), its figures get columns of their own.
    ``epochs_by_role`` holds ``train_role(...).epochs``, ``counts_by_role`` its ``counts``
    (optionally with ``trained``); a role that was not trained (``trained`` False, or no records
    and no data) reads "no positive examples: keeps the base model"."""
    lines = ["## Training (epoch selection on held-out data)", ""]
    roles = list(dict.fromkeys([*epochs_by_role, *counts_by_role]))
    if not roles:
        return lines + ["No roles were trained.", ""]
    report = any("report/loss" in r for recs in epochs_by_role.values() for r in recs)
    header = [
        "role",
        "stage",
        "examples (train / selection" + (" / report)" if report else ")"),
        "epochs run",
        "selected epoch",
        "selection-set loss @0",
        "selection-set loss @selected",
        "selection-set reward acc. @selected",
        "selection-set reward margin @selected",
    ]
    if report:
        header += ["report-set loss @0", "report-set loss @selected", "report-set reward acc. @selected"]
    rows = []
    for role in roles:
        records = list(epochs_by_role.get(role, []))
        counts = dict(counts_by_role.get(role, {}))
        trained = counts.get("trained")
        if trained is None:
            trained = bool(records) or bool(counts.get("sft") or counts.get("dpo"))
        if not trained:
            rows.append(
                [
                    role,
                    "-",
                    f"SFT {fmt_int(counts.get('sft', 0))}, DPO {fmt_int(counts.get('dpo', 0))}",
                    "0",
                    "-",
                    "no positive examples: keeps the base model",
                    "",
                    "",
                    "",
                ]
                + ["", "", ""] * report
            )
            continue
        for stage in ("sft", "dpo"):
            recs = stage_records(records, stage)
            n = f"{fmt_int(counts.get(stage, 0))} / {fmt_int(counts.get(stage + '_heldout', 0))}"
            if report:
                n += f" / {fmt_int(counts.get(stage + '_report', 0))}"
            if not recs:
                rows.append([role, stage.upper(), n, "0", "-", "not run", "", "", ""] + ["", "", ""] * report)
                continue
            best = selected(recs) or recs[-1]
            first = recs[0] if int(recs[0].get("epoch", 0)) == 0 else None
            dpo = stage == "dpo"
            row = [
                role,
                stage.upper(),
                n,
                str(max(int(r["epoch"]) for r in recs)),
                str(int(best["epoch"])),
                fmt_float(None if first is None else first.get("heldout/loss")),
                fmt_float(best.get("heldout/loss")),
                _acc_k_n(best, "heldout") if dpo else "-",
                fmt_float(best.get("heldout/rewards/margins"), sign=True) if dpo else "-",
            ]
            if report:
                row += [
                    fmt_float(None if first is None else first.get("report/loss")),
                    fmt_float(best.get("report/loss")),
                    _acc_k_n(best, "report") if dpo and "report/loss" in best else "-",
                ]
            rows.append(row)
    lines += md_table(header, rows) + [""]
    lines += [
        "Epoch 0 = before the first update. The selected epoch has the lowest loss on the held-out "
        "selection set (SFT: cross-entropy, DPO: DPO loss), so that set's figures at the selected epoch "
        "are optimistic"
        + (
            "; the report set was held out from selection too (by question) and never chose an epoch"
            if report
            else " (no separate report set was held out: `train.heldout_report_fraction`)"
        )
        + ". Without a held-out set the last epoch is kept and held-out values read n/a. Reward accuracies "
        "are pair-weighted (verifier balance weights); the unweighted pairs with chosen reward > rejected / "
        "pairs are beside them where recorded.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------- report


def _row(label: str) -> Any:
    return dataclasses.field(default=None, metadata={"label": label})


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the report says about a run: its "Run" table, one labelled row per field that is set
    (in this order), then the ``extra`` rows under their own names. ``pipeline.run_record`` builds
    it from a run's config; ``n_questions`` (evaluation questions) defaults to the results' n."""

    title: str = "MALT evaluation report"
    model: str | None = _row("Model")
    task: str | None = _row("Task")
    n_questions: int | str | None = _row("Questions")
    seeds: str | Sequence[Any] | None = _row("Seeds")
    config_hash: str | None = _row("Config hash")
    wall_times: Mapping[str, float] | float | None = _row("Wall time")  # seconds, or per stage
    n_train: int | None = _row("Training questions")
    framing: str | None = _row("Framing")
    tree: str | None = _row("Tree (n x m x l)")
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _meta_section(record: RunRecord, results: Mapping[str, SystemResult]) -> list[str]:
    n_questions = record.n_questions
    if n_questions is None and results:
        ns = sorted({r.n for r in results.values()})
        n_questions = ns[0] if len(ns) == 1 else ", ".join(map(str, ns))
    rows = []
    for f in dataclasses.fields(record):
        value = n_questions if f.name == "n_questions" else getattr(record, f.name)
        if "label" in f.metadata and value is not None:
            rows.append([f.metadata["label"], fmt_meta(f.name, value)])
    rows += [[str(key), fmt_meta(str(key), value)] for key, value in record.extra.items()]
    if not rows:
        return []
    return ["## Run", ""] + md_table(["field", "value"], rows) + [""]


def _comparison_section(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Paired comparisons", ""]
    if not comparisons:
        return lines + ["No paired comparisons.", ""]
    holm = any("p_holm" in c for c in comparisons)
    rows = []
    for c in comparisons:
        name = f"{c['target']} vs {c['baseline']}" + (" (primary)" if c.get("primary") else "")
        b01, b10 = c.get("b01"), c.get("b10")
        counts = "n/a" if b01 is None or b10 is None else f"{int(b10)} / {int(b01)} / {fmt_int(c.get('n'))}"
        row = [name, fmt_float(c.get("diff"), sign=True), counts, fmt_p(c.get("mcnemar_p"))]
        if holm:
            row.append("-" if c.get("primary") else fmt_p(c.get("p_holm")))
        rows.append(row + [fmt_ci(c.get("bootstrap_lo"), c.get("bootstrap_hi")), fmt_p(c.get("bootstrap_p"))])
    header = ["target vs baseline", "diff", "discordant: target only / baseline only / n", "McNemar p"]
    header += ["Holm p"] if holm else []
    lines += md_table(header + ["bootstrap 95% CI", "bootstrap p"], rows)
    lines += [
        "",
        "diff = target accuracy - baseline accuracy; discordant: the questions only the target "
        "(b10) / only the baseline (b01) got right, of n paired questions; McNemar: exact two-sided test on "
        "those discordant questions; bootstrap: paired resampling of questions (percentile CI)."
        + (
            " The primary comparison was declared before the run; the others' McNemar p-values are "
            "Holm-adjusted over the family (Holm p)."
            if holm
            else ""
        ),
        "",
    ]
    return lines


def _verdicts_right(c: Mapping[str, Any]) -> str:
    """The unweighted ``k / n`` right verdicts (says correct of a right answer or incorrect of a
    wrong one) of a verdict confusion, beside its class-weighted balanced accuracy."""
    k = c.get("correct_verdicts")
    if k is None and "right_says_correct" in c and "wrong_says_incorrect" in c:
        k = int(c["right_says_correct"]) + int(c["wrong_says_incorrect"])
    return "n/a" if k is None or c.get("n") is None else f"{int(k)} / {int(c['n'])}"


def verifier_section(verifier: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines: each chain's verifier verdicts against its generator answers' correctness."""
    lines = ["## Verifier verdicts vs generator correctness", ""]
    if not verifier:
        return lines + ["No chain was evaluated.", ""]
    header = [
        "chain",
        "answers right / wrong",
        "right: says correct / incorrect / none",
        "wrong: says correct / incorrect / none",
        "TPR",
        "TNR",
        "balanced accuracy",
        "verdicts right (unweighted)",
    ]
    rows = []
    for name, c in verifier.items():
        n_right = sum(int(c[f"right_{v}"]) for v in ("says_correct", "says_incorrect", "no_verdict"))
        rows.append(
            [
                name,
                f"{n_right} / {int(c['n']) - n_right}",
                " / ".join(str(int(c[f"right_{v}"])) for v in ("says_correct", "says_incorrect", "no_verdict")),
                " / ".join(str(int(c[f"wrong_{v}"])) for v in ("says_correct", "says_incorrect", "no_verdict")),
                fmt_float(c.get("tpr"), 3),
                fmt_float(c.get("tnr"), 3),
                fmt_float(c.get("balanced_accuracy"), 3),
                _verdicts_right(c),
            ]
        )
    lines += md_table(header, rows)
    lines += [
        "",
        "Every pass of every held-out question: the verifier's verdict (its reply's \"correct\" / "
        '"incorrect") against whether the generator answer it checked was right. TPR = says correct | '
        "right, TNR = says incorrect | wrong (no verdict counts as a miss); balanced accuracy = (TPR + TNR) / 2, "
        "0.5 = no discrimination (it weights the two classes equally; verdicts right = the unweighted count "
        "of right verdicts / all verdicts).",
        "",
    ]
    return lines


def skills_section(skills: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines: each chain's measured role skills (``stages.eval.role_skills``): G's
    accuracy, V's balanced accuracy against G's actual correctness, R's fix and break rates."""
    header = [
        "chain",
        "G accuracy",
        "V balanced accuracy (unweighted verdicts right)",
        "R fix rate (wrong -> right)",
        "R break rate (right -> wrong)",
    ]
    rows = []
    for name, s in skills.items():
        g, v, r = s["generator"], s["verifier"], s["refiner"]
        rows.append(
            [
                name,
                f"{fmt_float(g['accuracy'], 3)} (n {int(g['n'])})",
                f"{fmt_float(v.get('balanced_accuracy'), 3)} ({_verdicts_right(v)} right)",
                f"{fmt_float(r['fix_rate'], 3)} ({int(r['fixed'])} / {int(r['g_wrong'])})",
                f"{fmt_float(r['break_rate'], 3)} ({int(r['broken'])} / {int(r['g_right'])})",
            ]
        )
    return [
        "## Role skills (measured on the held-out questions)",
        "",
        *md_table(header, rows),
        "",
        "Every pass of every held-out question. The untrained chain shows the base model's skills, the "
        "trained chains the skills after training.",
        "",
    ]


def data_section(counts: Mapping[str, Mapping[str, Any]], credit_summary: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines: per role the examples the tree gave, held out (to choose epochs, and "+ k
    report" for a report-only set), trained on (before and after the configured caps), identical
    DPO pairs dropped, and how often the lenient grade would have rewarded a leaf the strict rule
    did not."""
    lines = ["## Training data", ""]
    rows = []

    def held(x: Mapping[str, Any]) -> str:
        return fmt_int(x.get("heldout")) + (f" + {fmt_int(x['report'])} report" if x.get("report") else "")

    for role, c in counts.items():
        name = ROLE_NAMES.get(role, role)
        ident = (credit_summary or {}).get(f"{name}/dpo_identical")
        s, d = c.get("sft", {}), c.get("dpo", {})
        rows.append(
            [
                role,
                fmt_int(s.get("examples")),
                held(s),
                fmt_int(s.get("train")),
                fmt_int(s.get("train_after_cap")),
                fmt_int(d.get("pairs")),
                held(d),
                fmt_int(d.get("train")),
                fmt_int(d.get("train_after_cap")),
                "n/a" if ident is None else str(ident),
                "keeps the base model (no positive example)" if c.get("trained") is False else "",
            ]
        )
    if rows:
        lines += md_table(
            [
                "role",
                "SFT examples",
                "held out (epoch selection)",
                "train",
                "train after cap",
                "DPO pairs",
                "held out (epoch selection)",
                "train",
                "train after cap",
                "identical pairs dropped",
                "note",
            ],
            rows,
        ) + [""]
    cs = credit_summary or {}
    for key, label in (
        ("verifier/sft_under_right_answers", "verifier SFT examples under right / wrong answers"),
        ("verifier/dpo_under_right_answers", "verifier DPO pairs under right / wrong answers"),
    ):
        if key in cs:
            lines.append(f"- {label}: {cs[key]} / {cs[key.replace('right', 'wrong')]}")
    fb = cs.get("reward_fallback")
    if fb:
        lines.append(
            f"- leaf rewards: {fb.get('rewarded')} of {fb.get('leaves')} leaves rewarded; the lenient grader "
            f"alone would have rewarded {fb.get('rewarded_lenient')} (no explicit final answer: "
            f"{fb.get('no_explicit_answer', 'n/a')}, cut off by the token limit: {fb.get('cut_off', 'n/a')})"
        )
    return lines + [""]


def write_report(
    run_dir: str | Path,
    results: Mapping[str, SystemResult],
    comparisons: Sequence[Mapping[str, Any]],
    credit_summary: Mapping[str, Any] | None,
    record: RunRecord,
    *,
    verifier: Mapping[str, Mapping[str, Any]] | None = None,
    epochs_by_role: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    training_counts: Mapping[str, Mapping[str, Any]] | None = None,
    skills: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``report.md`` (+ ``accuracy.png`` / ``positive_rate.png``) into ``run_dir``.

    ``results`` maps a system name to its :class:`~malt_jax.evaluation.stats.SystemResult` (table order
    = mapping order); ``comparisons`` are the rows of :func:`malt_jax.evaluation.stats.compare`;
    ``credit_summary`` is :func:`malt_jax.credit.values.summary` output (keys ``"<role>/<stat>"`` with
    role ``generator|verifier|refiner`` or ``G|V|R``; ``None`` omits the section); ``record``
    gives the title and the "Run" table (:class:`RunRecord`). Returns the path of ``report.md``.
    ``run_dir`` is created if needed.
    Optional sections: ``verifier`` (chain -> verdict confusion, :func:`verifier_section`),
    ``skills`` (chain -> measured role skills, :func:`skills_section`),
    ``training_counts`` (``adapters/training.json``, :func:`data_section`) and ``epochs_by_role``
    (per-epoch training records, :func:`training_section` + ``training.png``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {record.title}", ""]
    lines += _meta_section(record, results)

    lines += ["## Accuracy", ""]
    acc_png = run_dir / ACCURACY_PNG
    if results:
        lines += md_table(_ACC_HEADER, _accuracy_rows(results)) + [""]
        plot_accuracy(results, acc_png)
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
            plot_positive_rate(by_role, rate_png)
            wrote_rates = True
    if not wrote_rates:
        rate_png.unlink(missing_ok=True)

    if verifier is not None:
        lines += verifier_section(verifier)
    if skills:
        lines += skills_section(skills)
    if training_counts:
        lines += data_section(training_counts, credit_summary)
    train_png = run_dir / TRAINING_PNG
    if epochs_by_role:
        counts = {
            r: {
                "sft": c.get("sft", {}).get("train_after_cap", 0),
                "sft_heldout": c.get("sft", {}).get("heldout", 0),
                "sft_report": c.get("sft", {}).get("report", 0),
                "dpo": c.get("dpo", {}).get("train_after_cap", 0),
                "dpo_heldout": c.get("dpo", {}).get("heldout", 0),
                "dpo_report": c.get("dpo", {}).get("report", 0),
                "trained": c.get("trained"),
            }
            for r, c in (training_counts or {}).items()
        }
        lines += training_section(epochs_by_role, counts)
        if any(epochs_by_role.values()):
            plot_training_curves(epochs_by_role, train_png)
            lines += [f"![training curves per role]({TRAINING_PNG})", ""]
        else:
            train_png.unlink(missing_ok=True)
    else:
        train_png.unlink(missing_ok=True)

    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
