"""The paper's training augmentations, vectorised over a batch on the host.

Rotation +-10 degrees, shift +-10%, horizontal flip, zoom 0.85..1.15, aspect-ratio jitter
(probability 0.3, +-0.1) and brightness 0.9..1.1, with constant zero fill, as in the released
COVID-Net training script. The geometric part is one affine map per image, applied to the
whole batch with a single bilinear gather (no Python loop over images), so augmentation costs
a few memory passes over the batch.

`sample_augment_params` also draws the parameters of the device path
(`covidnet_jax.data.device_augment`, the default), whose jitted warp is tested against
`apply_augment` here: both paths apply the same transforms to the same batch.

Example:
    >>> rng = np.random.default_rng(0)
    >>> out_BxHxWxC = augment_batch(images_BxHxWxC, rng)  # uint8 in, float32 [0, 1] out
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Per-image augmentation parameters of one batch (all arrays of shape (B,)).

    Attributes:
        angle: rotation in radians.
        shift_y: vertical shift as a fraction of the height.
        shift_x: horizontal shift as a fraction of the width.
        zoom: scale factor (>1 enlarges the content).
        aspect: extra horizontal scale factor (1 where no jitter was drawn).
        flip: True where the image is mirrored left-right.
        brightness: intensity factor.
    """

    angle: np.ndarray
    shift_y: np.ndarray
    shift_x: np.ndarray
    zoom: np.ndarray
    aspect: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray


def sample_augment_params(rng: np.random.Generator, batch: int) -> AugmentParams:
    """Draws the paper's augmentation ranges for `batch` images."""
    jitter = rng.random(batch) < 0.3
    return AugmentParams(
        angle=np.deg2rad(rng.uniform(-10.0, 10.0, batch)),
        shift_y=rng.uniform(-0.1, 0.1, batch),
        shift_x=rng.uniform(-0.1, 0.1, batch),
        zoom=rng.uniform(0.85, 1.15, batch),
        aspect=np.where(jitter, rng.uniform(0.9, 1.1, batch), 1.0),
        flip=rng.random(batch) < 0.5,
        brightness=rng.uniform(0.9, 1.1, batch),
    )


def apply_augment(images_BxHxWxC: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Applies the augmentations described by `params`.

    Args:
        images_BxHxWxC: uint8 images (or float32 in [0, 1]).
        params: per-image parameters for the B images.

    Returns:
        float32 BxHxWxC in [0, 1]; pixels mapped from outside the image are 0.
    """
    batch, height, width, channels = images_BxHxWxC.shape
    scale = 1.0 / 255.0 if images_BxHxWxC.dtype == np.uint8 else 1.0
    flat = images_BxHxWxC.reshape(batch * height * width, channels)

    # Inverse map: output pixel (relative to the centre) -> source pixel.
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys = np.arange(height, dtype=np.float32) - cy
    xs = np.arange(width, dtype=np.float32) - cx
    cos = (np.cos(params.angle) / params.zoom).astype(np.float32)
    sin = (np.sin(params.angle) / params.zoom).astype(np.float32)
    sx = np.where(params.flip, -1.0, 1.0).astype(np.float32) / params.aspect.astype(np.float32)
    ty = (params.shift_y * height).astype(np.float32)
    tx = (params.shift_x * width).astype(np.float32)
    # src = R(-angle) / zoom @ (out - shift), then the flip/aspect on x.
    oy = ys[None, :, None] - ty[:, None, None]  # Bx H x1
    ox = xs[None, None, :] - tx[:, None, None]  # Bx1 xW
    src_y = cos[:, None, None] * oy + sin[:, None, None] * ox + cy
    src_x = (-sin[:, None, None] * oy + cos[:, None, None] * ox) * sx[:, None, None] + cx

    y0 = np.floor(src_y)
    x0 = np.floor(src_x)
    wy = (src_y - y0)[..., None]
    wx = (src_x - x0)[..., None]
    y0 = y0.astype(np.int32)
    x0 = x0.astype(np.int32)
    base = (np.arange(batch, dtype=np.int32) * (height * width))[:, None, None]

    out = np.zeros((batch, height, width, channels), dtype=np.float32)
    for dy, dx, weight in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yy = y0 + dy
        xx = x0 + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = base + np.clip(yy, 0, height - 1) * width + np.clip(xx, 0, width - 1)
        out += flat[index] * (weight * inside[..., None])
    out *= (params.brightness.astype(np.float32) * scale)[:, None, None, None]
    return np.clip(out, 0.0, 1.0, out=out)


def augment_batch(images_BxHxWxC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws parameters from `rng` and augments the batch.

    Args:
        images_BxHxWxC: uint8 images (or float32 in [0, 1]).
        rng: the batch's generator; the same generator state gives the same output.

    Returns:
        float32 BxHxWxC in [0, 1].
    """
    return apply_augment(images_BxHxWxC, sample_augment_params(rng, images_BxHxWxC.shape[0]))
