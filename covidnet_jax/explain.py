"""Where a model looks: Grad-CAM, integrated gradients and overlays on the original image.

Two attributions of one class score to the input image:

- **Grad-CAM** over the output of the last PEPX stage: the feature maps `A_BxhxwxC` of
  `model.features(x)` weighted by the spatial mean of d score / d A, summed over channels,
  rectified and resized to the input size. It relies on the split
  `model(x) == model.classify(model.features(x))`.
- **Integrated gradients** from a black baseline: (x - x0) times the mean gradient along the
  straight path x0 -> x (midpoint rule), summed in absolute value over channels.

Both return maps in [0, 1] (each image scaled by its maximum; an all-zero map stays zero).
`heatmap_to_original` maps one back onto the image file and `save_overlay_png` draws it.
Whether the maps land on lesions is measured by `bench/explain_validation.py`.

Example:
    >>> heat_BxHxW, target_B = grad_cam(model, images_BxHxWxC)
    >>> overlay_HxWx3 = overlay_heatmap(image_HxW, heatmap_to_original(heat_BxHxW[0], hw))
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from covidnet_jax.data.preprocess import TOP_CROP_FRACTION

__all__ = [
    "grad_cam",
    "heatmap_to_original",
    "integrated_gradients",
    "integrated_gradients_attribution",
    "overlay_heatmap",
    "save_overlay_png",
]


def _eval_copy(graphdef: Any, state: Any) -> nnx.Module:
    """Rebuilds the model inside a trace, in inference mode (running BatchNorm statistics,
    no dropout), without touching the caller's module."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _normalize_maps(heat_BxHxW: jax.Array) -> jax.Array:
    """Scales each map to [0, 1] by its maximum; maps that are all zero stay zero."""
    top_B11 = jnp.max(heat_BxHxW, axis=(1, 2), keepdims=True)
    return jnp.where(top_B11 > 0, heat_BxHxW / jnp.where(top_B11 > 0, top_B11, 1.0), 0.0)


def _resolve_target(logits_BxK: jax.Array, target_B: jax.Array) -> jax.Array:
    """Negative entries of `target_B` mean "the predicted class"."""
    predicted_B = jnp.argmax(logits_BxK, axis=-1).astype(jnp.int32)
    return jnp.where(target_B < 0, predicted_B, target_B)


