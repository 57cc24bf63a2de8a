"""The paper's image preprocessing: drop the top 8% of rows, centre square crop, resize.

Training, the TFDS builder, prediction and export all call `preprocess_image`, so a model
sees the same pixels wherever its input comes from.

Example:
    >>> image_HxWxC = preprocess_image("train/p1_0.png", resolution=64, channels=1)
    >>> image_HxWxC.shape, image_HxWxC.dtype
    ((64, 64, 1), dtype('uint8'))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidnet_jax.errors import DataError

MIN_RESOLUTION = 16
MAX_RESOLUTION = 2048
# Fraction of rows dropped from the top of every radiograph (text labels, collar area).
TOP_CROP_FRACTION = 0.08
# Bumped whenever the output of `preprocess_image` changes, so on-disk caches are rebuilt.
PREPROCESS_VERSION = 1


def check_resolution(resolution: int, channels: int) -> None:
    """Raises DataError (one line, with the fix) for a resolution or channel count that makes
    no sense."""
    if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer):
        raise DataError(f"resolution must be an integer number of pixels, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DataError(
            f"resolution {resolution} is out of range; use {MIN_RESOLUTION}..{MAX_RESOLUTION} "
            "pixels (e.g. 64 for quick searches, 224 or 480 as in the paper)"
        )
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def decode_image(path: str | Path) -> np.ndarray:
    """Reads an image file fully into an 8-bit grayscale array.

    Radiographs are grayscale; colour files are converted with the ITU-R 601 luma weights and
    16-bit files are scaled to 8 bits.

    Args:
        path: the image file.

    Returns:
        uint8 HxW.

    Raises:
        DataError: naming the file if it is missing, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here, with their name
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float64)
                top = array.max()
                array = array * (255.0 / top) if top > 255 else array
                return np.clip(np.rint(array), 0, 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from None


def crop_and_resize(image_HxW: np.ndarray, resolution: int) -> np.ndarray:
    """Drops the top 8% of rows, crops the centre square and resizes (antialiased).

    Args:
        image_HxW: uint8 grayscale image.
        resolution: the output side length in pixels.

    Returns:
        uint8 resolution x resolution.
    """
    height, width = image_HxW.shape
    top = int(height * TOP_CROP_FRACTION)
    image_HxW = image_HxW[top:]
    height = image_HxW.shape[0]
    side = min(height, width)
    y0 = (height - side) // 2
    x0 = (width - side) // 2
    square = image_HxW[y0 : y0 + side, x0 : x0 + side]
    if side == resolution:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(square).resize(
        (resolution, resolution), resample=Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    return np.asarray(resized, dtype=np.uint8)


def preprocess_image(
    path_or_array: str | Path | np.ndarray, *, resolution: int, channels: int
) -> np.ndarray:
    """The paper's preprocessing of one radiograph.

    Drops the top 8% of rows, crops the centre square, resizes to `resolution` and repeats the
    grey channel `channels` times. Scaling to [0, 1] happens in the input pipeline, so the
    cached arrays stay uint8.

    Args:
        path_or_array: an image file, or an array HxW / HxWx1 / HxWx3 (uint8, or float in
            [0, 1]).
        resolution: output side length in pixels (16..2048).
        channels: 1 (grayscale) or 3 (grey repeated, for 3-channel models).

    Returns:
        uint8 resolution x resolution x channels.

    Raises:
        DataError: for an unreadable image (naming the file) or a nonsense resolution.
    """
    check_resolution(resolution, channels)
    if isinstance(path_or_array, str | Path):
        grey_HxW = decode_image(path_or_array)
    else:
        grey_HxW = _array_to_grey(np.asarray(path_or_array))
    out_HxW = crop_and_resize(grey_HxW, resolution)
    return np.repeat(out_HxW[:, :, None], channels, axis=2)


def _array_to_grey(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            array = array[:, :, 0]
        else:
            grey = array[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            if array.dtype == np.uint8:
                grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
            array = grey
    if array.ndim != 2:
        raise DataError(f"expected an image array HxW or HxWxC (C in 1, 3, 4), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and float(np.nanmax(array)) <= 1.0:
            array = array * 255.0
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)
