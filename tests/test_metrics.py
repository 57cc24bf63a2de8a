"""Metrics against hand-computed confusion matrices; NetScore against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covidnet_jax.metrics import EvalMetrics, check_selection_metric, compute_metrics, netscore

NAMES = ("normal", "pneumonia", "COVID-19")


def test_three_class_matrix_by_hand():
    # rows true, columns predicted
    confusion = [[8, 2, 0], [1, 6, 3], [0, 1, 9]]
    m = compute_metrics(confusion, NAMES, loss=0.5)
    assert m.count == 30
    assert m.accuracy == pytest.approx(23 / 30)
    assert m.sensitivity == pytest.approx((8 / 10, 6 / 10, 9 / 10))
    assert m.ppv == pytest.approx((8 / 9, 6 / 9, 9 / 12))
    assert m.sensitivity_of("COVID-19") == pytest.approx(0.9)
    assert m.ppv_of("COVID-19") == pytest.approx(0.75)
    assert m.ppv_undefined == () and m.sensitivity_undefined == ()
    assert m.warnings() == []
    assert m.loss == 0.5


def test_class_never_predicted_has_ppv_zero_and_is_listed():
    confusion = [[5, 0, 0], [2, 3, 0], [4, 1, 0]]  # COVID-19 never predicted
    m = compute_metrics(confusion, NAMES)
    assert not any(math.isnan(v) for v in (*m.ppv, *m.sensitivity, m.accuracy))
    assert m.ppv[2] == 0.0
    assert m.ppv_undefined == ("COVID-19",)
    assert m.sensitivity[2] == 0.0  # defined: 0 of 5 found
    assert m.sensitivity_undefined == ()
    assert m.ppv == pytest.approx((5 / 11, 3 / 4, 0.0))
    (note,) = m.warnings()
    assert "COVID-19" in note and "never predicted" in note


def test_class_absent_from_split_has_sensitivity_zero_and_is_listed():
    m = compute_metrics([[3, 1], [0, 0]], ("a", "b"))
    assert m.sensitivity == (0.75, 0.0)
    assert m.sensitivity_undefined == ("b",)
    assert m.ppv == (1.0, 0.0)  # b predicted once, never right
    assert m.ppv_undefined == ()


def test_round_trip_through_dict():
    m = compute_metrics([[2, 1], [0, 3]], ("a", "b"), loss=0.25)
    again = EvalMetrics.from_dict(m.to_dict())
    assert again.accuracy == m.accuracy and again.ppv == m.ppv and again.loss == 0.25
    np.testing.assert_array_equal(again.confusion, m.confusion)


def test_selection_values():
    m = compute_metrics([[8, 2, 0], [1, 6, 3], [0, 1, 9]], NAMES)
    assert m.selection_value("accuracy") == m.accuracy
    assert m.selection_value("sensitivity:COVID-19") == pytest.approx(0.9)
    assert m.selection_value("ppv:normal") == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match="'covid' in 'ppv:covid' is not one of"):
        m.selection_value("ppv:covid")


@pytest.mark.parametrize("bad", ["acc", "sensitivity", "recall:normal", "ppv:"])
def test_bad_selection_metric_names(bad):
    with pytest.raises(ValueError, match="expected 'accuracy'"):
        check_selection_metric(bad)


def test_bad_confusion_shape():
    with pytest.raises(ValueError, match="must be 3x3"):
        compute_metrics([[1, 2], [3, 4]], NAMES)


def test_netscore_matches_formula_and_paper_scale():
    # COVID-Net (CXR3-B): 93.3 %, 11.75 M params, 7.50 G MACs
    expected = 20 * math.log10(93.3**2 / (11.75**0.5 * 7.5**0.5))
    assert netscore(0.933, 11_750_000, 7_500_000_000) == pytest.approx(expected)
    assert netscore(0.0, 10, 10) == -math.inf
    with pytest.raises(ValueError):
        netscore(0.9, 0, 10)
