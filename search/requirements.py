"""Design requirements: hard cost limits checked before training, outcome limits after.

Every requirement becomes a named, normalized violation: 0.0 when it holds, positive by how
much it fails (relative for cost limits, absolute for rates). A design is feasible when all
violations are 0. The same names are set as Optuna constraints (`trial.set_constraint`), so
TPE and NSGA-II rank infeasible designs by how far they are from feasible.

Example:
    >>> reqs = RequirementsConfig(max_macs=1e6, min_accuracy=0.8)
    >>> cost_violations(reqs, Cost(macs=2_000_000, params=10, activation_bytes=0))
    {'macs': 1.0}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from covidnet_jax.errors import ConfigError
from covidnet_jax.metrics import EvalMetrics
from search.config import RequirementsConfig


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


def outcome_names(reqs: RequirementsConfig) -> list[str]:
    """Names of the outcome violations, in a fixed order (`accuracy`, `sensitivity:C`, ...)."""
    names = [] if reqs.min_accuracy is None else ["accuracy"]
    for class_name, req in reqs.classes.items():
        if req.min_sensitivity is not None:
            names.append(f"sensitivity:{class_name}")
        if req.min_ppv is not None:
            names.append(f"ppv:{class_name}")
    return names


def outcome_violations(reqs: RequirementsConfig, metrics: EvalMetrics) -> dict[str, float]:
    """Shortfall below each outcome requirement on the validation metrics.

    Args:
        reqs: the requirements (class names must be among `metrics.class_names`).
        metrics: validation metrics of the candidate.

    Returns:
        One entry per outcome requirement (see `outcome_names`), 0.0 where it holds.
    """
    found: dict[str, float] = {}
    if reqs.min_accuracy is not None:
        found["accuracy"] = max(0.0, reqs.min_accuracy - metrics.accuracy)
    for class_name, req in reqs.classes.items():
        if req.min_sensitivity is not None:
            value = metrics.sensitivity_of(class_name)
            found[f"sensitivity:{class_name}"] = max(0.0, req.min_sensitivity - value)
        if req.min_ppv is not None:
            found[f"ppv:{class_name}"] = max(0.0, req.min_ppv - metrics.ppv_of(class_name))
    return found


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


def describe_violations(violations: Mapping[str, float]) -> str:
    """A one-line reason naming the failed requirements, e.g. `macs +25% over limit`."""
    parts = []
    for name, amount in violations.items():
        if amount <= 0:
            continue
        if name in ("macs", "params", "activation_bytes"):
            parts.append(f"{name} {amount:+.0%} over limit")
        else:
            parts.append(f"{name} {amount:.3f} below minimum")
    return "; ".join(parts)


def is_feasible(violations: Mapping[str, float]) -> bool:
    """True when every violation is 0 (or there are none)."""
    return all(amount <= 0 for amount in violations.values())
