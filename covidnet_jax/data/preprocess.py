"""The paper's image preprocessing: drop the top 8% of rows, centre square crop, resize.

Training, the TFDS builder, prediction and export all call `preprocess_image`, so a model
sees the same pixels wherever its input comes from.

Example:
    >>> image_HxWxC = preprocess_image("train/p1_0.png", resolution=64, channels=1)
    >>> image_HxWxC.shape, image_HxWxC.dtype
    ((64, 64, 1), dtype('uint8'))
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from covidnet_jax.errors import DataError

MIN_RESOLUTION = 16
MAX_RESOLUTION = 2048
# Fraction of rows dropped from the top of every radiograph (text labels, collar area).
TOP_CROP_FRACTION = 0.08
# Bumped whenever the output of `preprocess_image` changes, so on-disk caches are rebuilt.
PREPROCESS_VERSION = 1
# Largest image (width x height) decoded by default: PIL's default `Image.MAX_IMAGE_PIXELS`
# (1 GiB / 4 bytes / 3), so a decompression bomb is refused before it is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The setting named by the error for an image over the limit, unless the caller names another.
MAX_PIXELS_KEY = "data.max_image_pixels"


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


def decode_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_KEY,
) -> np.ndarray:
    """Reads an image file fully into an 8-bit grayscale array.

    Radiographs are grayscale; colour files are converted with the ITU-R 601 luma weights and
    16-bit files are scaled to 8 bits. The size in the file's header is checked against
    `max_pixels` before any pixel is decoded, so a decompression bomb (a small file that
    decodes to gigabytes) fails in milliseconds. PIL's process-wide `Image.MAX_IMAGE_PIXELS`
    is left alone and does not stop an image within `max_pixels` (only the few format
    plugins that check sizes themselves, such as tiled TIFF or GIF frames, still apply it).

    Args:
        path: the image file.
        max_pixels: largest width x height decoded.
        limit_name: the setting that raises `max_pixels`, named in the error (a config key
            or a command-line option).

    Returns:
        uint8 HxW.

    Raises:
        DataError: naming the file if it is missing, truncated, not an image, or larger than
            `max_pixels` (with its size and `limit_name`).
    """
    path = Path(path)
    try:
        with path.open("rb") as fp, _open_image(fp, path) as img:
            check_image_size(path, img.size, max_pixels=max_pixels, limit_name=limit_name)
            img.load()  # decode now, so truncated files fail here, with their name
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float64)
                top = array.max()
                array = array * (255.0 / top) if top > 255 else array
                return np.clip(np.rint(array), 0, 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # A format plugin's own check against PIL's process-wide limit (a backstop).
        raise DataError(
            f"{path}: refused by PIL as a possible decompression bomb ({err}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if it is genuine"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from None


def check_image_size(
    path: str | Path, size: tuple[int, int], *, max_pixels: int, limit_name: str = MAX_PIXELS_KEY
) -> None:
    """Raises DataError naming the file, its size and `limit_name` if width x height is over
    `max_pixels`."""
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise DataError(
            f"{path}: image of {width} x {height} = {pixels:,} pixels is over the limit of "
            f"{max_pixels:,} (a decompression bomb?); raise {limit_name} if it is genuine"
        )


def _open_image(fp: BinaryIO, path: Path) -> ImageFile.ImageFile:
    """Identifies an image file and reads its header, as `PIL.Image.open` does, but without
    PIL's pixel limit, which `Image.open` applies before the caller can see the size (and
    which is a process-wide setting, so raising it would change every other user of PIL).

    Raises:
        UnidentifiedImageError: if no format plugin accepts the file.
    """
    prefix = fp.read(16)
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for name in [n for n in Image.ID if n not in tried]:
            tried.add(name)
            factory, accept = Image.OPEN[name]
            verdict = True if accept is None else accept(prefix)
            if isinstance(verdict, str) or not verdict:
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path))
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format after all (Image.open skips these too)
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


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
    path_or_array: str | Path | np.ndarray,
    *,
    resolution: int,
    channels: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_KEY,
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
        max_pixels: largest width x height of an image file decoded (`decode_image`).
        limit_name: the setting that raises `max_pixels`, named in the error.

    Returns:
        uint8 resolution x resolution x channels.

    Raises:
        DataError: for an unreadable or too large image (naming the file) or a nonsense
            resolution.
    """
    check_resolution(resolution, channels)
    if isinstance(path_or_array, str | Path):
        grey_HxW = decode_image(path_or_array, max_pixels=max_pixels, limit_name=limit_name)
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
