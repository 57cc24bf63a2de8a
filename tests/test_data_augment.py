"""Augmentations: shape, range, reproducibility, the geometry of known parameters, and the
device path against the NumPy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from covidnet_jax.data import augment_batch
from covidnet_jax.data.augment import AugmentParams, apply_augment, sample_augment_params
from covidnet_jax.data.device_augment import AUGMENT_KEY, model_batch, model_input, pack_params


def _images(batch=4, size=24, channels=1, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def _identity(batch: int, **changes) -> AugmentParams:
    fields = {
        "angle": np.zeros(batch),
        "shift_y": np.zeros(batch),
        "shift_x": np.zeros(batch),
        "zoom": np.ones(batch),
        "aspect": np.ones(batch),
        "flip": np.zeros(batch, bool),
        "brightness": np.ones(batch),
    }
    fields.update(changes)
    return AugmentParams(**fields)


def test_shape_dtype_and_range():
    for channels in (1, 3):
        images = _images(channels=channels)
        out = augment_batch(images, np.random.default_rng(1))
        assert out.shape == images.shape
        assert out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out.max() > 0.5  # content survives


def test_reproducible_for_a_seed():
    images = _images(batch=8)
    a = augment_batch(images, np.random.default_rng(7))
    b = augment_batch(images, np.random.default_rng(7))
    c = augment_batch(images, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_identity_parameters_only_rescale():
    images = _images()
    out = apply_augment(images, _identity(4))
    np.testing.assert_allclose(out, images / 255.0, atol=1e-6)


def test_flip_mirrors_and_brightness_scales():
    images = _images(batch=2)
    flipped = apply_augment(images, _identity(2, flip=np.array([True, False])))
    np.testing.assert_allclose(flipped[0], images[0, :, ::-1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(flipped[1], images[1] / 255.0, atol=1e-6)
    dim = apply_augment(images, _identity(2, brightness=np.array([0.5, 0.5])))
    np.testing.assert_allclose(dim, images / 255.0 * 0.5, atol=1e-6)


def test_integer_shift_moves_content_and_fills_zero():
    image = np.zeros((1, 10, 10, 1), np.uint8)
    image[0, 4, 4, 0] = 255
    out = apply_augment(image, _identity(1, shift_x=np.array([0.2]), shift_y=np.array([-0.1])))
    assert out[0, 3, 6, 0] == 1.0
    assert out.sum() == 1.0
    edge = apply_augment(
        np.full((1, 10, 10, 1), 255, np.uint8), _identity(1, shift_x=np.array([0.3]))
    )
    assert np.all(edge[0, :, :3] == 0.0) and np.all(edge[0, :, 3:] == 1.0)


def test_rotation_by_small_angle_keeps_the_centre_pixel():
    image = np.zeros((1, 11, 11, 1), np.uint8)
    image[0, 5, 5, 0] = 200
    out = apply_augment(image, _identity(1, angle=np.array([np.deg2rad(10.0)])))
    assert np.isclose(out[0, 5, 5, 0], 200 / 255.0, atol=1e-6)


def test_zoom_scales_area_by_its_square():
    image = np.zeros((1, 41, 41, 1), np.uint8)
    image[0, 16:25, 16:25, 0] = 255  # a 9x9 square at the centre
    for zoom in (0.85, 1.15):
        out = apply_augment(image, _identity(1, zoom=np.array([zoom])))
        np.testing.assert_allclose(out.sum(), 81 * zoom**2, rtol=0.03)


def test_sampled_parameters_stay_in_the_paper_ranges():
    p = sample_augment_params(np.random.default_rng(0), 4000)
    assert np.abs(np.rad2deg(p.angle)).max() <= 10.0
    assert np.abs(p.shift_x).max() <= 0.1 and np.abs(p.shift_y).max() <= 0.1
    assert p.zoom.min() >= 0.85 and p.zoom.max() <= 1.15
    assert p.brightness.min() >= 0.9 and p.brightness.max() <= 1.1
    assert 0.45 < p.flip.mean() < 0.55
    assert 0.25 < (p.aspect != 1.0).mean() < 0.35


# ---------------------------------------------------------------------------------------
# The device path: jitted JAX against the NumPy reference above


def _device(images: np.ndarray, params: AugmentParams, channels: int = 1) -> np.ndarray:
    batch = {
        "image": jnp.asarray(images),
        "label": jnp.zeros(len(images), jnp.int32),
        AUGMENT_KEY: jnp.asarray(pack_params(params)),
    }
    return np.asarray(model_batch(batch, channels=channels)["image"])


@pytest.mark.parametrize(
    "changes",
    [
        {},  # identity
        {"shift_x": np.array([0.2, -0.05, 0.1]), "shift_y": np.array([-0.1, 0.03, 0.0])},
        {"flip": np.array([True, False, True])},
        {"angle": np.deg2rad([10.0, -7.5, 3.0])},
        {"zoom": np.array([0.85, 1.15, 1.0]), "aspect": np.array([1.0, 0.9, 1.1])},
        {"brightness": np.array([0.9, 1.1, 1.05])},
    ],
    ids=["identity", "shift", "flip", "rotation", "zoom-aspect", "brightness"],
)
def test_device_warp_equals_the_numpy_reference(changes):
    images = _images(batch=3, size=21)
    params = _identity(3, **changes)
    expected = apply_augment(images, params)
    got = _device(images, params)
    assert got.dtype == np.float32 and got.shape == images.shape
    # Bilinear weights in float32 on both sides; they differ only in rounding.
    np.testing.assert_allclose(got, expected, atol=2e-5)
    if not changes:
        np.testing.assert_allclose(got, images / 255.0, atol=1e-6)


def test_device_warp_of_drawn_parameters_matches_and_repeats_channels():
    images = _images(batch=6, size=33)
    params = sample_augment_params(np.random.default_rng(3), 6)
    expected = apply_augment(images, params)
    got = _device(images, params, channels=3)
    assert got.shape == (6, 33, 33, 3)
    np.testing.assert_allclose(got, np.repeat(expected, 3, axis=3), atol=2e-5)
    assert not np.allclose(got[..., :1], images / 255.0, atol=0.05)  # it did transform


def test_device_input_without_augmentation_only_converts():
    images = _images(batch=2, size=8)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros(2, jnp.int32)}
    out = np.asarray(model_batch(batch, channels=3)["image"])
    np.testing.assert_allclose(out, np.repeat(images / 255.0, 3, axis=3), atol=1e-7)
    ready = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    passed = model_input({"image": jnp.asarray(ready)}, channels=3)  # host-path batches
    np.testing.assert_array_equal(np.asarray(passed), ready)


def test_device_function_compiles_once_per_shape():
    def fresh(size, seed):
        rng = np.random.default_rng(seed)
        return {
            "image": jnp.asarray(rng.integers(0, 256, (4, size, size, 1), dtype=np.uint8)),
            "label": jnp.zeros(4, jnp.int32),
            AUGMENT_KEY: jnp.asarray(pack_params(sample_augment_params(rng, 4))),
        }

    model_batch(fresh(13, 0), channels=3)
    before = model_batch._cache_size()
    for seed in range(1, 5):  # new images and parameters, same shapes: no recompile
        model_batch(fresh(13, seed), channels=3)
    assert model_batch._cache_size() == before
    model_batch(fresh(15, 0), channels=3)  # a new shape compiles once more
    assert model_batch._cache_size() == before + 1
