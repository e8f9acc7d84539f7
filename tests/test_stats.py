"""Paired statistics: known answers, the pairing narrowing the interval, exact McNemar values,
and verdicts that follow the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vregion.eval.stats import Interval, all_hold, mcnemar, paired_bootstrap, verdict


def _correct(rng, p: float, n: int) -> np.ndarray:
    return (rng.random(n) < p).astype(int)


def test_identical_results_differ_by_exactly_zero():
    a = _correct(np.random.default_rng(0), 0.6, 300)
    ci = paired_bootstrap(a, a.copy(), n_boot=500)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)
    ratio = paired_bootstrap(a, a.copy(), stat="ratio", n_boot=500)
    assert ratio.estimate == pytest.approx(1.0) and ratio.low == pytest.approx(1.0)
    assert ratio.high == pytest.approx(1.0)


def test_a_clear_win_lies_above_zero_and_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    a = _correct(rng, 0.55, 400)
    b = np.where(rng.random(400) < 0.25, 1, a)  # b fixes a quarter of the questions
    ci = paired_bootstrap(a, b, n_boot=4000, seed=3)
    d = b - a
    assert ci.estimate == pytest.approx(d.mean())
    assert 0 < ci.low < ci.estimate < ci.high
    # one seed each: the bootstrap approximates the paired normal interval mean(d) +- 1.96 se
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    assert verdict(ci).outcome == "holds"
    assert verdict(paired_bootstrap(b, a, n_boot=2000)).outcome == "fails"  # the other way


def test_pairing_narrows_the_interval():
    """Two models that agree on most questions: the same gap is resolved when paired and not
    when the pairing is broken (b's questions shuffled, as if they were other questions)."""
    rng = np.random.default_rng(2)
    a = _correct(rng, 0.6, 600)
    b = a.copy()
    wrong = np.flatnonzero(a == 0)
    b[rng.choice(wrong, 24, replace=False)] = 1  # b = a plus 24 more right: +0.04
    paired = paired_bootstrap(a, b, n_boot=3000, seed=0)
    unpaired = paired_bootstrap(a, rng.permutation(b), n_boot=3000, seed=0)
    assert paired.estimate == pytest.approx(unpaired.estimate) == pytest.approx(0.04)
    assert (paired.high - paired.low) < 0.4 * (unpaired.high - unpaired.low)
    assert verdict(paired).outcome == "holds"
    assert verdict(unpaired).outcome == "not resolved"


def test_seeds_add_their_spread_and_counts_may_differ():
    rng = np.random.default_rng(4)
    base = _correct(rng, 0.6, 300)
    a = base[None, :]  # one seed
    # three seeds of b that disagree a lot with each other (their accuracies 0.5 to 0.8)
    b = np.stack([np.where(rng.random(300) < s, 1 - base, base) for s in (0.05, 0.2, 0.35)])
    one_seed = paired_bootstrap(a, b[:1], n_boot=2000)
    three = paired_bootstrap(a, b, n_boot=2000)
    assert three.seeds == (1, 3) and three.n_questions == 300
    assert three.estimate == pytest.approx(b.mean() - a.mean())
    assert (three.high - three.low) > 1.5 * (one_seed.high - one_seed.low)


def test_same_seed_same_interval_and_ratio_is_retention():
    rng = np.random.default_rng(5)
    a, b = _correct(rng, 0.7, (3, 200)), _correct(rng, 0.65, (2, 200))
    first = paired_bootstrap(a, b, stat="ratio", n_boot=2500, seed=7)
    assert paired_bootstrap(a, b, stat="ratio", n_boot=2500, seed=7) == first
    assert paired_bootstrap(a, b, stat="ratio", n_boot=2500, seed=8) != first
    assert first.estimate == pytest.approx(b.mean() / a.mean())
    assert first.low < first.estimate < first.high
    assert str(first).startswith(f"{100 * first.estimate:.1f}% (95% CI ")
    half = 50 * (first.high - first.low)
    assert str(first).endswith(f"%, ±{half:.1f} points)")  # the width a claim needs, in points


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="mean\\(a\\) > 0"):
        paired_bootstrap(np.zeros(5), np.ones(5), stat="ratio")
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0, 2], [1, 1])


def test_mcnemar_exact_values():
    # a alone right on 1 question, b alone on 9, 20 agree: p = 2 (C(10,0) + C(10,1)) / 2^10
    a = np.array([1] * 1 + [0] * 9 + [1] * 10 + [0] * 10)
    b = np.array([0] * 1 + [1] * 9 + [1] * 10 + [0] * 10)
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b) == (1, 9)
    assert test.p_value == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar(b, a).p_value == test.p_value  # symmetric
    assert mcnemar(a, a).p_value == 1.0  # nothing discordant
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1]).p_value == 1.0  # 2 vs 2: capped at 1


def test_mcnemar_agrees_with_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(6)
    for _ in range(5):
        a, b = _correct(rng, 0.6, 500), _correct(rng, 0.55, 500)
        test = mcnemar(a, b)
        n = test.only_a + test.only_b
        expected = stats.binomtest(test.only_a, n, 0.5).pvalue
        assert test.p_value == pytest.approx(expected, rel=1e-9)


def _interval(low: float, high: float) -> Interval:
    return Interval("difference", (low + high) / 2, low, high, 0.95, 100, (1, 1))


@pytest.mark.parametrize(
    ("low", "high", "threshold", "direction", "outcome"),
    [
        (0.01, 0.03, 0.0, "above", "holds"),
        (-0.01, 0.03, 0.0, "above", "not resolved"),
        (-0.03, -0.01, 0.0, "above", "fails"),
        (0.0, 0.0, 0.0, "above", "fails"),  # exactly equal: no win
        (0.975, 1.01, 0.97, "above", "holds"),  # retention within 2 points of 0.99
        (0.95, 1.01, 0.97, "above", "not resolved"),
        (-0.03, -0.01, 0.0, "below", "holds"),
        (0.01, 0.03, 0.0, "below", "fails"),
    ],
)
def test_verdict_follows_the_interval(low, high, threshold, direction, outcome):
    v = verdict(_interval(low, high), threshold=threshold, direction=direction)
    assert v.outcome == outcome
    assert str(v).startswith(f"{outcome}: ") and "95% CI" in str(v)


def test_all_hold_combines_parts():
    holds, unresolved, fails = (
        verdict(_interval(lo, hi)) for lo, hi in [(0.1, 0.2), (-0.1, 0.2), (-0.2, -0.1)]
    )
    assert all_hold([holds, holds]) == "holds"
    assert all_hold([holds, unresolved]) == "not resolved"
    assert all_hold([holds, unresolved, fails]) == "fails"
