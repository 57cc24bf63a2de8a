"""The paper's augmentations on the device: uint8 grey batches in, model input out.

The host gathers uint8 images and draws each image's transform parameters (the same NumPy
draw as the host path, `augment.sample_augment_params`, from the generator of (seed, step)),
and sends both; one jitted function warps the batch with a single bilinear gather per tap
(rotation, shift, zoom, aspect, flip), scales brightness, converts to float32 in [0, 1] and
repeats the grey channel. Host and device paths therefore apply the same transforms to the
same images; they differ only in float rounding (about 1e-6).

Example:
    >>> host = {"image": uint8_Bx64x64x1, "label": int32_B, AUGMENT_KEY: params_Bx7}
    >>> images_Bx64x64x3 = model_images(jax.device_put(host), channels=3)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from covidnet_jax.data.augment import AugmentParams

AUGMENT_KEY = "augment"
"""Batch entry holding float32 Bx7 transform parameters, in `PARAM_FIELDS` order."""

PARAM_FIELDS = ("angle", "shift_y", "shift_x", "zoom", "aspect", "flip", "brightness")


def pack_params(params: AugmentParams) -> np.ndarray:
    """The parameters of B images as one float32 Bx7 array (flip as 0/1)."""
    return np.stack(
        [np.asarray(getattr(params, name), np.float32) for name in PARAM_FIELDS], axis=1
    )


def warp_batch(images_BxHxWxC: jax.Array, params_Bx7: jax.Array) -> jax.Array:
    """Applies the transforms in `params_Bx7` (see `pack_params`) to a batch.

    The same map as `augment.apply_augment`: for every output pixel, the source pixel is
    R(-angle) / zoom @ (out - shift) about the image centre, then mirrored and stretched
    along x; bilinear taps outside the image read 0.

    Args:
        images_BxHxWxC: uint8 images (or float in [0, 1]).
        params_Bx7: float32 parameters, one row per image.

    Returns:
        float32 BxHxWxC in [0, 1].
    """
    _, height, width, _ = images_BxHxWxC.shape
    scale = 1.0 / 255.0 if images_BxHxWxC.dtype == jnp.uint8 else 1.0
    p = params_Bx7.astype(jnp.float32)
    angle, shift_y, shift_x, zoom, aspect, flip, brightness = (p[:, i] for i in range(7))
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys = jnp.arange(height, dtype=jnp.float32) - cy
    xs = jnp.arange(width, dtype=jnp.float32) - cx
    cos = (jnp.cos(angle) / zoom)[:, None, None]
    sin = (jnp.sin(angle) / zoom)[:, None, None]
    sx = (jnp.where(flip > 0.5, -1.0, 1.0) / aspect)[:, None, None]
    oy = ys[None, :, None] - (shift_y * height)[:, None, None]  # Bx H x1
    ox = xs[None, None, :] - (shift_x * width)[:, None, None]  # Bx1 xW
    src_y = cos * oy + sin * ox + cy
    src_x = (-sin * oy + cos * ox) * sx + cx
    y0 = jnp.floor(src_y)
    x0 = jnp.floor(src_x)
    wy = (src_y - y0)[..., None]
    wx = (src_x - x0)[..., None]
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)

    def gather(image_HxWxC, index_HxW):
        # One image at a time under vmap: a batched gather that splits along the batch axis
        # when the batch is sharded over devices.
        return image_HxWxC.reshape(height * width, -1)[index_HxW]

    out = jnp.zeros(images_BxHxWxC.shape, jnp.float32)
    for dy, dx, weight in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yy = y0 + dy
        xx = x0 + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = jnp.clip(yy, 0, height - 1) * width + jnp.clip(xx, 0, width - 1)
        taps = jax.vmap(gather)(images_BxHxWxC, index)  # gathered in the input dtype
        out = out + taps.astype(jnp.float32) * (weight * inside[..., None])
    out = out * (brightness * scale)[:, None, None, None]
    return jnp.clip(out, 0.0, 1.0)


def model_input(batch: Mapping[str, jax.Array], *, channels: int) -> jax.Array:
    """The model's float32 input from a device batch (pure; use inside `jit`).

    Args:
        batch: "image": uint8 BxHxWx1 (or float32 BxHxWxC, returned as it is), and with
            augmentation `AUGMENT_KEY`: float32 Bx7 parameters.
        channels: channels the model takes; the grey channel is repeated to this many.

    Returns:
        float32 BxHxWxchannels in [0, 1].
    """
    images = batch["image"]
    if images.dtype != jnp.uint8:
        return images
    if AUGMENT_KEY in batch:
        out = warp_batch(images, batch[AUGMENT_KEY])
    else:
        out = images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    if out.shape[-1] != channels:
        out = jnp.broadcast_to(out, (*out.shape[:-1], channels))
    return out


@functools.partial(jax.jit, static_argnames="channels")
def model_batch(batch: Mapping[str, jax.Array], *, channels: int) -> dict[str, jax.Array]:
    """{"image": `model_input(batch)`, "label": batch["label"]}, jitted (once per shape).

    The output keeps the input's sharding: a batch split over devices is augmented where
    it lies.
    """
    return {"image": model_input(batch, channels=channels), "label": batch["label"]}
