"""Metrics of the predicted probabilities: one-vs-rest AUROC with its interval, calibration.

Accuracy, sensitivity and PPV judge the hard decision (the arg-max class). A radiology
reviewer also asks how well the scores *rank* cases (AUROC: the probability that a random
positive image scores above a random negative one, ties counting half) and whether a score of
0.8 means 80% (calibration). Both are computed on the host from the probabilities of a split.

- `auroc(scores, is_positive, level)`: the AUROC with DeLong's variance (DeLong et al. 1988,
  in the fast mid-rank form of Sun and Xu 2014) and a normal interval on the logit scale,
  which stays inside (0, 1); a single-class sample has no AUROC (None).
- `calibration(probs, labels, bins)`: the expected calibration error (ECE: the mean gap
  between confidence and accuracy over equal-width confidence bins, weighted by the images
  in each bin) with the bins for a reliability diagram (`plot_reliability`).

Example:
    >>> a = auroc(np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.4]), np.array([1, 1, 1, 0, 0, 0], bool))
    >>> round(a.value, 4)
    0.8333
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidnet_jax.figures import pyplot, save_figure


@dataclasses.dataclass(frozen=True)
class Auroc:
    """A one-vs-rest AUROC with its DeLong interval.

    Attributes:
        value: the AUROC (ties count half).
        low: lower end of the two-sided interval.
        high: upper end.
        level: the interval's coverage.
        positives: images of the class.
        negatives: images of the other classes.
    """

    value: float
    low: float
    high: float
    level: float
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return dataclasses.asdict(self)


def auroc(scores: np.ndarray, is_positive: np.ndarray, *, level: float = 0.95) -> Auroc | None:
    """The AUROC of `scores` for telling positives from negatives, with DeLong's interval.

    Args:
        scores: float (N,), higher means "more likely positive".
        is_positive: bool (N,).
        level: the interval's coverage.

    Returns:
        The estimate, or None when one of the two groups is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    x, y = scores[is_positive], scores[~is_positive]
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        return None
    from scipy.stats import rankdata  # imported here: scipy.stats costs ~1 s to import

    # Mid-ranks: the rank of a positive among all scores, minus its rank among the positives,
    # counts the negatives below it (ties half).
    combined = rankdata(np.concatenate([x, y]))
    v10 = (combined[:m] - rankdata(x)) / n  # per positive: share of negatives it beats
    v01 = 1.0 - (combined[m:] - rankdata(y)) / m  # per negative: share of positives above it
    value = float(v10.mean())
    variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (
        np.var(v01, ddof=1) / n if n > 1 else 0.0
    )
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    if variance <= 0 or value in (0.0, 1.0):
        # A perfect (or perfectly wrong) separation has no spread to estimate: report the
        # point; the sample sizes say how much it is worth.
        return Auroc(value, value, value, level, m, n)
    # The logit transform keeps the interval inside (0, 1) (delta method).
    logit = math.log(value / (1 - value))
    half = z * math.sqrt(variance) / (value * (1 - value))
    low, high = (1 / (1 + math.exp(-(logit + s * half))) for s in (-1, 1))
    return Auroc(value, low, high, level, m, n)


def one_vs_rest_auroc(
    probs_NxK: np.ndarray, labels_N: np.ndarray, class_names: Sequence[str], *, level: float = 0.95
) -> dict[str, Auroc | None]:
    """Per class, the AUROC of its probability for telling it from the other classes."""
    return {
        name: auroc(probs_NxK[:, k], labels_N == k, level=level)
        for k, name in enumerate(class_names)
    }


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Confidence against accuracy of the arg-max prediction, in equal-width bins.

    Attributes:
        ece: expected calibration error in [0, 1].
        edges: bin edges, bins + 1 values from 0 to 1.
        confidence: mean confidence per bin (NaN for empty bins).
        accuracy: accuracy per bin (NaN for empty bins).
        count: images per bin.
    """

    ece: float
    edges: tuple[float, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    count: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (empty bins as null)."""

        def clean(values: Sequence[float]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        return {
            "ece": self.ece,
            "edges": list(self.edges),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "count": list(self.count),
        }


def calibration(probs_NxK: np.ndarray, labels_N: np.ndarray, *, bins: int = 10) -> Calibration:
    """The ECE and reliability bins of the arg-max prediction.

    Args:
        probs_NxK: class probabilities per image.
        labels_N: the true class index per image.
        bins: equal-width confidence bins over [0, 1].
    """
    probs_NxK = np.asarray(probs_NxK, dtype=np.float64)
    confidence = probs_NxK.max(axis=1)
    correct = probs_NxK.argmax(axis=1) == np.asarray(labels_N)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds (edges[b], edges[b + 1]]; a confidence of exactly 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    n = len(confidence)
    ece = 0.0
    conf_b, acc_b, count_b = [], [], []
    for b in range(bins):
        member = which == b
        count = int(member.sum())
        count_b.append(count)
        if count == 0:
            conf_b.append(math.nan)
            acc_b.append(math.nan)
            continue
        c, a = float(confidence[member].mean()), float(correct[member].mean())
        conf_b.append(c)
        acc_b.append(a)
        ece += count / n * abs(a - c)
    return Calibration(
        float(ece), tuple(edges.tolist()), tuple(conf_b), tuple(acc_b), tuple(count_b)
    )


def plot_reliability(cal: Calibration, path: str | Path, *, title: str = "") -> Path:
    """Writes a reliability diagram (accuracy against confidence per bin, with counts)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    edges = np.asarray(cal.edges)
    width = edges[1:] - edges[:-1]
    accuracy = np.nan_to_num(np.asarray(cal.accuracy), nan=0.0)
    ax.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", color="#4c72b0",
           alpha=0.8, label="accuracy in bin")  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for left, w, count, acc in zip(edges[:-1], width, cal.count, accuracy, strict=True):
        if count:
            ax.text(left + w / 2, min(acc + 0.02, 0.97), str(count), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability, ECE {cal.ece:.3f} (numbers: images per bin)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
