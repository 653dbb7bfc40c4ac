"""Evaluation statistics for MALT runs (host-side NumPy / pure Python, no JAX, no SciPy).

* :func:`majority_vote`    -- majority over extracted answers (self-consistency / MV@k).
* :func:`wilson_interval`  -- Wilson score interval for an accuracy.
* :func:`mcnemar_exact`    -- exact two-sided McNemar test for two paired systems.
* :func:`paired_bootstrap` -- paired bootstrap CI / p-value for an accuracy difference.
* :class:`SystemResult` + :func:`compare` -- per-system correctness vectors and the paired
  "target vs baselines" table used by :mod:`malt_jax.evaluation.report`.
* :func:`seeds_paired_test` -- a comparison pooled over seeds (sign-flip test over questions).
* :func:`holm` -- Holm-Bonferroni adjusted p-values for a family of comparisons.
* :func:`parse_verdict` + :func:`verifier_confusion` -- what a verifier said about an answer
  ("correct" / "incorrect") against whether the answer was right: a confusion matrix and the
  balanced accuracy.

All systems compared with each other must be evaluated on the *same* questions in the *same*
order (paired design): element ``i`` of every correctness vector refers to question ``i``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "majority_vote",
    "wilson_interval",
    "mcnemar_exact",
    "paired_bootstrap",
    "SystemResult",
    "compare",
    "seeds_paired_test",
    "holm",
    "parse_verdict",
    "verifier_confusion",
]


# --------------------------------------------------------------------------- majority vote


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most common non-``None`` answer in ``answers``.

    ``None`` entries (no answer could be extracted) are ignored; if every entry is ``None`` (or
    the sequence is empty) the result is ``None``. Answers are compared with ``==`` as given, so
    callers should pass *normalised* extracted answers.

    Tie-break: among the answers sharing the highest count, the one whose **first occurrence
    comes earliest** in ``answers`` wins (i.e. the answer of the earliest pass). E.g.
    ``["7", "5", "5", "7"] -> "7"`` and ``[None, "5", "7"] -> "5"``.
    """
    counts: dict[Any, int] = {}  # insertion order == order of first occurrence
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    for a, c in counts.items():
        if c == best:
            return a
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- Wilson interval


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    ``lo, hi = (p + z^2/2n -+ z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``z`` the
    two-sided normal quantile of ``confidence`` (``statistics.NormalDist().inv_cdf``).
    ``n == 0`` gives the uninformative ``(0.0, 1.0)``; ``successes == 0`` gives ``lo == 0.0``
    and ``successes == n`` gives ``hi == 1.0`` exactly.
    """
    successes, n = int(successes), int(n)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


# --------------------------------------------------------------------------- paired tests


def _paired(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(
            f"{names[0]} and {names[1]} must be 1-D correctness vectors, got shapes {a.shape} and {b.shape}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]!r} (n={a.shape[0]}) and {names[1]!r} (n={b.shape[0]}) are not "
            "paired: they must be evaluated on the same questions"
        )
    return a.astype(bool), b.astype(bool)


_EXACT_MAX_N = 20_000  # beyond this the exact big-int sum gets slow; use log space


def _binom_half_cdf_log(k: int, n: int) -> float:
    """Log-space ``P[X <= k]``, ``X ~ Binomial(n, 1/2)`` (relative error ~1e-10; never overflows)."""
    i = np.arange(k, dtype=np.float64)
    # log C(n, i) via the recurrence C(n, i + 1) = C(n, i) * (n - i) / (i + 1).
    log_c = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1.0))])
    log_terms = log_c - n * math.log(2.0)
    m = float(log_terms.max())
    return float(min(1.0, math.exp(m) * np.exp(log_terms - m).sum()))


def _binom_half_cdf(k: int, n: int) -> float:
    """``P[X <= k]`` for ``X ~ Binomial(n, 1/2)``: exact integer arithmetic with a single final
    rounding for ``n <= 20000``, log space above (both overflow-free)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if n > _EXACT_MAX_N:
        return _binom_half_cdf_log(k, n)
    term = 1  # C(n, 0)
    total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        total += term
    # int / int true division is correctly rounded for arbitrarily large ints (no overflow).
    return total / (1 << n)


def mcnemar_exact(a: Any, b: Any) -> dict[str, Any]:
    """Exact two-sided McNemar test for paired boolean correctness vectors ``a`` and ``b``.

    ``b01`` = #questions where ``a`` is wrong and ``b`` right; ``b10`` = #questions where ``a``
    is right and ``b`` wrong. Under H0 the discordant pairs split as ``Binomial(b01 + b10, 1/2)``
    and ``p = min(1, 2 * P[X <= min(b01, b10)])`` (computed exactly with integers, so large
    counts do not overflow). ``p = 1`` when there are no discordant pairs.
    """
    a, b = _paired(a, b)
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    n = b01 + b10
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_half_cdf(min(b01, b10), n))
    return {"b01": b01, "b10": b10, "p_value": p}


