"""Statistics in malt_jax.evaluation.stats against hand-computed / brute-force references (SciPy only as
an optional extra cross-check)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import malt_jax.evaluation.stats as ev
from malt_jax.evaluation.stats import (
    SystemResult,
    _binom_half_cdf,
    _binom_half_cdf_log,
    compare,
    majority_vote,
    mcnemar_exact,
    paired_bootstrap,
    wilson_interval,
)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_ref(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Textbook Wilson score interval (Wilson 1927), written independently of the library."""
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def mcnemar_ref(b01: int, b10: int) -> float:
    """Two-sided exact binomial test by enumerating the whole Binomial(n, 1/2) pmf: sum the
    probabilities of every outcome at most as likely as the observed one (scipy's definition)."""
    n = b01 + b10
    if n == 0:
        return 1.0
    pmf = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    obs = pmf[b01]
    return float(min(Fraction(1), sum(q for q in pmf if q <= obs)))


def _pair(b01: int, b10: int, both: int = 0, neither: int = 0, seed: int = 0):
    a = np.array([False] * b01 + [True] * b10 + [True] * both + [False] * neither)
    b = np.array([True] * b01 + [False] * b10 + [True] * both + [False] * neither)
    perm = np.random.default_rng(seed).permutation(a.size)
    return a[perm], b[perm]


# ----------------------------------------------------------------------------- majority vote


def test_majority_vote_basic_and_nones():
    assert majority_vote(["3", "4", "4", None]) == "4"
    assert majority_vote([None, None, "7"]) == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    # None never wins even when it is the most common entry
    assert majority_vote([None, None, None, "1", "2", "2"]) == "2"


def test_majority_vote_tie_breaks_on_first_occurrence():
    assert majority_vote(["7", "5", "5", "7"]) == "7"
    assert majority_vote(["5", "7", "7", "5"]) == "5"
    assert majority_vote([None, "b", "a"]) == "b"
    assert majority_vote(["x", "a", "b", "b", "a"]) == "a"  # x has count 1; a/b tied, a first


# ----------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (50, 100, (0.4038, 0.5962)),
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (1, 3, (0.0615, 0.7923)),
    ],
)
def test_wilson_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert round(lo, 4) == expected[0]
    assert round(hi, 4) == expected[1]


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 7), (17, 40), (999, 1000), (0, 10), (10, 10)])
def test_wilson_matches_formula(k, n):
    lo, hi = wilson_interval(k, n)
    rlo, rhi = wilson_ref(k, n)
    assert lo == pytest.approx(max(0.0, rlo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, rhi), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_edges_and_confidence():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    lo90, hi90 = wilson_interval(30, 60, confidence=0.90)
    lo99, hi99 = wilson_interval(30, 60, confidence=0.99)
    rlo, rhi = wilson_ref(30, 60, z=1.6448536269514722)
    assert (lo90, hi90) == pytest.approx((rlo, rhi), abs=1e-12)
    assert lo99 < lo90 and hi99 > hi90
    for bad in [(-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_wilson_vs_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 7), (50, 100), (10, 10), (123, 456)]:
        for conf in (0.9, 0.95, 0.99):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
            assert wilson_interval(k, n, conf) == pytest.approx((ci.low, ci.high), abs=1e-10)


# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("b01,b10", [(0, 0), (0, 1), (1, 0), (3, 3), (2, 9), (9, 2), (0, 12), (15, 16), (40, 10)])
def test_mcnemar_vs_enumeration(b01, b10):
    a, b = _pair(b01, b10, both=5, neither=4)
    out = mcnemar_exact(a, b)
    assert out["b01"] == b01 and out["b10"] == b10
    assert out["p_value"] == pytest.approx(mcnemar_ref(b01, b10), rel=1e-12)


def test_mcnemar_no_discordant_pairs():
    a = np.array([True, False, True])
    assert mcnemar_exact(a, a.copy()) == {"b01": 0, "b10": 0, "p_value": 1.0}
    assert mcnemar_exact(np.array([], bool), np.array([], bool))["p_value"] == 1.0


def test_mcnemar_large_counts_no_overflow():
    # n = 500 discordant pairs: 2**500 overflows float64 arithmetic done naively via comb/2**n.
    for b01, b10 in [(200, 300), (100, 400), (250, 250), (0, 500)]:
        a, b = _pair(b01, b10, both=30)
        p = mcnemar_exact(a, b)["p_value"]
        assert math.isfinite(p) and 0.0 <= p <= 1.0
        assert p == pytest.approx(mcnemar_ref(b01, b10), rel=1e-12)
    assert mcnemar_exact(*_pair(250, 250))["p_value"] == 1.0
    assert 0.0 < mcnemar_exact(*_pair(100, 400))["p_value"] < 1e-30


def test_binomial_log_path_matches_exact():
    # The log-space path (used for n > 20000) agrees with the exact integer path.
    for k, n in [(3, 10), (240, 500), (4000, 9000), (9950, 20000)]:
        assert _binom_half_cdf_log(k, n) == pytest.approx(_binom_half_cdf(k, n), rel=1e-9)
    assert _binom_half_cdf(14_800, 30_000) == pytest.approx(_binom_half_cdf_log(14_800, 30_000))


def test_mcnemar_vs_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b01, b10 in [(2, 9), (15, 16), (200, 300), (0, 7)]:
        expected = stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue
        assert mcnemar_exact(*_pair(b01, b10))["p_value"] == pytest.approx(expected, rel=1e-9)


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="not paired"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_identical_systems():
    a = np.random.default_rng(1).random(80) < 0.6
    out = paired_bootstrap(a, a.copy(), samples=500, seed=3)
    assert out == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0}


