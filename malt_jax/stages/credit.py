"""Stage 2, credit assignment: leaf rewards -> node values and labels -> per-role training data.

    <run>/credit/{G,V,R}_{sft,dpo}.jsonl   token-level SFT examples and DPO pairs of each role
    <run>/credit/summary.json             per-role statistics (written last: marks the stage done)

Value iteration and labels are :mod:`malt_jax.credit.values`; this stage turns labelled tree nodes into
prompts and completions with the tokens the sampler produced (:func:`node_context`,
:func:`node_output`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from malt_jax.config import RunConfig
from malt_jax.credit import values as credit_lib
from malt_jax.model.base_model import Model
from malt_jax.roles import ROLES, role_name
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages.rundir import load_expansion, write_atomic, write_rows
from malt_jax.tasks import Task

__all__ = ["node_context", "node_output", "build_datasets", "run_credit"]


def _ids(tokens: np.ndarray, length: int) -> list[int]:
    return tokens[:length].tolist()


def node_context(trees: dict[str, np.ndarray], seps, coord: Sequence[int]) -> list[int]:
    """Prompt tokens of the node at ``coord`` = (q, i[, j[, k]]) (the context before its output).

    ``seps`` = :attr:`PromptCodec.seps`. V and R contexts start with the per-question prefix the
    sampler used (``V_prefix`` / ``R_prefix`` in the separate framing, else the question prompt).
    """
    q, level = coord[0], len(coord) - 2
    if level == 0:
        return _ids(trees["q_tokens"][q], trees["q_lens"][q])
    role = ROLES[level]
    if f"{role}_prefix" in trees:
        ctx = _ids(trees[f"{role}_prefix"][q], trees[f"{role}_prefix_lens"][q])
    else:
        ctx = _ids(trees["q_tokens"][q], trees["q_lens"][q])
    for a in range(level):
        c = tuple(coord[: a + 2])
        ctx += _ids(trees[f"{ROLES[a]}_tokens"][c], trees[f"{ROLES[a]}_lengths"][c]) + list(seps[level - 1][a])
    return ctx


def node_output(trees: dict[str, np.ndarray], coord: Sequence[int], end_token: int) -> list[int]:
    """The node's generated tokens, plus the end-of-turn token if it stopped by itself."""
    role = ROLES[len(coord) - 2]
    c = tuple(coord)
    out = _ids(trees[f"{role}_tokens"][c], trees[f"{role}_lengths"][c])
    return out + [end_token] if trees[f"{role}_stopped"][c] else out


def _balance_weights(classes: Sequence[bool]) -> list[float]:
    """Example weights giving each class half of the total weight (mean weight 1); all 1 when a
    class is missing."""
    n, n_true = len(classes), int(sum(classes))
    if n_true in (0, n):
        return [1.0] * n
    w_true, w_false = n / (2.0 * n_true), n / (2.0 * (n - n_true))
    return [w_true if c else w_false for c in classes]