def paired_bootstrap(
    a: Any,
    b: Any,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap for the accuracy difference ``mean(a) - mean(b)``.

    Each replicate resamples question indices with replacement (the same indices for both
    systems, preserving the pairing) and records the difference of accuracies.

    Returns ``diff`` (observed difference), ``lo``/``hi`` (percentile interval at
    ``confidence``, default 95%) and ``p_value``: a two-sided bootstrap p-value defined as
    ``2 * fraction of replicate diffs on the other side of 0 from the observed diff``, where a
    replicate exactly equal to 0 counts as "other side" (conservative), capped at 1. If the
    observed diff is exactly 0 the p-value is 1. The result is deterministic given ``seed``.
    """
    a, b = _paired(a, b)
    n = a.shape[0]
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    samples = int(samples)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    _z(confidence)  # validates confidence
    d = a.astype(np.float64) - b.astype(np.float64)
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    boots = np.empty(samples, dtype=np.float64)
    chunk = max(1, min(samples, (1 << 22) // n))  # bound memory to ~32 MiB of indices
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boots[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    if diff > 0:
        p = 2.0 * float(np.mean(boots <= 0.0))
    elif diff < 0:
        p = 2.0 * float(np.mean(boots >= 0.0))
    else:
        p = 1.0
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": min(1.0, p)}


# --------------------------------------------------------------------------- systems


@dataclasses.dataclass
class SystemResult:
    """Per-question results of one system (e.g. ``"baseline G"``, ``"MALT G->V->R"``).

    ``correct[i]`` says whether the system answered question ``i`` correctly; ``answers[i]``
    is its extracted answer (``None`` if none could be extracted). ``answers`` may be left
    empty; otherwise it must have one entry per question.
    """

    name: str
    correct: np.ndarray
    answers: list[str | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        correct = np.asarray(self.correct)
        if correct.ndim != 1:
            raise ValueError(f"system {self.name!r}: correct must be 1-D, got shape {correct.shape}")
        self.correct = correct.astype(bool)
        self.answers = list(self.answers)
        if self.answers and len(self.answers) != self.correct.shape[0]:
            raise ValueError(f"system {self.name!r}: {len(self.answers)} answers for {self.correct.shape[0]} questions")

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    @property
    def successes(self) -> int:
        return int(np.count_nonzero(self.correct))

    @property
    def accuracy(self) -> float:
        """Fraction correct (NaN for zero questions)."""
        return self.successes / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        """95% Wilson interval of :attr:`accuracy`."""
        return wilson_interval(self.successes, self.n)


def compare(
    results: Mapping[str, SystemResult],
    target: str,
    baselines: Sequence[str],
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparison of ``results[target]`` against each of ``results[baselines]``.

    One row per baseline, in the given order, with keys ``target``, ``baseline``, ``n``,
    ``target_accuracy``, ``baseline_accuracy``, ``diff`` (target - baseline), ``b01``
    (target wrong, baseline right), ``b10`` (target right, baseline wrong), ``mcnemar_p``,
    ``bootstrap_lo``, ``bootstrap_hi`` (95% percentile CI of the diff) and ``bootstrap_p``.
    Every comparison uses the same ``seed``, so a row does not depend on the other baselines.

    Raises ``ValueError`` (naming the systems) if a system is missing or if target and baseline
    were not evaluated on the same number of questions.
    """
    missing = [s for s in (target, *baselines) if s not in results]
    if missing:
        raise ValueError(f"unknown system(s) {missing}; available: {sorted(results)}")
    t = results[target]
    rows = []
    for name in baselines:
        base = results[name]
        if base.n != t.n:
            raise ValueError(
                f"systems {target!r} (n={t.n}) and {name!r} (n={base.n}) are not "
                "paired: they must be evaluated on the same questions"
            )
        mc = mcnemar_exact(t.correct, base.correct)
        if t.n:
            bs = paired_bootstrap(t.correct, base.correct, samples=bootstrap_samples, seed=seed)
        else:
            bs = {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_value": 1.0}
        rows.append(
            {
                "target": target,
                "baseline": name,
                "n": t.n,
                "target_accuracy": t.accuracy,
                "baseline_accuracy": base.accuracy,
                "diff": bs["diff"],
                "b01": mc["b01"],
                "b10": mc["b10"],
                "mcnemar_p": mc["p_value"],
                "bootstrap_lo": bs["lo"],
                "bootstrap_hi": bs["hi"],
                "bootstrap_p": bs["p_value"],
            }
        )
    return rows


def seeds_paired_test(a: Any, b: Any, samples: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Two systems compared over several seeds of training on the same questions.

    ``a`` / ``b``: boolean correctness ``[S, Q]`` (seed ``s``'s run of each system on question
    ``q``; a system that does not depend on the seed repeats its row). The question is the unit:
    ``d_q`` = mean over seeds of ``a - b``, and the two-sided p-value is a sign-flip
    (randomisation) test of ``mean_q d_q = 0`` -- under H0 each question's ``d_q`` is symmetric
    about 0 -- with ``samples`` random sign patterns (``p = (1 + #|mean| >= |observed|) / (1 +
    samples)``; exact enumeration when ``2**Q <= samples``). Pooling the seeds' McNemar counts
    instead would count one question several times as if independent. Returns ``diff`` (mean
    accuracy difference), ``p_value``, ``ci95`` (bootstrap over questions), the per-seed
    ``diffs`` and the pooled discordant counts ``b01`` / ``b10`` and ``n`` (= S * Q pairs)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be paired [seeds, questions] arrays, got shapes {a.shape} and {b.shape}")
    s_count, q = a.shape
    if q == 0 or s_count == 0:
        raise ValueError("seeds_paired_test: no questions or no seeds")
    d = (a.astype(np.float64) - b.astype(np.float64)).mean(axis=0)  # [Q]
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    if 2**q <= samples:  # every sign pattern once
        signs = 1.0 - 2.0 * ((np.arange(2**q)[:, None] >> np.arange(q)[None, :]) & 1)
        null = (signs * d).mean(axis=1)
        p = float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
    else:
        hits = 0
        for start in range(0, samples, 2000):
            k = min(2000, samples - start)
            signs = rng.choice(np.array([-1.0, 1.0]), size=(k, q))
            hits += int(np.count_nonzero(np.abs((signs * d).mean(axis=1)) >= abs(observed) - 1e-12))
        p = (1 + hits) / (1 + samples)
    boots = np.array([d[rng.integers(0, q, q)].mean() for _ in range(2000)])
    return {
        "diff": observed,
        "p_value": min(1.0, p),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "diffs": [float(x) for x in (a.astype(np.float64) - b.astype(np.float64)).mean(axis=1)],
        "b01": int(np.count_nonzero(~a & b)),
        "b10": int(np.count_nonzero(a & ~b)),
        "n": int(a.size),
        "seeds": s_count,
        "questions": q,
    }


# --------------------------------------------------------------------------- multiple comparisons


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; each capped at 1).

    Sorted ascending, the i-th smallest (0-based) is multiplied by ``m - i`` and the running
    maximum is taken, so adjusted values keep the order of the raw ones.
    """
    p = [float(x) for x in p_values]
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- verifier verdicts

_VERDICT_RE = re.compile(r"\b(incorrect|not\s+correct|wrong|correct|right)\b", re.IGNORECASE)
_VERDICT_LINE_RE = re.compile(r"verdict\s*[:：]", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """What a critique says of the answer it checks: True ("correct"), False ("incorrect", "not
    correct", "wrong") or None (no verdict).

    The first verdict word after the last ``Verdict:`` counts, else the first one anywhere (a
    critique states its verdict before explaining). Bounded: only the first 2,000 characters
    after that point are read.
    """
    if not isinstance(text, str):
        return None
    last = collections.deque(_VERDICT_LINE_RE.finditer(text), maxlen=1)
    segment = text[last[0].end() :] if last else text
    m = _VERDICT_RE.search(segment[:2000])
    if m is None:
        return None
    return m.group(1).lower() in ("correct", "right")


def verifier_confusion(answer_correct: Sequence[bool], verdicts: Sequence[bool | None]) -> dict[str, Any]:
    """Confusion matrix of verdicts against the checked answers' real correctness.

    Returns counts ``{right,wrong}_{says_correct,says_incorrect,no_verdict}``, ``n``,
    ``tpr`` = P(says correct | answer right), ``tnr`` = P(says incorrect | answer wrong) (no
    verdict counts as a miss in both) and ``balanced_accuracy`` = (tpr + tnr) / 2 (NaN parts when
    a class is empty: then the balanced accuracy is NaN), a class-weighted figure reported with the
    unweighted ``correct_verdicts`` (says correct of a right answer or incorrect of a wrong one)
    out of ``n`` beside it, plus ``says_correct_rate``.
    """
    if len(answer_correct) != len(verdicts):
        raise ValueError(f"{len(answer_correct)} answers but {len(verdicts)} verdicts")
    counts = {f"{a}_{v}": 0 for a in ("right", "wrong") for v in ("says_correct", "says_incorrect", "no_verdict")}
    for ok, verdict in zip(answer_correct, verdicts):
        v = "no_verdict" if verdict is None else ("says_correct" if verdict else "says_incorrect")
        counts[f"{'right' if ok else 'wrong'}_{v}"] += 1
    n_right = sum(counts[f"right_{v}"] for v in ("says_correct", "says_incorrect", "no_verdict"))
    n_wrong = sum(counts[f"wrong_{v}"] for v in ("says_correct", "says_incorrect", "no_verdict"))
    tpr = counts["right_says_correct"] / n_right if n_right else float("nan")
    tnr = counts["wrong_says_incorrect"] / n_wrong if n_wrong else float("nan")
    n = n_right + n_wrong
    return {
        **counts,
        "n": n,
        "tpr": tpr,
        "tnr": tnr,
        "balanced_accuracy": (tpr + tnr) / 2,
        "correct_verdicts": counts["right_says_correct"] + counts["wrong_says_incorrect"],
        "says_correct_rate": (counts["right_says_correct"] + counts["wrong_says_correct"]) / n if n else float("nan"),
    }
