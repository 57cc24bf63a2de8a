"""Grad-CAM, integrated gradients, lesion scores and overlays on the tiny preset."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from covidnet_jax import explain
from covidnet_jax.data.preprocess import crop_and_resize
from covidnet_jax.models import build_model
from covidnet_jax.presets import get_preset


@pytest.fixture(scope="module")
def tiny_model():
    spec = dataclasses.replace(get_preset("tiny"), input_channels=1)
    model = build_model(spec, rngs=nnx.Rngs(3))
    # Non-trivial running statistics, so inference mode differs from batch statistics.
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        shape = var[...].shape
        value = rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0, 0.1, shape)
        var[...] = jnp.asarray(value, jnp.float32)
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)


def test_grad_cam_matches_class_activation_map_of_average_pool_head(tiny_model, images):
    # With global average pooling then one linear layer, Grad-CAM's channel weights are the
    # head's weights for the class over h*w: the map is relu(A @ W[:, k]) up to scale.
    feats = tiny_model.features(jnp.asarray(images))
    kernel = tiny_model.head.dense[-1].kernel[...]
    # The class whose map is positive on most pixels, so the maps compared are not all zero.
    k = int(np.argmax(np.asarray(jax.nn.relu(feats @ kernel)).sum(axis=(0, 1, 2))))
    heat, target = explain.grad_cam(tiny_model, images, target=k)
    assert heat.shape == (3, 32, 32) and heat.dtype == np.float32
    np.testing.assert_array_equal(target, [k] * 3)
    cam = jax.nn.relu(feats @ kernel[:, k])
    cam = np.asarray(jax.nn.relu(jax.image.resize(cam, (3, 32, 32), method="bilinear")))
    top = cam.max(axis=(1, 2), keepdims=True)
    assert (top > 0).sum() >= 2  # the comparison must not be between all-zero maps
    cam = np.where(top > 0, cam / np.where(top > 0, top, 1.0), 0.0)
    np.testing.assert_allclose(heat, cam, atol=1e-5)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)


def test_grad_cam_defaults_to_the_predicted_class(tiny_model, images):
    _, target = explain.grad_cam(tiny_model, images)
    np.testing.assert_array_equal(target, np.argmax(tiny_model(jnp.asarray(images)), axis=-1))


def test_integrated_gradients_completeness(tiny_model, images):
    attribution, _ = explain.integrated_gradients_attribution(
        tiny_model, images, target=2, steps=64
    )
    assert attribution.shape == images.shape
    logits = np.asarray(tiny_model(jnp.asarray(images)))[:, 2]
    black = np.asarray(tiny_model(jnp.zeros_like(jnp.asarray(images))))[:, 2]
    np.testing.assert_allclose(
        attribution.sum(axis=(1, 2, 3)), logits - black, rtol=0.05, atol=2e-3
    )
    heat, _ = explain.integrated_gradients(tiny_model, images, target=2, steps=64)
    assert heat.shape == (3, 32, 32) and np.allclose(heat.max(axis=(1, 2)), 1.0)
    with pytest.raises(ValueError, match="steps"):
        explain.integrated_gradients(tiny_model, images, steps=0)


def test_explaining_does_not_change_the_callers_model(tiny_model, images):
    tiny_model.train()
    try:
        before = nnx.state(tiny_model)
        explain.grad_cam(tiny_model, images)
        after = nnx.state(tiny_model)
        jax.tree.map(np.testing.assert_array_equal, before, after)
    finally:
        tiny_model.eval()


def test_heatmap_maps_back_onto_the_preprocessing_crop():
    # A bright square placed where preprocessing crops must land where the map is hot.
    height, width = 100, 80
    original = np.zeros((height, width), np.uint8)
    original[60:80, 30:50] = 255
    model_input = crop_and_resize(original, 32).astype(np.float32) / 255.0
    back = explain.heatmap_to_original(model_input, (height, width))
    assert back.shape == (height, width)
    ys, xs = np.nonzero(back > 0.5)
    assert ys.min() >= 58 and ys.max() <= 81 and xs.min() >= 28 and xs.max() <= 51
    assert back[:8].max() == 0.0  # the dropped top rows carry no heat


def test_overlay_png_has_the_input_size(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)
    heat = np.zeros((40, 56), np.float32)
    heat[10:20, 10:20] = 1.0
    path = explain.save_overlay_png(image, heat, tmp_path / "o.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (56, 40) and png.mode == "RGB"
        pixels = np.asarray(png)
    # Hot pixels are tinted (jet's red end), cold ones keep the grey image.
    assert pixels[15, 15, 0] > pixels[15, 15, 2]
    np.testing.assert_array_equal(pixels[30, 40], [image[30, 40]] * 3)
    with pytest.raises(ValueError, match="differ in size"):
        explain.overlay_heatmap(image, heat[:10])