def build_datasets(
    trees: dict[str, np.ndarray],
    seps,
    end_token: int,
    threshold: float,
    max_pairs_per_parent: int | None,
    seed: int,
    verifier_balance: bool = False,
    roles: Sequence[str] = ROLES,
) -> tuple[dict, dict]:
    """Value iteration + labels -> per-role SFT examples and DPO pairs (token level).

    ``roles``: the roles that get data (``TreeConfig.roles``); the others get none and no
    statistics in the summary (a tree without a critique, ``tree.critique: false``: its V nodes
    are the empty critiques, one per answer, whose values are the answers' values). Values are
    propagated through every level all the same.

    DPO pairs whose chosen and rejected completions are the same tokens are dropped (counted as
    ``<role>/dpo_identical``). With ``verifier_balance`` (and ``G_correct`` in the trees), the
    verifier's SFT examples and DPO pairs are weighted so that those under right and under wrong
    generator answers carry equal total weight: most positive critiques sit under right answers,
    and unweighted SFT would teach the verifier to call every answer correct.
    """
    values = credit_lib.assign_credit(jnp.asarray(trees["rewards"]), threshold=threshold)
    summary = credit_lib.summary(values, max_pairs_per_parent)
    dropped = [role_name(r) + "/" for r in ROLES if r not in roles]
    summary = {k: v for k, v in summary.items() if not k.startswith(tuple(dropped))}
    datasets: dict[str, dict[str, list]] = {}
    for role in (r for r in ROLES if r in roles):
        sft: list[dict[str, Any]] = [
            {
                "prompt": node_context(trees, seps, c),
                "completion": node_output(trees, c, end_token),
                "coord": [int(x) for x in c],
            }
            for c in credit_lib.sft_indices(values, role)
        ]
        dpo, identical = [], 0
        for chosen, rejected in credit_lib.dpo_pairs(values, role, max_pairs_per_parent, seed):
            row: dict[str, Any] = {
                "prompt": node_context(trees, seps, chosen),
                "chosen": node_output(trees, chosen, end_token),
                "rejected": node_output(trees, rejected, end_token),
                "coords": [[int(x) for x in chosen], [int(x) for x in rejected]],
            }
            if row["chosen"] == row["rejected"]:
                identical += 1
                continue
            dpo.append(row)
        summary[f"{role_name(role)}/dpo_identical"] = identical
        summary[f"{role_name(role)}/dpo_pairs"] = len(dpo)
        if role == "V" and "G_correct" in trees:
            g_ok = trees["G_correct"]
            sft_cls = [bool(g_ok[r["coord"][0], r["coord"][1]]) for r in sft]
            dpo_cls = [bool(g_ok[r["coords"][0][0], r["coords"][0][1]]) for r in dpo]
            summary["verifier/sft_under_right_answers"] = int(sum(sft_cls))
            summary["verifier/sft_under_wrong_answers"] = len(sft_cls) - int(sum(sft_cls))
            summary["verifier/dpo_under_right_answers"] = int(sum(dpo_cls))
            summary["verifier/dpo_under_wrong_answers"] = len(dpo_cls) - int(sum(dpo_cls))
            if verifier_balance:
                for rows, cls in ((sft, sft_cls), (dpo, dpo_cls)):
                    for r, w in zip(rows, _balance_weights(cls)):
                        r["weight"] = w
        datasets[role] = {"sft": sft, "dpo": dpo}
    return datasets, summary


def run_credit(
    cfg: RunConfig, model: Model, task: Task, run_dir: Path, out: Path | None = None, n_questions: int | None = None
) -> dict:
    """Stage 2: value iteration, labels, SFT sets and DPO pairs for each role.

    ``n_questions``: use only the first that many trees (the study's nested training sets),
    written to ``out`` (default ``run_dir / "credit"``). Without a critique
    (``tree.critique: false``) only G and R get data (``TreeConfig.roles``), and R's prompts are
    the contexts the sampler gave it: the codec's ``empty_critique_seps`` around the empty
    critique.
    """
    out = out or run_dir / "credit"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    trees = load_expansion(run_dir)
    if n_questions is not None:
        if n_questions > len(trees["index"]):
            raise ValueError(f"{run_dir}: {n_questions} questions asked, the expansion holds {len(trees['index'])}")
        trees = {k: v[:n_questions] for k, v in trees.items()}
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    datasets, summary = build_datasets(
        trees,
        codec.seps if cfg.tree.critique else codec.empty_critique_seps,
        codec.end_of_turn,
        cfg.train.value_threshold,
        cfg.train.max_pairs_per_parent,
        cfg.train.seed,
        verifier_balance=cfg.train.verifier_balance,
        roles=cfg.tree.roles,
    )
    for role, d in datasets.items():
        for kind, rows in d.items():
            write_rows(out / f"{role}_{kind}.jsonl", rows)
    summary = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    summary["leaf_accuracy"] = float(trees["rewards"].mean())
    if "rewards_lenient" in trees:  # how often the lenient grade alone would have rewarded a leaf
        lenient = trees["rewards_lenient"] > 0
        fallback = {
            "leaves": int(lenient.size),
            "rewarded": int((trees["rewards"] > 0).sum()),
            "rewarded_lenient": int(lenient.sum()),
        }
        if "rewards_explicit" in trees:
            explicit = trees["rewards_explicit"].astype(bool)
            fallback["no_explicit_answer"] = int((lenient & ~explicit).sum())
            fallback["cut_off"] = int((lenient & explicit & ~trees["R_stopped"].astype(bool)).sum())
        summary["reward_fallback"] = fallback
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))  # last: marks the stage done
    return summary