def test_bootstrap_clearly_better_system():
    rng = np.random.default_rng(0)
    b = rng.random(200) < 0.3
    a = b | (rng.random(200) < 0.5)  # a is right wherever b is, and on ~half of the rest
    out = paired_bootstrap(a, b, samples=2000, seed=0)
    assert out["diff"] == pytest.approx(a.mean() - b.mean())
    assert 0.0 < out["lo"] <= out["diff"] <= out["hi"]
    assert out["p_value"] < 0.01
    rev = paired_bootstrap(b, a, samples=2000, seed=0)  # sign flips, CI mirrored
    assert rev["diff"] == pytest.approx(-out["diff"])
    assert rev["hi"] < 0.0
    assert rev["p_value"] < 0.01


def test_bootstrap_p_value_definition():
    # One discordant question out of 10: 1 - (9/10)**10 of resamples contain it (diff > 0),
    # the rest have diff == 0, which counts as "other side": p = 2 * 0.9**10 ~ 0.697.
    a = np.array([True] + [False] * 9)
    b = np.zeros(10, bool)
    out = paired_bootstrap(a, b, samples=20000, seed=0)
    assert out["diff"] == pytest.approx(0.1)
    assert out["p_value"] == pytest.approx(2 * 0.9**10, abs=0.03)
    assert out["lo"] == 0.0


def test_bootstrap_deterministic_by_seed():
    rng = np.random.default_rng(5)
    a, b = rng.random(60) < 0.5, rng.random(60) < 0.4
    r1 = paired_bootstrap(a, b, samples=300, seed=11)
    r2 = paired_bootstrap(a, b, samples=300, seed=11)
    r3 = paired_bootstrap(a, b, samples=300, seed=12)
    assert r1 == r2
    assert (r1["lo"], r1["hi"], r1["p_value"]) != (r3["lo"], r3["hi"], r3["p_value"])


def test_bootstrap_errors():
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(0, bool), np.zeros(0, bool))
    with pytest.raises(ValueError, match="not paired"):
        paired_bootstrap(np.zeros(3, bool), np.zeros(2, bool))


# ----------------------------------------------------------------------------- SystemResult / compare


def test_system_result_properties():
    r = SystemResult("G", np.array([1, 0, 1, 1]), ["1", None, "3", "4"])
    assert r.correct.dtype == bool and r.n == 4
    assert r.accuracy == 0.75
    assert r.ci == wilson_interval(3, 4)
    assert math.isnan(SystemResult("empty", np.zeros(0, bool)).accuracy)
    with pytest.raises(ValueError, match="'bad'"):
        SystemResult("bad", np.array([True, False]), ["1"])


def test_compare_rows():
    rng = np.random.default_rng(2)
    base = rng.random(120) < 0.35
    malt = base | (rng.random(120) < 0.4)
    results = {
        "G": SystemResult("G", base),
        "MALT": SystemResult("MALT", malt),
        "MV": SystemResult("MV", base.copy()),
    }
    rows = compare(results, "MALT", ["G", "MV"], bootstrap_samples=400, seed=0)
    assert [(r["target"], r["baseline"]) for r in rows] == [("MALT", "G"), ("MALT", "MV")]
    row = rows[0]
    assert row["n"] == 120
    assert row["diff"] == pytest.approx(malt.mean() - base.mean())
    assert row["target_accuracy"] == pytest.approx(malt.mean())
    assert row["baseline_accuracy"] == pytest.approx(base.mean())
    mc = mcnemar_exact(malt, base)
    assert (row["b01"], row["b10"], row["mcnemar_p"]) == (mc["b01"], mc["b10"], mc["p_value"])
    assert row["b01"] == 0 and row["b10"] > 0
    bs = paired_bootstrap(malt, base, samples=400, seed=0)
    assert (row["bootstrap_lo"], row["bootstrap_hi"], row["bootstrap_p"]) == (bs["lo"], bs["hi"], bs["p_value"])
    assert rows[1] == {**rows[0], "baseline": "MV"}  # same data + same seed -> same numbers


def test_compare_unpaired_names_systems():
    results = {"MALT": SystemResult("MALT", np.ones(10, bool)), "G": SystemResult("G", np.ones(9, bool))}
    with pytest.raises(ValueError) as exc:
        compare(results, "MALT", ["G"], bootstrap_samples=10)
    assert "'MALT'" in str(exc.value) and "'G'" in str(exc.value)
    assert "n=10" in str(exc.value) and "n=9" in str(exc.value)


