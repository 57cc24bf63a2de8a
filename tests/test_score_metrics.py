"""AUROC with DeLong's interval and calibration, against hand computation and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidnet_jax.score_metrics import auroc, calibration, one_vs_rest_auroc, plot_reliability


def test_auroc_by_hand_with_a_tie():
    # Positives 0.9, 0.8, 0.4 against negatives 0.7, 0.3, 0.4: of the 9 pairs the positives
    # win 3 + 3 + 1 and tie 1 (0.4 against 0.4, counting half): 7.5 / 9.
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.4])
    positive = np.array([True, True, True, False, False, False])
    a = auroc(scores, positive)
    assert a.value == pytest.approx(7.5 / 9)
    assert (a.positives, a.negatives) == (3, 3)
    # DeLong's components by hand: per positive, the share of negatives it beats
    # (1, 1, 0.5); per negative, the share of positives above it (2/3, 1, 5/6).
    v10, v01 = np.array([1, 1, 0.5]), np.array([2 / 3, 1, 5 / 6])
    se = math.sqrt(v10.var(ddof=1) / 3 + v01.var(ddof=1) / 3)
    z = 1.959964
    logit = math.log(a.value / (1 - a.value))
    half = z * se / (a.value * (1 - a.value))
    assert a.low == pytest.approx(1 / (1 + math.exp(-(logit - half))), rel=1e-5)
    assert a.high == pytest.approx(1 / (1 + math.exp(-(logit + half))), rel=1e-5)
    assert 0 < a.low < a.value < a.high < 1


def test_auroc_matches_scikit_learn_and_covers_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400).astype(bool)
    scores = rng.normal(size=400) + 0.8 * labels
    a = auroc(scores, labels)
    assert a.value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert a.low < a.value < a.high
    # A wider level gives a wider interval.
    wide = auroc(scores, labels, level=0.99)
    assert wide.low < a.low and wide.high > a.high


def test_auroc_edge_cases():
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None
    perfect = auroc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False]))
    assert perfect.value == 1.0 and perfect.low == perfect.high == 1.0


def test_one_vs_rest_per_class():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 1])
    found = one_vs_rest_auroc(probs, labels, ("a", "b", "c"))
    assert found["a"].value == pytest.approx(roc_auc_score(labels == 0, probs[:, 0]))
    assert found["c"].positives == 1 and found["c"].negatives == 3


def test_calibration_by_hand(tmp_path):
    # Confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.65 (right) in 10 bins:
    # bin (0.9, 1]: confidence 0.95, accuracy 0.5; bin (0.5, 0.6]: 0.55 vs 1; (0.6, 0.7]: 0.65
    # vs 1. ECE = 2/4 * 0.45 + 1/4 * 0.45 + 1/4 * 0.35 = 0.425.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    cal = calibration(probs, labels, bins=10)
    assert cal.ece == pytest.approx(0.425)
    assert cal.count[9] == 2 and cal.count[5] == 1 and cal.count[6] == 1 and sum(cal.count) == 4
    assert cal.accuracy[9] == pytest.approx(0.5) and math.isnan(cal.accuracy[0])
    assert cal.to_dict()["accuracy"][0] is None
    png = plot_reliability(cal, tmp_path / "rel.png")
    assert png.stat().st_size > 1000
    perfect = calibration(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert perfect.ece == 0.0
