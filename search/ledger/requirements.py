"""Design requirements: hard cost limits checked before training, outcome limits after.

Every requirement becomes a named, normalized violation: 0.0 when it holds, positive by how
much it fails (relative for cost limits, absolute for rates). Outcome rates are judged as
`requirements.decision` says: by their one-sided lower confidence bound (default) or by the
plain rate (`judged_value`). A design is feasible when all violations are 0. The same names
are set as Optuna constraints (`trial.set_constraint`), so TPE and NSGA-II rank infeasible
designs by how far they are from feasible. The final design's report states each
requirement on the validation and the test split with intervals and a verdict
(`final_verdicts`).

Example:
    >>> reqs = RequirementsConfig(max_macs=1e6, min_accuracy=0.8)
    >>> cost_violations(reqs, Cost(macs=2_000_000, params=10, activation_bytes=0))
    {'macs': 1.0}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from covidnet_jax.errors import ConfigError
from covidnet_jax.intervals import Estimate
from covidnet_jax.metrics import EvalMetrics
from search.config import RequirementsConfig

COST_NAMES: tuple[str, ...] = ("macs", "params", "activation_bytes")
"""Names of the hard cost limits' violations (the rest are outcome requirements)."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a candidate costs, known from its spec alone.

    Attributes:
        macs: multiply-accumulates of one forward pass on one image.
        params: number of parameters.
        activation_bytes: activation memory of one training step at the batch size.
    """

    macs: int
    params: int
    activation_bytes: int


def cost_violations(reqs: RequirementsConfig, cost: Cost) -> dict[str, float]:
    """Relative excess over each hard cost limit (`{"macs": 0.25}` is 25% over).

    Args:
        reqs: the requirements.
        cost: the candidate's cost.

    Returns:
        One entry per configured cost limit, 0.0 where it holds.
    """
    limits = (
        ("macs", reqs.max_macs, cost.macs),
        ("params", reqs.max_params, cost.params),
        ("activation_bytes", reqs.max_activation_bytes, cost.activation_bytes),
    )
    return {
        name: max(0.0, value / limit - 1.0) for name, limit, value in limits if limit is not None
    }


@dataclasses.dataclass(frozen=True)
class OutcomeRequirement:
    """One minimum on a validation rate.

    Attributes:
        name: the rate (`EvalMetrics.counts` names it): "accuracy", "sensitivity:<class>"
            or "ppv:<class>"; also the violation's and the Optuna constraint's name.
        minimum: the lowest acceptable rate.
    """

    name: str
    minimum: float


def outcome_requirements(reqs: RequirementsConfig) -> list[OutcomeRequirement]:
    """The outcome requirements in a fixed order (`accuracy`, `sensitivity:C`, `ppv:C`, ...)."""
    found = [] if reqs.min_accuracy is None else [OutcomeRequirement("accuracy", reqs.min_accuracy)]
    for class_name, req in reqs.classes.items():
        if req.min_sensitivity is not None:
            found.append(OutcomeRequirement(f"sensitivity:{class_name}", req.min_sensitivity))
        if req.min_ppv is not None:
            found.append(OutcomeRequirement(f"ppv:{class_name}", req.min_ppv))
    return found


def outcome_names(reqs: RequirementsConfig) -> list[str]:
    """Names of the outcome violations, in a fixed order (`accuracy`, `sensitivity:C`, ...)."""
    return [r.name for r in outcome_requirements(reqs)]


def judged_value(reqs: RequirementsConfig, metrics: EvalMetrics, name: str) -> float:
    """The figure a requirement on rate `name` is judged by, under `reqs.decision`.

    `point`: the rate itself. `lower_bound`: its one-sided lower confidence bound at
    `reqs.confidence` (`reqs.interval` method), which for 0 of 0 (a class never predicted,
    for PPV) is 0.
    """
    estimate = metrics.estimate(name, method=reqs.interval)
    if reqs.decision == "point":
        return estimate.value
    return estimate.lower_bound(reqs.confidence)


def outcome_violations(reqs: RequirementsConfig, metrics: EvalMetrics) -> dict[str, float]:
    """Shortfall of each outcome requirement on the validation metrics.

    The one definition of "an outcome requirement holds": strategies, successive halving,
    ranking, the final confirmation and the leaderboard all read these numbers.

    Args:
        reqs: the requirements (class names must be among `metrics.class_names`).
        metrics: validation metrics of the candidate.

    Returns:
        One entry per outcome requirement (see `outcome_names`): how far the judged value
        (`judged_value`) is below the minimum, 0.0 where it holds (a judged value exactly
        at the minimum holds).
    """
    return {
        r.name: max(0.0, r.minimum - judged_value(reqs, metrics, r.name))
        for r in outcome_requirements(reqs)
    }


def untrained_outcome_violations(reqs: RequirementsConfig) -> dict[str, float]:
    """Outcome violations of a design that was never trained: each requirement fully unmet."""
    found: dict[str, float] = {}
    if reqs.min_accuracy is not None:
        found["accuracy"] = reqs.min_accuracy
    for class_name, req in reqs.classes.items():
        if req.min_sensitivity is not None:
            found[f"sensitivity:{class_name}"] = req.min_sensitivity
        if req.min_ppv is not None:
            found[f"ppv:{class_name}"] = req.min_ppv
    return found


def check_class_names(reqs: RequirementsConfig, class_names: Sequence[str]) -> None:
    """Raises ConfigError unless every class named in the requirements is in the data.

    Args:
        reqs: the requirements.
        class_names: the data set's classes.
    """
    for name in reqs.classes:
        if name not in class_names:
            raise ConfigError(
                f"requirements.classes.{name}: no such class in the data; "
                f"expected one of {', '.join(class_names)}"
            )


def describe_violations(
    violations: Mapping[str, float], reqs: RequirementsConfig | None = None
) -> str:
    """A one-line reason naming the failed requirements, e.g. `macs +25% over limit`.

    With `reqs` deciding on lower bounds, outcome shortfalls say so
    (`accuracy 0.012 below minimum (95% lower bound)`).
    """
    basis = ""
    if reqs is not None and reqs.decision == "lower_bound":
        basis = f" ({reqs.confidence:.0%} lower bound)"
    parts = []
    for name, amount in violations.items():
        if amount <= 0:
            continue
        if name in COST_NAMES:
            parts.append(f"{name} {amount:+.0%} over limit")
        else:
            parts.append(f"{name} {amount:.3f} below minimum{basis}")
    return "; ".join(parts)


def is_feasible(violations: Mapping[str, float]) -> bool:
    """True when every violation is 0 (or there are none)."""
    return all(amount <= 0 for amount in violations.values())


Verdict = Literal["met", "not met", "inconclusive"]


def verdict_of(estimate: Estimate, minimum: float, confidence: float) -> Verdict:
    """Whether a split's estimate shows that a minimum holds.

    "met": the one-sided lower bound at `confidence` is at or above the minimum; "not met":
    the one-sided upper bound is below it; "inconclusive": the interval straddles it (the
    split is too small to tell).
    """
    if estimate.lower_bound(confidence) >= minimum:
        return "met"
    if estimate.upper_bound(confidence) < minimum:
        return "not met"
    return "inconclusive"


@dataclasses.dataclass(frozen=True)
class RequirementReport:
    """One outcome requirement of the final design, on validation and on test.

    Attributes:
        name: the rate, e.g. "accuracy" or "sensitivity:COVID-19".
        minimum: the requirement.
        validation: the validation estimate with its two-sided interval.
        test: the test estimate with its two-sided interval (None when not scored).
        judged: the figure the search decided by (`judged_value` on validation).
        holds_on_validation: whether the search's rule accepted it.
        verdict: on the test split (see `verdict_of`); None when not scored.
    """

    name: str
    minimum: float
    validation: Estimate
    test: Estimate | None
    judged: float
    holds_on_validation: bool
    verdict: Verdict | None

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe dict."""
        return {
            "name": self.name,
            "minimum": self.minimum,
            "validation": self.validation.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
            "judged": self.judged,
            "holds_on_validation": self.holds_on_validation,
            "verdict": self.verdict,
        }


