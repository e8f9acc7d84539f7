"""Paired statistics for comparing two models that answered the same questions.

Every run of a sweep answers the same held-out questions, so two runs' errors are strongly
correlated: a hard question tends to be missed by both. Treating their accuracies as
independent samples overstates the noise of a difference. Here a model's results are a
per-question score array shaped (seeds, questions) - usually correctness 0/1, one row per
training seed - and two models are compared on the same question columns:

- `paired_bootstrap`: the difference mean(b) - mean(a), or the ratio mean(b) / mean(a)
  (retention), with a percentile confidence interval. Each replicate resamples the questions
  once for both models (keeping the pairing) and each model's seeds on their own (independent
  training runs), so the interval covers both question sampling and seed-to-seed variation.
- `mcnemar`: the exact two-sided McNemar test for one seed of each model.
- `verdict`: "holds", "fails" or "not resolved" for a claim about an interval.

numpy only (scipy is not a dependency of the project).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Stat = Literal["difference", "ratio"]
CHUNK = 1000
"""Bootstrap replicates drawn at once: bounds memory at a few (CHUNK x questions) arrays."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    stat: str
    """"difference" (mean(b) - mean(a)) or "ratio" (mean(b) / mean(a))."""
    estimate: float
    """The statistic on the data as observed (all seeds, all questions)."""
    low: float
    """Lower end of the percentile interval."""
    high: float
    """Upper end of the percentile interval."""
    level: float
    """Coverage of the interval, e.g. 0.95."""
    n_questions: int
    """Questions both models answered (the resampled unit shared by both)."""
    seeds: tuple[int, int]
    """Seeds (rows) of a and of b."""

    def __str__(self) -> str:
        pct = f"{100 * self.level:g}% CI"
        if self.stat == "ratio":
            half = 50 * (self.high - self.low)  # the interval's half-width, in points
            return (
                f"{100 * self.estimate:.1f}% ({pct} {100 * self.low:.1f} to "
                f"{100 * self.high:.1f}%, ±{half:.1f} points)"
            )
        return f"{self.estimate:+.3f} ({pct} {self.low:+.3f} to {self.high:+.3f})"


def _as_runs(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name}: expected per-question scores shaped (seeds, questions), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: scores must be finite (a missing answer is 0, not NaN)")
    return arr


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """How often each of n items is drawn, per replicate, when n are drawn with replacement."""
    draws = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(float)


