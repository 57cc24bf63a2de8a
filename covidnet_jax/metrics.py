"""Classification metrics from a confusion matrix: accuracy, sensitivity, PPV, NetScore.

Every rate is a count over a finite split, so each has an interval: `EvalMetrics.estimate(name)`
gives the value with its sample size and confidence interval (`covidnet_jax.intervals`), for
`accuracy`, `sensitivity:<class>`, `ppv:<class>` and `specificity:<class>`.

The confusion matrix is `confusion[true, predicted]` (rows are the true class, columns the
predicted class), counted over real examples only.

Undefined ratios are never NaN. A class that is never predicted has no defined PPV
(precision, 0 / 0); a class absent from the split has no defined sensitivity (recall).
Both are reported as 0.0 and the class is listed in `ppv_undefined` /
`sensitivity_undefined`, and `warnings()` says so. 0.0 is the conservative choice for
requirements such as "COVID-19 PPV >= 0.85": a model that never predicts COVID-19 fails it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from covidnet_jax.intervals import Estimate, IntervalMethod

_SELECTION_RE = re.compile(r"^(accuracy|(sensitivity|ppv):(.+))$")
_RATE_RE = re.compile(r"^(accuracy|(sensitivity|ppv|specificity):(.+))$")


def check_selection_metric(name: str, class_names: Sequence[str] | None = None) -> None:
    """Raises ValueError unless `name` is `accuracy`, `sensitivity:<class>` or `ppv:<class>`.

    Args:
        name: the metric name, e.g. "sensitivity:COVID-19".
        class_names: when given, the class in the name must be one of them.
    """
    match = _SELECTION_RE.match(name)
    if match is None:
        raise ValueError(
            f"expected 'accuracy', 'sensitivity:<class>' or 'ppv:<class>', got {name!r}"
        )
    class_name = match.group(3)
    if class_names is not None and class_name is not None and class_name not in class_names:
        raise ValueError(f"class {class_name!r} in {name!r} is not one of {', '.join(class_names)}")


@dataclasses.dataclass(frozen=True, eq=False)  # holds an array: compare `to_dict()`s
class EvalMetrics:
    """Metrics of one evaluation.

    Attributes:
        class_names: K class names, in label order.
        confusion: int64 KxK, `confusion[true, predicted]`.
        accuracy: fraction correct in [0, 1].
        sensitivity: K recalls (0.0 where undefined, see module docstring).
        ppv: K precisions (0.0 where undefined).
        sensitivity_undefined: classes with no true examples.
        ppv_undefined: classes that were never predicted.
        loss: mean (unweighted) cross-entropy, when computed.
    """

    class_names: tuple[str, ...]
    confusion: np.ndarray
    accuracy: float
    sensitivity: tuple[float, ...]
    ppv: tuple[float, ...]
    sensitivity_undefined: tuple[str, ...]
    ppv_undefined: tuple[str, ...]
    loss: float | None = None

    @property
    def count(self) -> int:
        """The number of examples evaluated."""
        return int(self.confusion.sum())

    def sensitivity_of(self, class_name: str) -> float:
        """The sensitivity (recall) of one class, by name."""
        return self.sensitivity[self.class_names.index(class_name)]

    def ppv_of(self, class_name: str) -> float:
        """The PPV (precision) of one class, by name."""
        return self.ppv[self.class_names.index(class_name)]

    def specificity_of(self, class_name: str) -> float:
        """One-vs-rest specificity of a class: true negatives over all negatives."""
        successes, trials = self.counts(f"specificity:{class_name}")
        return successes / trials if trials else 0.0

    def counts(self, name: str) -> tuple[int, int]:
        """(successes, trials) behind a rate, e.g. `counts("ppv:COVID-19")`.

        Args:
            name: "accuracy", "sensitivity:<class>", "ppv:<class>" or "specificity:<class>".

        Returns:
            The numerator and the sample size the rate is computed over (the images of
            the class for sensitivity, the images predicted as the class for PPV, the
            images not of the class for specificity).
        """
        match = _RATE_RE.match(name)
        if match is None:
            raise ValueError(
                "expected 'accuracy', 'sensitivity:<class>', 'ppv:<class>' or "
                f"'specificity:<class>', got {name!r}"
            )
        matrix = self.confusion
        if name == "accuracy":
            return int(np.trace(matrix)), int(matrix.sum())
        kind, class_name = match.group(2), match.group(3)
        if class_name not in self.class_names:
            raise ValueError(
                f"class {class_name!r} in {name!r} is not one of {', '.join(self.class_names)}"
            )
        i = self.class_names.index(class_name)
        hit = int(matrix[i, i])
        if kind == "sensitivity":
            return hit, int(matrix[i].sum())
        if kind == "ppv":
            return hit, int(matrix[:, i].sum())
        negatives = int(matrix.sum() - matrix[i].sum())
        false_positives = int(matrix[:, i].sum()) - hit
        return negatives - false_positives, negatives

    def estimate(
        self, name: str, *, level: float = 0.95, method: IntervalMethod = "wilson"
    ) -> Estimate:
        """A rate with its sample size and two-sided confidence interval.

        Args:
            name: see `counts`.
            level: the interval's coverage.
            method: "wilson" or "clopper_pearson".
        """
        successes, trials = self.counts(name)
        return Estimate.of(successes, trials, level=level, method=method)

    def rate_names(self) -> list[str]:
        """Every rate `estimate` knows, accuracy first, then per class."""
        names = ["accuracy"]
        for kind in ("sensitivity", "ppv", "specificity"):
            names.extend(f"{kind}:{c}" for c in self.class_names)
        return names

    def intervals(
        self, *, level: float = 0.95, method: IntervalMethod = "wilson"
    ) -> dict[str, dict[str, Any]]:
        """Every rate's estimate as plain data: `{name: {value, successes, trials, low, ...}}`."""
        return {
            name: self.estimate(name, level=level, method=method).to_dict()
            for name in self.rate_names()
        }

    def selection_value(self, name: str) -> float:
        """The value of a selection metric (higher is better).

        Args:
            name: "accuracy", "sensitivity:<class>" or "ppv:<class>".
        """
        check_selection_metric(name, self.class_names)
        if name == "accuracy":
            return self.accuracy
        kind, _, class_name = name.partition(":")
        return self.sensitivity_of(class_name) if kind == "sensitivity" else self.ppv_of(class_name)

    def warnings(self) -> list[str]:
        """Human-readable notes about undefined ratios (empty when all are defined)."""
        notes = []
        if self.ppv_undefined:
            notes.append(
                "PPV undefined (class never predicted), reported as 0.0: "
                + ", ".join(self.ppv_undefined)
            )
        if self.sensitivity_undefined:
            notes.append(
                "sensitivity undefined (class absent from the split), reported as 0.0: "
                + ", ".join(self.sensitivity_undefined)
            )
        return notes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (per-class values keyed by class name)."""
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "loss": self.loss,
            "sensitivity": dict(zip(self.class_names, self.sensitivity, strict=True)),
            "ppv": dict(zip(self.class_names, self.ppv, strict=True)),
            "specificity": {c: self.specificity_of(c) for c in self.class_names},
            "sensitivity_undefined": list(self.sensitivity_undefined),
            "ppv_undefined": list(self.ppv_undefined),
            "class_names": list(self.class_names),
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalMetrics:
        """The inverse of `to_dict`."""
        return compute_metrics(data["confusion"], data["class_names"], loss=data.get("loss"))


def compute_metrics(
    confusion: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    *,
    loss: float | None = None,
) -> EvalMetrics:
    """Accuracy, per-class sensitivity and PPV from a confusion matrix.

    Args:
        confusion: KxK counts, `confusion[true, predicted]`.
        class_names: K names.
        loss: optional mean loss to carry along.

    Returns:
        The metrics; undefined ratios are 0.0 and listed (never NaN).

    Example:
        >>> m = compute_metrics([[2, 0], [1, 1]], ["a", "b"])
        >>> m.accuracy, m.sensitivity, m.ppv
        (0.75, (1.0, 0.5), (0.6666666666666666, 1.0))
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    names = tuple(class_names)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(names):
        raise ValueError(
            f"confusion must be {len(names)}x{len(names)} for classes {names}, got {matrix.shape}"
        )
    if (matrix < 0).any():
        raise ValueError("confusion counts must be non-negative")
    diagonal = np.diag(matrix).astype(np.float64)
    true_counts = matrix.sum(axis=1)
    predicted_counts = matrix.sum(axis=0)
    total = int(matrix.sum())
    sensitivity = tuple(
        float(d / n) if n > 0 else 0.0 for d, n in zip(diagonal, true_counts, strict=True)
    )
    ppv = tuple(
        float(d / n) if n > 0 else 0.0 for d, n in zip(diagonal, predicted_counts, strict=True)
    )
    return EvalMetrics(
        class_names=names,
        confusion=matrix,
        accuracy=float(diagonal.sum() / total) if total > 0 else 0.0,
        sensitivity=sensitivity,
        ppv=ppv,
        sensitivity_undefined=tuple(n for n, c in zip(names, true_counts, strict=True) if c == 0),
        ppv_undefined=tuple(n for n, c in zip(names, predicted_counts, strict=True) if c == 0),
        loss=None if loss is None else float(loss),
    )


def netscore(accuracy: float, params: int, macs: int) -> float:
    """NetScore = 20 * log10(acc^2 / (params_M^0.5 * MACs_G^0.5)), accuracy in percent.

    Args:
        accuracy: fraction in [0, 1] (converted to percent here).
        params: number of parameters.
        macs: multiply-accumulates of one forward pass.

    Returns:
        The score in dB; -inf for zero accuracy.
    """
    if params <= 0 or macs <= 0:
        raise ValueError(f"params and macs must be positive, got {params} and {macs}")
    percent = 100.0 * accuracy
    if percent <= 0:
        return -math.inf
    return 20.0 * math.log10(percent**2 / (math.sqrt(params / 1e6) * math.sqrt(macs / 1e9)))