def final_verdicts(
    reqs: RequirementsConfig, validation: EvalMetrics, test: EvalMetrics | None
) -> list[RequirementReport]:
    """Every outcome requirement of the final design on both splits, with a test verdict.

    Intervals are two-sided at `reqs.confidence`; the verdict uses one-sided bounds at the
    same confidence. The test split only reports here: nothing decides on it.
    """
    level, method = reqs.confidence, reqs.interval
    found = []
    for r in outcome_requirements(reqs):
        val = validation.estimate(r.name, level=level, method=method)
        tst = None if test is None else test.estimate(r.name, level=level, method=method)
        judged = judged_value(reqs, validation, r.name)
        found.append(
            RequirementReport(
                name=r.name,
                minimum=r.minimum,
                validation=val,
                test=tst,
                judged=judged,
                holds_on_validation=judged >= r.minimum,
                verdict=None if tst is None else verdict_of(tst, r.minimum, reqs.confidence),
            )
        )
    return found


def format_verdicts(reports: Sequence[RequirementReport], reqs: RequirementsConfig) -> str:
    """The final verdict for people: one line per requirement.

    Example line:
        `accuracy >= 0.870   val 0.912 [0.887, 0.932] (n=600)   test 0.897 [0.870, 0.919]
        (n=600)   met`
    """
    lines = [
        f"requirements ({reqs.confidence:.0%} intervals, {reqs.interval}; decided on validation"
        f" by {'the lower bound' if reqs.decision == 'lower_bound' else 'the point estimate'},"
        " test scored once):"
    ]
    width = max((len(r.name) for r in reports), default=8) + 10
    for r in reports:
        test = "test not scored" if r.test is None else f"test {r.test.format()}"
        lines.append(
            f"  {f'{r.name} >= {r.minimum:.3f}':<{width}} val {r.validation.format()}   {test}"
            f"   {r.verdict or '-'}"
        )
    return "\n".join(lines)