def paired_bootstrap(
    a,
    b,
    *,
    stat: Stat = "difference",
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """mean(b) - mean(a) (`stat="difference"`) or mean(b) / mean(a) (`"ratio"`), with a
    percentile bootstrap interval of coverage `level`.

    `a`, `b`: per-question scores, shaped (seeds, questions) or (questions,) for one seed;
    column j of both must be the same question (see `vregion.eval.questions`). Scores are
    usually correctness 0/1 but may be any number per question (e.g. the accuracy drop on a
    question as layers are pruned). The seed counts of a and b may differ.

    Each replicate draws the questions with replacement once, for both models (the pairing),
    and each model's seeds with replacement independently (separately trained runs); a
    model's mean is over its drawn seeds and the drawn questions. Same inputs and `seed`: the
    same interval.
    """
    a, b = _as_runs(a, "a"), _as_runs(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a has {a.shape[1]} questions and b {b.shape[1]}: compare them on the same "
            "questions (align both by question id first)"
        )
    if stat not in ("difference", "ratio"):
        raise ValueError(f"stat: {stat!r} is not 'difference' or 'ratio'")
    if not 0 < level < 1:
        raise ValueError(f"level: {level} is not between 0 and 1")
    if n_boot < 1:
        raise ValueError(f"n_boot: {n_boot} must be at least 1")
    if stat == "ratio" and a.mean() == 0:
        raise ValueError("a ratio needs mean(a) > 0: a scored 0 on every question")

    def combine(mean_a, mean_b):
        if stat == "difference":
            return mean_b - mean_a
        with np.errstate(divide="ignore", invalid="ignore"):
            # a replicate where a scores 0 has an unbounded ratio: +inf keeps it at the top
            return np.where(mean_a > 0, mean_b / np.where(mean_a > 0, mean_a, 1.0), np.inf)

    n_q = a.shape[1]
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, CHUNK):
        rows = min(CHUNK, n_boot - start)
        questions = _counts(rng, rows, n_q) / n_q
        seeds_a = _counts(rng, rows, a.shape[0]) / a.shape[0]
        seeds_b = _counts(rng, rows, b.shape[0]) / b.shape[0]
        mean_a = ((seeds_a @ a) * questions).sum(1)
        mean_b = ((seeds_b @ b) * questions).sum(1)
        stats.append(combine(mean_a, mean_b))
    values = np.concatenate(stats)
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(
        stat=stat,
        estimate=float(combine(np.array(a.mean()), np.array(b.mean()))),
        low=float(low),
        high=float(high),
        level=level,
        n_questions=n_q,
        seeds=(a.shape[0], b.shape[0]),
    )


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two models' correctness on the same questions."""

    only_a: int
    """Questions a answered correctly and b did not."""
    only_b: int
    """Questions b answered correctly and a did not."""
    p_value: float
    """Two-sided exact (binomial) p-value; 1.0 when no question is discordant."""


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test for one seed of each model (question j = column j).

    Under "neither model is better", each discordant question (one right, the other wrong)
    is equally likely to go either way: the p-value is twice the binomial tail of the smaller
    discordant count, capped at 1.
    """
    a = np.asarray(a_correct)
    b = np.asarray(b_correct)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"mcnemar compares one seed of each model: two equal-length 1-D arrays, got "
            f"{a.shape} and {b.shape}"
        )
    for name, x in (("a_correct", a), ("b_correct", b)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name}: correctness must be 0/1 (or bool)")
    a, b = a.astype(bool), b.astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    # exact integer arithmetic: the tail sum over 2**n, divided once (correctly rounded)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p = min(1.0, 2 * tail / 2**n) if n else 1.0
    return McNemar(only_a, only_b, p)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a claim, with the interval that decided it."""

    outcome: str
    """"holds", "fails" or "not resolved"."""
    interval: Interval
    threshold: float
    direction: str

    def __str__(self) -> str:
        return f"{self.outcome}: {self.interval}"


def verdict(
    interval: Interval, *, threshold: float = 0.0, direction: Literal["above", "below"] = "above"
) -> Verdict:
    """Decide the claim "the statistic is above (or below) `threshold`" from its interval.

    It **holds** when every value in the interval satisfies the claim, **fails** when none
    does, and is **not resolved** when the interval straddles the threshold. So:

    - "b beats a": the difference interval, threshold 0, "above" - holds when the interval
      lies above 0, fails when it lies at or below 0 (identical results fail: no win).
    - "b keeps about r of a" (retention, tolerance tol): the ratio interval, threshold
      r - tol, "above" - holds when even the interval's low end is above r - tol.
    - "b is worse than a": the difference interval, threshold 0, "below".
    """
    if direction == "above":
        holds, fails = interval.low > threshold, interval.high <= threshold
    elif direction == "below":
        holds, fails = interval.high < threshold, interval.low >= threshold
    else:
        raise ValueError(f"direction: {direction!r} is not 'above' or 'below'")
    outcome = "holds" if holds else "fails" if fails else "not resolved"
    return Verdict(outcome, interval, threshold, direction)


def all_hold(verdicts: Iterable[Verdict]) -> str:
    """One outcome for a claim made of parts (e.g. "uniform beats every other rule"): holds
    when every part holds, fails when any part fails, else not resolved."""
    outcomes = [v.outcome for v in verdicts]
    if not outcomes:
        raise ValueError("all_hold: no verdicts to combine")
    if "fails" in outcomes:
        return "fails"
    return "holds" if all(o == "holds" for o in outcomes) else "not resolved"
