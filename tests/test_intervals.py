"""Confidence intervals against published values, and rates' counts from a confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from covidnet_jax.intervals import Estimate, lower_bound, proportion_interval, upper_bound
from covidnet_jax.metrics import compute_metrics

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I:
# (successes, trials) -> Wilson score interval and Clopper-Pearson ("exact") interval, 95%.
NEWCOMBE = [
    ((81, 263), (0.2553, 0.3662), (0.2527, 0.3676)),
    ((15, 148), (0.0624, 0.1605), (0.0578, 0.1617)),
    ((0, 20), (0.0, 0.1611), (0.0, 0.1684)),
    ((1, 29), (0.0061, 0.1718), (0.0009, 0.1776)),
]


@pytest.mark.parametrize(("counts", "wilson", "exact"), NEWCOMBE)
def test_intervals_match_newcombes_table(counts, wilson, exact):
    assert proportion_interval(*counts, method="wilson") == pytest.approx(wilson, abs=6e-5)
    assert proportion_interval(*counts, method="clopper_pearson") == pytest.approx(exact, abs=6e-5)


@pytest.mark.parametrize("trials", [1, 7, 30, 145])
def test_intervals_match_scipy_for_every_count(trials):
    for successes in range(trials + 1):
        ref = binomtest(successes, trials)
        for method, name in (("wilson", "wilson"), ("clopper_pearson", "exact")):
            ci = ref.proportion_ci(confidence_level=0.9, method=name)
            got = proportion_interval(successes, trials, level=0.9, method=method)
            assert got == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_ends_are_exact_at_zero_and_all():
    # 0/n: the lower bound is exactly 0; n/n: the upper bound is exactly 1 (both methods).
    for method in ("wilson", "clopper_pearson"):
        low, high = proportion_interval(0, 10, method=method)
        assert low == 0.0 and 0.2 < high < 0.35
        low, high = proportion_interval(10, 10, method=method)
        assert high == 1.0 and 0.65 < low < 0.8
    # Hand-computed Wilson 95% at 0/10: z^2 / (n + z^2) with z = 1.959964.
    z2 = 1.959964**2
    assert proportion_interval(0, 10)[1] == pytest.approx(z2 / (10 + z2), abs=1e-6)
    # No data: the uninformative interval.
    assert proportion_interval(0, 0) == (0.0, 1.0)


def test_one_sided_bounds_are_ends_of_the_two_sided_interval_at_2c_minus_1():
    assert lower_bound(90, 100, confidence=0.95) == proportion_interval(90, 100, level=0.9)[0]
    assert upper_bound(90, 100, confidence=0.95) == proportion_interval(90, 100, level=0.9)[1]
    # Hand-computed one-sided Wilson bound at 10/10, z = 1.644854: n / (n + z^2).
    z2 = 1.644854**2
    assert lower_bound(10, 10, confidence=0.95) == pytest.approx(10 / (10 + z2), abs=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="successes <= trials"):
        proportion_interval(5, 4)
    with pytest.raises(ValueError, match="confidence level"):
        proportion_interval(1, 4, level=1.0)
    with pytest.raises(ValueError, match="interval method"):
        proportion_interval(1, 4, method="normal")  # type: ignore[arg-type]


def test_estimate_carries_its_sample_size():
    e = Estimate.of(131, 145)
    assert e.value == pytest.approx(131 / 145) and e.trials == 145
    assert e.low < e.value < e.high
    assert e.format() == f"0.903 [{e.low:.3f}, {e.high:.3f}] (n=145)"
    assert e.lower_bound(0.95) > e.low  # one-sided 95% is the two-sided 90% end


def test_counts_behind_every_rate():
    # rows true, columns predicted
    m = compute_metrics([[8, 2, 0], [1, 6, 3], [0, 1, 9]], ("normal", "pneumonia", "COVID-19"))
    assert m.counts("accuracy") == (23, 30)
    assert m.counts("sensitivity:COVID-19") == (9, 10)
    assert m.counts("ppv:COVID-19") == (9, 12)
    # COVID-19 specificity: 20 non-COVID images, 3 of them called COVID-19.
    assert m.counts("specificity:COVID-19") == (17, 20)
    assert m.specificity_of("normal") == pytest.approx(19 / 20)
    assert m.to_dict()["specificity"]["COVID-19"] == pytest.approx(17 / 20)
    assert m.estimate("ppv:COVID-19").trials == 12
    intervals = m.intervals(level=0.9)
    assert set(intervals) == set(m.rate_names()) and len(intervals) == 1 + 3 * 3
    assert intervals["accuracy"]["level"] == 0.9
    with pytest.raises(ValueError, match="not one of"):
        m.counts("ppv:covid")
    with pytest.raises(ValueError, match="expected"):
        m.counts("f1:COVID-19")
    # A class never predicted: PPV is 0 of 0, and its interval says nothing.
    never = compute_metrics(np.array([[5, 0], [3, 0]]), ("a", "b"))
    assert never.counts("ppv:b") == (0, 0)
    assert (never.estimate("ppv:b").low, never.estimate("ppv:b").high) == (0.0, 1.0)