@functools.partial(jax.jit, static_argnums=0)
def _grad_cam_jit(
    graphdef: Any, state: Any, images_BxHxWxC: jax.Array, target_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    model = _eval_copy(graphdef, state)
    feats_BxhxwxC = model.features(images_BxHxWxC)
    logits_BxK = model.classify(feats_BxhxwxC)
    target_B = _resolve_target(logits_BxK, target_B)

    def selected_score(feats: jax.Array) -> jax.Array:
        # Examples are independent in inference mode, so the gradient of the sum is the
        # per-example gradient of each example's own score.
        logits = model.classify(feats)
        return jnp.take_along_axis(logits, target_B[:, None], axis=1).sum()

    grads_BxhxwxC = jax.grad(selected_score)(feats_BxhxwxC)
    weights_Bx11xC = jnp.mean(grads_BxhxwxC, axis=(1, 2), keepdims=True)
    cam_Bxhxw = jax.nn.relu(jnp.sum(weights_Bx11xC * feats_BxhxwxC, axis=-1))
    batch, height, width, _ = images_BxHxWxC.shape
    cam_BxHxW = jax.image.resize(cam_Bxhxw, (batch, height, width), method="bilinear")
    return _normalize_maps(jax.nn.relu(cam_BxHxW)), target_B


def grad_cam(
    model: nnx.Module, images_BxHxWxC: Any, *, target: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps over the output of the last PEPX stage.

    The model is used in inference mode; the caller's module is not modified.

    Args:
        model: a model with `features(x) -> BxhxwxC` and `classify(features) -> BxK`.
        images_BxHxWxC: preprocessed images, float32 in [0, 1].
        target: the class index to explain: None for each image's predicted class, an int for
            all images, or an int array B.

    Returns:
        (heat_BxHxW float32 in [0, 1], target_B int32): the heatmaps at the input size and the
        class each one explains.

    Example:
        >>> heat, target = grad_cam(model, batch["image"], target=2)
    """
    graphdef, state = nnx.split(model)
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    heat, target_B = _grad_cam_jit(graphdef, state, images, _as_target(target, len(images)))
    return np.asarray(heat), np.asarray(target_B)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _integrated_gradients_jit(
    graphdef: Any,
    state: Any,
    images_BxHxWxC: jax.Array,
    target_B: jax.Array,
    steps: int,
) -> tuple[jax.Array, jax.Array]:
    model = _eval_copy(graphdef, state)
    target_B = _resolve_target(model(images_BxHxWxC), target_B)
    baseline_BxHxWxC = jnp.zeros_like(images_BxHxWxC)
    delta_BxHxWxC = images_BxHxWxC - baseline_BxHxWxC

    def selected_score(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(model(x), target_B[:, None], axis=1).sum()

    score_grad = jax.grad(selected_score)

    def accumulate(i: jax.Array, total: jax.Array) -> jax.Array:
        alpha = (i.astype(jnp.float32) + 0.5) / steps
        return total + score_grad(baseline_BxHxWxC + alpha * delta_BxHxWxC)

    # A loop rather than a batch of all path points: memory stays at one batch.
    grad_sum = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros_like(images_BxHxWxC))
    return delta_BxHxWxC * grad_sum / steps, target_B


def integrated_gradients_attribution(
    model: nnx.Module, images_BxHxWxC: Any, *, target: Any = None, steps: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated gradients from a black image, per pixel and channel.

    By the completeness property, each image's attributions sum to approximately
    score(image) - score(black image) for the explained class (exactly as `steps` grows).

    Args:
        model: a model mapping BxHxWxC images to BxK logits.
        images_BxHxWxC: preprocessed images, float32 in [0, 1].
        target: the class index to explain: None for each image's predicted class, an int for
            all images, or an int array B.
        steps: points on the path from the baseline to the image (midpoint rule).

    Returns:
        (attribution_BxHxWxC float32, target_B int32).

    Raises:
        ValueError: if `steps` < 1.

    Example:
        >>> attribution, target = integrated_gradients_attribution(model, images, steps=64)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    graphdef, state = nnx.split(model)
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    attribution, target_B = _integrated_gradients_jit(
        graphdef, state, images, _as_target(target, len(images)), steps
    )
    return np.asarray(attribution), np.asarray(target_B)


def integrated_gradients(
    model: nnx.Module, images_BxHxWxC: Any, *, target: Any = None, steps: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated gradients as a heatmap: absolute attributions summed over channels.

    Args:
        model: a model mapping BxHxWxC images to BxK logits.
        images_BxHxWxC: preprocessed images, float32 in [0, 1].
        target: as for `integrated_gradients_attribution`.
        steps: points on the path from the baseline to the image.

    Returns:
        (heat_BxHxW float32 in [0, 1], target_B int32).

    Example:
        >>> heat, target = integrated_gradients(model, batch["image"], steps=16)
    """
    attribution, target_B = integrated_gradients_attribution(
        model, images_BxHxWxC, target=target, steps=steps
    )
    heat = _normalize_maps(jnp.sum(jnp.abs(jnp.asarray(attribution)), axis=-1))
    return np.asarray(heat), target_B


def _as_target(target: Any, batch: int) -> jax.Array:
    # Always an int32 array B (-1 = predicted class), so every call of one shape shares one
    # compiled function.
    if target is None:
        return jnp.full((batch,), -1, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (batch,))


def heatmap_to_original(heat_HxW: Any, original_hw: tuple[int, int]) -> np.ndarray:
    """Maps a heatmap over the preprocessed input back onto the original image.

    Preprocessing dropped the top rows and cropped the centre square (see
    `covidnet_jax.data.preprocess`); the map is resized onto that square and is zero
    elsewhere.

    Args:
        heat_HxW: a heatmap over the model input, values in [0, 1].
        original_hw: (height, width) of the image file.

    Returns:
        float32 heatmap of shape `original_hw`.
    """
    height, width = original_hw
    top = int(height * TOP_CROP_FRACTION)
    side = min(height - top, width)
    y0 = top + (height - top - side) // 2
    x0 = (width - side) // 2
    square = Image.fromarray(np.asarray(heat_HxW, np.float32)).resize(
        (side, side), resample=Image.Resampling.BILINEAR
    )
    out = np.zeros((height, width), np.float32)
    out[y0 : y0 + side, x0 : x0 + side] = np.clip(np.asarray(square), 0.0, 1.0)
    return out


def overlay_heatmap(image_HxW: Any, heat_HxW: Any, *, alpha: float = 0.45) -> np.ndarray:
    """Blends a heatmap (jet colours) over a grayscale image.

    Args:
        image_HxW: uint8 grayscale image (or HxWxC; the first channel is used).
        heat_HxW: heatmap of the same height and width, values in [0, 1].
        alpha: opacity of the heatmap where it is hottest; cold regions stay see-through.

    Returns:
        uint8 HxWx3 RGB image.
    """
    from matplotlib import colormaps  # matplotlib is heavy; only overlays need it

    image = np.asarray(image_HxW)
    if image.ndim == 3:
        image = image[..., 0]
    heat = np.clip(np.asarray(heat_HxW, np.float32), 0.0, 1.0)
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heatmap {heat.shape} differ in size")
    grey_HxWx3 = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    colour_HxWx3 = colormaps["jet"](heat)[..., :3].astype(np.float32)
    weight_HxWx1 = (alpha * np.sqrt(heat))[..., None]
    blend = (1.0 - weight_HxWx1) * grey_HxWx3 + weight_HxWx1 * colour_HxWx3
    return np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)


def save_overlay_png(image_HxW: Any, heat_HxW: Any, path: str | Path, **kwargs: Any) -> Path:
    """Writes `overlay_heatmap(image_HxW, heat_HxW)` as a PNG file and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_heatmap(image_HxW, heat_HxW, **kwargs)).save(path)
    return path
