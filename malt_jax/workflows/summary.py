"""The small JSON summary of an experiment (a run or one size of a study), as committed under
``results/``: accuracies with Wilson intervals (and correct / n), paired comparisons with their
McNemar discordant counts and Holm-adjusted p-values, the held-out training targets per role
(selection-set and report-set figures told apart), the verifier's verdict confusion, wall time,
command."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from malt_jax.roles import ROLES
from malt_jax.runtime.machine import machine_info
from malt_jax.stages.rundir import role_epochs, training_counts


def system_table(results: dict) -> dict[str, dict[str, Any]]:
    """``{name: {accuracy, ci95, correct, n}}`` of ``SystemResult``s."""
    return {
        n: {"accuracy": r.accuracy, "ci95": [round(x, 4) for x in r.ci], "correct": r.successes, "n": r.n}
        for n, r in results.items()
    }


def comparisons(rows: list[dict]) -> list[dict[str, Any]]:
    """``run_eval`` comparison rows as ``{a, b, n, b01, b10, diff, p, p_holm, primary,
    bootstrap_ci95}``: ``n`` paired questions, the McNemar discordant counts ``b01`` (a wrong, b
    right) and ``b10`` (a right, b wrong) and its exact p-value ``p``."""
    return [
        {
            "a": c["target"],
            "b": c["baseline"],
            "n": c["n"],
            "b01": c["b01"],
            "b10": c["b10"],
            "diff": c["diff"],
            "p": c["mcnemar_p"],
            "p_holm": c["p_holm"],
            "primary": c["primary"],
            "bootstrap_ci95": [c["bootstrap_lo"], c["bootstrap_hi"]],
        }
        for c in rows
    ]


def training(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per role (``adapters/<role>_epochs.jsonl``): SFT loss at epoch 0 and at the selected epoch,
    DPO ``rewards/accuracies`` (pair-weighted, with the unweighted ``accurate_pairs`` / ``pairs``
    beside it) / margins / loss at the selected epoch.

    ``heldout_*``: measured on the held-out examples that chose the epochs (``heldout_set``), so
    the values at the selected epoch are optimistic. ``report_*``: the same figures on held-out
    examples that never chose an epoch (``train.heldout_report_fraction``; ``None`` without
    them)."""
    out: dict[str, dict[str, Any]] = {}
    per_role = role_epochs(run_dir)
    for role in ROLES:
        epochs = per_role.get(role, [])
        sft = [e for e in epochs if e["stage"] == "sft"]
        dpo = [e for e in epochs if e["stage"] == "dpo"]
        best = lambda es: next((e for e in es if e.get("best")), es[-1] if es else None)  # noqa: E731
        b_sft, b_dpo = best(sft), best(dpo)
        row: dict[str, Any] = {"trained": bool(epochs), "heldout_set": "epoch selection"}
        for prefix in ("heldout", "report"):
            row.update(
                {
                    f"{prefix}_sft_loss_start": sft[0].get(f"{prefix}/loss") if sft else None,
                    f"{prefix}_sft_loss_end": b_sft.get(f"{prefix}/loss") if b_sft else None,
                    f"{prefix}_dpo_accuracy": b_dpo.get(f"{prefix}/rewards/accuracies") if b_dpo else None,
                    f"{prefix}_dpo_accurate_pairs": b_dpo.get(f"{prefix}/rewards/accurate_pairs") if b_dpo else None,
                    f"{prefix}_dpo_pairs": b_dpo.get(f"{prefix}/pairs") if b_dpo else None,
                    f"{prefix}_dpo_margin": b_dpo.get(f"{prefix}/rewards/margins") if b_dpo else None,
                    f"{prefix}_dpo_loss_start": dpo[0].get(f"{prefix}/loss") if dpo else None,
                    f"{prefix}_dpo_loss_end": b_dpo.get(f"{prefix}/loss") if b_dpo else None,
                }
            )
            if prefix == "heldout":
                row["sft_epochs"] = b_sft["epoch"] if b_sft else 0
                row["dpo_epochs"] = b_dpo["epoch"] if b_dpo else 0
        out[role] = row
    return out


def experiment_summary(
    name: str,
    command: str,
    config_hash: str,
    ev: dict,
    run_dir: Path,
    n_train: int,
    n_eval: int,
    votes: int,
    primary: tuple[str, str],
    wall_time_s: float,
    **extra: Any,
) -> dict[str, Any]:
    """The summary of one evaluated experiment (``ev`` = ``stages.eval.run_eval`` output), with the
    date and the machine (CPU model, vector ISA) that ran it."""
    return {
        "experiment": name,
        "command": command,
        "config_hash": config_hash,
        "n_train": n_train,
        "n_eval": n_eval,
        "votes": votes,
        "primary": "{} vs {}".format(*primary),
        "systems": system_table(ev["results"]),
        "comparisons": comparisons(ev["comparisons"]),
        "verifier": ev["verifier"],
        "skills": ev.get("skills", {}),
        "training": training(run_dir),
        "training_data": training_counts(run_dir),
        **extra,
        "wall_time_s": round(wall_time_s, 1),
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
    }
