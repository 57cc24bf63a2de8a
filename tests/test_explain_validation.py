"""The lesion-localization scoring of bench/explain_validation.py: pointing game, heat mass,
the random-map baseline and the lesion set read from the synthetic data's masks.

The scoring is benchmark code (it lives in bench/, not in the library); this file loads it
from there, and `test_explain_trained.py` uses it to score a trained model's heatmaps.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest


def _load_bench_module(name: str):
    """Imports bench/<name>.py (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


explain_validation = _load_bench_module("explain_validation")


def test_lesion_hit_rates_by_hand():
    mask = np.zeros((2, 4, 4), bool)
    mask[:, :2, :2] = True
    heat = np.zeros((2, 4, 4))
    heat[0, 0, 0], heat[0, 3, 3] = 1.0, 0.5  # peak inside, 2/3 of the mass inside
    heat[1, 3, 3], heat[1, 1, 1] = 1.0, 1.0 / 3  # peak outside, 1/4 of the mass inside
    rates = explain_validation.lesion_hit_rates(heat, mask)
    assert rates.count == 2
    assert rates.pointing == pytest.approx(0.5)
    assert rates.mass == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert explain_validation.lesion_hit_rates(np.zeros((1, 4, 4)), mask[:1]).pointing == 0.0
    with pytest.raises(ValueError, match="one shape"):
        explain_validation.lesion_hit_rates(heat, mask[:, :3])


def test_random_maps_hit_as_often_as_the_lesion_is_large():
    mask = np.zeros((4, 20, 20), bool)
    mask[:, 5:15, 0:8] = True  # 20 % of the image
    rates = explain_validation.random_map_rates(mask, seed=0, draws=200)
    assert rates.pointing == pytest.approx(0.2, abs=0.03)
    assert rates.mass == pytest.approx(0.2, abs=0.01)


def test_lesion_set_pairs_images_with_their_masks(tmp_path):
    from covidnet_jax.data import write_synthetic_dataset
    from covidnet_jax.errors import DataError

    write_synthetic_dataset(tmp_path / "synth", per_class=6, image_size=48, seed=0)
    names = ("normal", "pneumonia", "COVID-19")
    lesions = explain_validation.load_lesion_set(
        tmp_path / "synth", resolution=32, channels=3, class_names=names, split="train"
    )
    count = len(lesions.paths)
    assert count > 0 and lesions.images_BxHxWxC.shape == (count, 32, 32, 3)
    assert lesions.masks_BxHxW.shape == (count, 32, 32)
    assert lesions.masks_BxHxW.any(axis=(1, 2)).all()
    assert set(lesions.labels_B.tolist()) <= {1, 2}  # normal images have no lesion
    assert lesions.class_names == names
    assert lesions.images_BxHxWxC.min() >= 0.0 and lesions.images_BxHxWxC.max() <= 1.0
    shutil.copytree(tmp_path / "synth", tmp_path / "bare", ignore=shutil.ignore_patterns("masks"))
    with pytest.raises(DataError, match="no masks/ folder"):
        explain_validation.load_lesion_set(
            tmp_path / "bare", resolution=32, channels=1, class_names=names
        )
    with pytest.raises(DataError, match="split must be"):
        explain_validation.load_lesion_set(
            tmp_path / "synth", resolution=32, channels=1, class_names=names, split="val"
        )