def test_compare_unknown_system():
    results = {"MALT": SystemResult("MALT", np.ones(3, bool))}
    with pytest.raises(ValueError, match="nope"):
        compare(results, "MALT", ["nope"])


# --------------------------------------------------------------------------- Holm, verdicts


def test_holm_against_hand_computed_values():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(., 2*0.03), max(., 1*0.04)
    assert ev.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ev.holm([0.2, 0.5]) == pytest.approx([0.4, 0.5])
    assert ev.holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1, order kept
    assert ev.holm([]) == []
    with pytest.raises(ValueError):
        ev.holm([1.5])


def test_holm_controls_family_wise_error_like_a_step_down_bonferroni():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 8))
        adj = ev.holm(p)
        order = np.argsort(p)
        assert all(a >= b - 1e-12 for a, b in zip(np.asarray(adj)[order][1:], np.asarray(adj)[order][:-1]))
        assert all(a >= q - 1e-12 for a, q in zip(adj, p))  # never below the raw value
        assert min(adj) == pytest.approx(min(1.0, len(p) * min(p)))  # smallest = Bonferroni


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("Verdict: correct. 28 + 9 = 37.", True),
        (" incorrect. The answer is 28.", False),
        ("The proposed answer is not correct; 8 x 7 = 56.", False),
        ("Verdict: wrong", False),
        ("It is right.", True),
        ("The solution says correct but Verdict: incorrect", False),  # the last Verdict: line counts
        ("28 + 9 = 37", None),
        ("incorrectly formatted", None),  # no verdict word on its own
        (None, None),
    ],
)
def test_parse_verdict(text, verdict):
    assert ev.parse_verdict(text) is verdict


def test_verifier_confusion_counts_and_balanced_accuracy():
    right = [True, True, True, False, False, False, False]
    said = [True, True, False, False, True, None, False]
    c = ev.verifier_confusion(right, said)
    assert (c["right_says_correct"], c["right_says_incorrect"], c["right_no_verdict"]) == (2, 1, 0)
    assert (c["wrong_says_correct"], c["wrong_says_incorrect"], c["wrong_no_verdict"]) == (1, 2, 1)
    assert c["tpr"] == pytest.approx(2 / 3) and c["tnr"] == pytest.approx(2 / 4)
    assert c["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert c["says_correct_rate"] == pytest.approx(3 / 7) and c["n"] == 7
    # a verifier that always agrees is at chance whatever the base rate
    assert ev.verifier_confusion([True] * 9 + [False], [True] * 10)["balanced_accuracy"] == 0.5
    assert np.isnan(ev.verifier_confusion([True, True], [True, False])["balanced_accuracy"])
    with pytest.raises(ValueError):
        ev.verifier_confusion([True], [])


def _sign_flip_reference(a, b):
    """Exact sign-flip p-value by enumerating every sign pattern with itertools (independent of
    the vectorised enumeration in ``seeds_paired_test``)."""
    import itertools

    d = (np.asarray(a, float) - np.asarray(b, float)).mean(axis=0)
    obs = abs(d.sum())
    patterns = list(itertools.product((-1.0, 1.0), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12 for signs in patterns) / len(patterns)


def test_seeds_paired_test_exact_enumeration_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((3, 9)) < 0.7
        b = rng.random((3, 9)) < 0.5
        out = ev.seeds_paired_test(a, b, samples=1024)
        assert out["p_value"] == pytest.approx(_sign_flip_reference(a, b))
        assert out["diff"] == pytest.approx(a.mean() - b.mean())
        assert out["diffs"] == pytest.approx(list(a.mean(axis=1) - b.mean(axis=1)))
        assert out["b01"] == int((~a & b).sum()) and out["b10"] == int((a & ~b).sum()) and out["n"] == 27
        assert ev.seeds_paired_test(b, a, samples=1024)["p_value"] == pytest.approx(out["p_value"])


def test_seeds_paired_test_monte_carlo_and_edges():
    rng = np.random.default_rng(0)
    a = rng.random((3, 500)) < 0.8
    b = rng.random((3, 500)) < 0.6
    strong = ev.seeds_paired_test(a, b, samples=4000)
    assert strong["p_value"] == pytest.approx(1 / 4001) and strong["ci95"][0] > 0.1
    same = ev.seeds_paired_test(a, a, samples=4000)
    assert same["p_value"] == 1.0 and same["diff"] == 0.0
    # a seed-independent baseline repeated over seeds and a system that ties it on average
    noisy = ev.seeds_paired_test(rng.random((3, 500)) < 0.6, np.tile(b[:1], (3, 1)), samples=4000)
    assert noisy["p_value"] > 0.01
    with pytest.raises(ValueError, match=r"\[seeds, questions\]"):
        ev.seeds_paired_test(a[0], b[0])
    with pytest.raises(ValueError, match="paired"):
        ev.seeds_paired_test(a, b[:, :10])
