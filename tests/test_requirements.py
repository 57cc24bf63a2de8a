"""Requirements judged with their uncertainty: the decision rules at the boundary, verdicts."""

from __future__ import annotations

import pytest

from covidnet_jax.intervals import Estimate, lower_bound
from covidnet_jax.metrics import compute_metrics
from covidnet_jax.typed_yaml import from_dict
from search.config import RequirementsConfig
from search.ledger.requirements import (
    describe_violations,
    final_verdicts,
    format_verdicts,
    is_feasible,
    judged_value,
    outcome_violations,
    verdict_of,
)

NAMES = ("normal", "pneumonia", "COVID-19")


def _reqs(**data) -> RequirementsConfig:
    return from_dict(RequirementsConfig, data, path="requirements")


def _metrics(correct_per_class: int, per_class: int = 100):
    """Each class: `correct_per_class` right, the rest called the next class."""
    k = len(NAMES)
    confusion = [[0] * k for _ in range(k)]
    for i in range(k):
        confusion[i][i] = correct_per_class
        confusion[i][(i + 1) % k] = per_class - correct_per_class
    return compute_metrics(confusion, NAMES)


def test_the_default_rule_is_the_lower_bound():
    assert RequirementsConfig().decision == "lower_bound"
    assert RequirementsConfig().confidence == 0.95


def test_point_rule_holds_exactly_at_the_minimum():
    metrics = _metrics(90)  # accuracy 270/300 = 0.9
    at = _reqs(min_accuracy=0.9, decision="point")
    assert outcome_violations(at, metrics) == {"accuracy": 0.0}
    above = _reqs(min_accuracy=0.9 + 1e-9, decision="point")
    assert outcome_violations(above, metrics)["accuracy"] == pytest.approx(1e-9)


def test_lower_bound_rule_holds_exactly_at_its_bound():
    metrics = _metrics(90)
    bound = lower_bound(270, 300, confidence=0.95)
    # Hand-computed Wilson, z = 1.6449: (0.9 + z^2/600) / (1 + z^2/300) - 0.02859 = 0.8678.
    assert bound == pytest.approx(0.8678, abs=1e-4)  # 3 points under 0.9 at n = 300
    at = _reqs(min_accuracy=bound)
    assert judged_value(at, metrics, "accuracy") == bound
    assert outcome_violations(at, metrics) == {"accuracy": 0.0}
    above = _reqs(min_accuracy=bound + 1e-9)
    assert not is_feasible(outcome_violations(above, metrics))
    # The same design meets 0.89 by its point estimate but not by its lower bound.
    assert is_feasible(outcome_violations(_reqs(min_accuracy=0.89, decision="point"), metrics))
    lower = outcome_violations(_reqs(min_accuracy=0.89), metrics)
    assert lower["accuracy"] == pytest.approx(0.89 - bound)
    assert describe_violations(lower, _reqs(min_accuracy=0.89)) == (
        f"accuracy {0.89 - bound:.3f} below minimum (95% lower bound)"
    )


def test_lower_bound_rule_uses_the_per_class_sample_sizes():
    # COVID-19 sensitivity 18/20 = 0.9 but its 95% lower bound is ~0.72: 20 images decide.
    confusion = [[100, 0, 0], [0, 100, 0], [0, 2, 18]]
    metrics = compute_metrics(confusion, NAMES)
    reqs = _reqs(classes={"COVID-19": {"min_sensitivity": 0.8}})
    assert outcome_violations(reqs, metrics)["sensitivity:COVID-19"] == pytest.approx(
        0.8 - lower_bound(18, 20, confidence=0.95)
    )
    exact = _reqs(classes={"COVID-19": {"min_sensitivity": 0.8}}, interval="clopper_pearson")
    # Clopper-Pearson is the more conservative: a larger shortfall.
    assert (
        outcome_violations(exact, metrics)["sensitivity:COVID-19"]
        > outcome_violations(reqs, metrics)["sensitivity:COVID-19"]
    )


def test_test_verdicts_met_not_met_inconclusive():
    assert verdict_of(Estimate.of(570, 600), 0.9, 0.95) == "met"  # 0.95, bound ~0.936
    assert verdict_of(Estimate.of(480, 600), 0.9, 0.95) == "not met"  # 0.80, upper ~0.826
    assert verdict_of(Estimate.of(27, 30), 0.87, 0.95) == "inconclusive"  # 0.90 on 30 images


def test_final_verdict_text_per_requirement():
    reqs = _reqs(min_accuracy=0.85, classes={"COVID-19": {"min_sensitivity": 0.9}})
    validation = _metrics(92)  # accuracy 0.92, COVID-19 sensitivity 0.92, n = 300 / 100
    test = compute_metrics([[98, 2, 0], [1, 97, 2], [4, 6, 90]], NAMES)
    reports = final_verdicts(reqs, validation, test)
    assert [r.name for r in reports] == ["accuracy", "sensitivity:COVID-19"]
    accuracy, covid = reports
    assert accuracy.verdict == "met" and accuracy.holds_on_validation
    assert covid.verdict == "inconclusive"  # 0.90 on 100 images against 0.90
    assert not covid.holds_on_validation  # lower bound of 92/100 is under 0.9
    text = format_verdicts(reports, reqs)
    lines = text.splitlines()
    assert "95% intervals" in lines[0] and "lower bound" in lines[0]
    assert lines[1].split()[:3] == ["accuracy", ">=", "0.850"]
    assert "val 0.920 [" in lines[1] and "(n=300)" in lines[1] and lines[1].endswith("met")
    assert "test 0.900 [" in lines[2] and lines[2].endswith("inconclusive")
    worse = final_verdicts(
        reqs, validation, compute_metrics([[60, 40, 0], [40, 60, 0], [0, 0, 100]], NAMES)
    )
    assert worse[0].verdict == "not met"
    assert format_verdicts(worse, reqs).splitlines()[1].endswith("not met")
    untested = final_verdicts(reqs, validation, None)
    assert untested[0].test is None and untested[0].verdict is None
    assert "test not scored" in format_verdicts(untested, reqs)
