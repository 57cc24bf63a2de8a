"""Confidence intervals for the rates a finite split estimates (accuracy, sensitivity, PPV).

Every rate the framework reports is `successes / trials` over the images of one split: 145
validation images make one image worth 0.7 points of accuracy. This module turns such a count
into an interval and into the one-sided bounds that requirements are judged by.

Two methods, both exact at the ends (0/n and n/n never give a bound outside [0, 1]):

- `wilson` (the default): the Wilson score interval. Its coverage is close to nominal on
  average and it is never degenerate at 0/n or n/n (unlike the plain normal interval).
- `clopper_pearson`: the "exact" interval from beta quantiles; conservative (coverage at
  least nominal for every true rate), so wider.

A one-sided bound at confidence c is the end of the two-sided interval at level 2c - 1:
the 95% lower bound is the lower end of the 90% interval.

Example:
    >>> low, high = proportion_interval(4, 10, level=0.95)
    >>> round(low, 4), round(high, 4)
    (0.1682, 0.6873)
    >>> round(lower_bound(10, 10, confidence=0.95), 4)
    0.7871
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Literal

IntervalMethod = Literal["wilson", "clopper_pearson"]
METHODS: tuple[str, ...] = ("wilson", "clopper_pearson")


def _check(successes: int, trials: int, level: float, method: str) -> None:
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"expected 0 <= successes <= trials, got {successes} of {trials}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected a confidence level in (0, 1), got {level}")
    if method not in METHODS:
        raise ValueError(f"expected an interval method in {METHODS}, got {method!r}")


def proportion_interval(
    successes: int, trials: int, *, level: float = 0.95, method: IntervalMethod = "wilson"
) -> tuple[float, float]:
    """The two-sided confidence interval of a binomial proportion.

    Args:
        successes: events counted (e.g. correctly classified images).
        trials: images counted; 0 gives the uninformative interval (0, 1).
        level: coverage of the interval, e.g. 0.95.
        method: "wilson" or "clopper_pearson".

    Returns:
        (low, high), inside [0, 1].
    """
    _check(successes, trials, level, method)
    if trials == 0:
        return 0.0, 1.0
    alpha = 1.0 - level
    if method == "clopper_pearson":
        from scipy import stats  # imported here: scipy.stats costs ~1 s to import

        low = (
            0.0 if successes == 0 else stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
        )
        high = (
            1.0
            if successes == trials
            else stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
        )
        return float(low), float(high)
    z = statistics.NormalDist().inv_cdf(1.0 - alpha / 2)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # The exact ends: at 0/n the lower bound is 0 and at n/n the upper bound is 1.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def lower_bound(
    successes: int, trials: int, *, confidence: float = 0.95, method: IntervalMethod = "wilson"
) -> float:
    """The one-sided lower confidence bound: the rate is at least this with `confidence`."""
    return proportion_interval(successes, trials, level=2 * confidence - 1, method=method)[0]


def upper_bound(
    successes: int, trials: int, *, confidence: float = 0.95, method: IntervalMethod = "wilson"
) -> float:
    """The one-sided upper confidence bound: the rate is at most this with `confidence`."""
    return proportion_interval(successes, trials, level=2 * confidence - 1, method=method)[1]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A rate measured on a finite split, with its interval.

    Attributes:
        value: successes / trials (0.0 when trials is 0).
        successes: the count of events.
        trials: the sample size.
        low: lower end of the two-sided interval at `level`.
        high: upper end.
        level: the interval's coverage, e.g. 0.95.
        method: "wilson" or "clopper_pearson".
    """

    value: float
    successes: int
    trials: int
    low: float
    high: float
    level: float
    method: IntervalMethod

    @classmethod
    def of(
        cls, successes: int, trials: int, *, level: float = 0.95, method: IntervalMethod = "wilson"
    ) -> Estimate:
        """The estimate of `successes / trials` with its two-sided interval."""
        low, high = proportion_interval(successes, trials, level=level, method=method)
        value = successes / trials if trials else 0.0
        return cls(value, int(successes), int(trials), low, high, level, method)

    def lower_bound(self, confidence: float) -> float:
        """One-sided lower bound at `confidence` (same method)."""
        return lower_bound(self.successes, self.trials, confidence=confidence, method=self.method)

    def upper_bound(self, confidence: float) -> float:
        """One-sided upper bound at `confidence` (same method)."""
        return upper_bound(self.successes, self.trials, confidence=confidence, method=self.method)

    def format(self, digits: int = 3) -> str:
        """E.g. `0.917 [0.861, 0.952] (n=145)`."""
        return (
            f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
            f"(n={self.trials})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return dataclasses.asdict(self)
