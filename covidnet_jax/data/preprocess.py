"""The paper's image preprocessing: drop the top 8% of rows, centre square crop, resize.

Training, the TFDS builder, prediction and export all call `preprocess_image`, so a model
sees the same pixels wherever its input comes from. `covidnet export` writes the same steps
as data (`covidnet_jax.export.preprocessing_recipe`, `preprocessing.json`).

Grey levels. Every image becomes 8-bit grey (uint8) before cropping:

- 8-bit files (L, RGB, RGBA, LA, P, 1; most of COVIDx) are left as PIL's `convert("L")`
  gives them: colour with Pillow's integer ITU-R 601-2 luma,
  `(19595 R + 38470 G + 7471 B + 32768) >> 16`; alpha is dropped (not composited); a palette
  is looked up first. This is what trained models have always seen.
- High-bit-depth grey (PIL modes I;16, I;16B, I;16L and I: 16-bit PNG, TIFF, JPEG 2000) is
  scaled by the bit depth inferred from the image's maximum m (negative values count as
  0): `bits` = m.bit_length(), at least 8, rounded up to an even number (8, 10, 12, 14,
  16, ...), and each value v becomes `clip(rint(v * 255 / (2**bits - 1)), 0, 255)`
  (float64, round half to even; no ties occur for these divisors).

Why this rule for radiographs. Detectors deliver 10, 12, 14 or 16 significant bits and
DICOM-to-PNG converters mostly copy those values into a 16-bit container unscaled, so the
container depth alone (/65535) would turn a 12-bit radiograph (values up to 4095) nearly
black. The PNG `sBIT` chunk cannot fix that: by the PNG specification a file that declares
12 significant bits stores its samples already scaled to the full 16 bits, so dividing by
the declared 4095 would be wrong for conformant files, and converters that do not scale do
not write `sBIT` (Pillow does not expose it either); the rule ignores `sBIT` and handles
both kinds of file. Dividing by each image's own maximum (the rule before preprocessing
version 2) stretched every 16-bit image until its brightest pixel was white, which 8-bit
images never get, so one radiograph reached the model differently as an 8-bit and as a
16-bit file. With the inferred depth it arrives the same: saved as 16-bit by the usual
v * 257 it gives back exactly v, upcast unscaled (values <= 255) it is read as 8-bit, and
an 8-bit file is unchanged (its inferred depth is 8; the rule does not stretch contrast).
The inferred depth is the detector's whenever the image's maximum is above a quarter of the
detector's range, which a radiograph's brightest structures (collimator edges, markers,
burnt-in text, dense bone) practically always are.
No windowing, inversion (DICOM MONOCHROME1) or colour management (ICC, gAMA) is applied,
and EXIF orientation is ignored: the pixels are used in the order the file stores them.
16-bit colour PNGs are decoded by Pillow to 8 bits per channel (their high bytes).

Behaviour change in preprocessing version 2: high-bit-depth images with a maximum m over
255 that is not exactly 2**bits - 1 come out darker than before, by the factor
m / (2**bits - 1), which lies in (1/4, 1]; those with m = 2**bits - 1 (e.g. 65535 or
4095) or m <= 255 are unchanged, and so is every 8-bit file.
Integer arrays other than uint8 passed to `preprocess_image` follow the same rule (they
were clipped at 255 before). Exports written before version 2 keep the old rule
(`LEGACY_BIT_DEPTH_RULE`, chosen by `covidnet_jax.export.load_export`).

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
# 2: high-bit-depth images scaled by their inferred bit depth, not their own maximum.
PREPROCESS_VERSION = 2
# How high-bit-depth grey images become 8 bits (see the module docstring).
BIT_DEPTH_RULE = "inferred_bit_depth"
# The rule of preprocessing version 1: v * 255 / max(image) when that maximum is over 255.
LEGACY_BIT_DEPTH_RULE = "per_image_max"
BIT_DEPTH_RULES = (BIT_DEPTH_RULE, LEGACY_BIT_DEPTH_RULE)
# PIL modes scaled by the bit-depth rule; every other mode goes through `convert("L")`.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")
# The inferred depth: the maximum's bit length, at least MIN_BITS, rounded up to a multiple
# of BITS_MULTIPLE (detectors deliver 10, 12, 14 or 16 bits).
MIN_BITS = 8
BITS_MULTIPLE = 2
# Pillow's `convert("L")` of RGB: (w_R R + w_G G + w_B B + 2**15) >> 16 (ITU-R 601-2 luma).
PIL_LUMA_WEIGHTS_Q16 = (19595, 38470, 7471)
# The resize: PIL `Image.resize(..., resample=BILINEAR, reducing_gap=2.0)` of the uint8 square.
RESIZE_RESAMPLE = "BILINEAR"
RESIZE_REDUCING_GAP = 2.0
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


def inferred_bit_depth(maximum: int) -> int:
    """The bit depth of a high-bit-depth image with this maximum value: its bit length, at
    least 8, rounded up to an even number (4095 -> 12, 1900 -> 12, 65535 -> 16, 200 -> 8)."""
    bits = max(MIN_BITS, max(int(maximum), 0).bit_length())
    return -(-bits // BITS_MULTIPLE) * BITS_MULTIPLE


def to_uint8(values_HxW: np.ndarray, *, bit_depth_rule: str = BIT_DEPTH_RULE) -> np.ndarray:
    """High-bit-depth grey values (any integer dtype) -> uint8, by `bit_depth_rule`.

    Args:
        values_HxW: integer grey values (uint16 or int32 as PIL decodes 16-bit files).
        bit_depth_rule: `BIT_DEPTH_RULE` (divide by 2**bits - 1 of the inferred bit depth)
            or `LEGACY_BIT_DEPTH_RULE` (divide by the image's maximum if it is over 255).

    Returns:
        uint8 HxW.

    Raises:
        ValueError: for an unknown `bit_depth_rule`.
    """
    array = values_HxW.astype(np.float64)
    top = float(array.max()) if array.size else 0.0
    if bit_depth_rule == BIT_DEPTH_RULE:
        array = array * (255.0 / (2 ** inferred_bit_depth(int(top)) - 1))
    elif bit_depth_rule == LEGACY_BIT_DEPTH_RULE:
        array = array * (255.0 / top) if top > 255 else array
    else:
        _check_bit_depth_rule(bit_depth_rule)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _check_bit_depth_rule(bit_depth_rule: str) -> None:
    if bit_depth_rule not in BIT_DEPTH_RULES:
        raise ValueError(f"unknown bit depth rule {bit_depth_rule!r}; use one of {BIT_DEPTH_RULES}")


def decode_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_KEY,
    bit_depth_rule: str = BIT_DEPTH_RULE,
) -> np.ndarray:
    """Reads an image file fully into an 8-bit grayscale array.

    Radiographs are grayscale; colour files are converted with Pillow's ITU-R 601 luma and
    high-bit-depth files are scaled by their inferred bit depth (the module docstring has
    the exact rules). The size in the file's header is checked against
    `max_pixels` before any pixel is decoded, so a decompression bomb (a small file that
    decodes to gigabytes) fails in milliseconds. PIL's process-wide `Image.MAX_IMAGE_PIXELS`
    is left alone and does not stop an image within `max_pixels` (only the few format
    plugins that check sizes themselves, such as tiled TIFF or GIF frames, still apply it).

    Args:
        path: the image file.
        max_pixels: largest width x height decoded.
        limit_name: the setting that raises `max_pixels`, named in the error (a config key
            or a command-line option).
        bit_depth_rule: how high-bit-depth images become 8 bits (`to_uint8`).

    Returns:
        uint8 HxW.

    Raises:
        DataError: naming the file if it is missing, truncated, not an image, or larger than
            `max_pixels` (with its size and `limit_name`).
    """
    _check_bit_depth_rule(bit_depth_rule)
    path = Path(path)
    try:
        with path.open("rb") as fp, _open_image(fp, path) as img:
            check_image_size(path, img.size, max_pixels=max_pixels, limit_name=limit_name)
            img.load()  # decode now, so truncated files fail here, with their name
            if img.mode in HIGH_BIT_DEPTH_MODES:
                return to_uint8(np.asarray(img), bit_depth_rule=bit_depth_rule)
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
        (resolution, resolution),
        resample=Image.Resampling[RESIZE_RESAMPLE],
        reducing_gap=RESIZE_REDUCING_GAP,
    )
    return np.asarray(resized, dtype=np.uint8)


def preprocess_image(
    path_or_array: str | Path | np.ndarray,
    *,
    resolution: int,
    channels: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = MAX_PIXELS_KEY,
    bit_depth_rule: str = BIT_DEPTH_RULE,
) -> np.ndarray:
    """The paper's preprocessing of one radiograph.

    Drops the top 8% of rows, crops the centre square, resizes to `resolution` and repeats the
    grey channel `channels` times. Scaling to [0, 1] happens in the input pipeline, so the
    cached arrays stay uint8.

    Args:
        path_or_array: an image file, or an array HxW / HxWx1 / HxWx3 (uint8; another
            integer dtype, scaled by `bit_depth_rule`; or float in [0, 1]).
        resolution: output side length in pixels (16..2048).
        channels: 1 (grayscale) or 3 (grey repeated, for 3-channel models).
        max_pixels: largest width x height of an image file decoded (`decode_image`).
        limit_name: the setting that raises `max_pixels`, named in the error.
        bit_depth_rule: how high-bit-depth images become 8 bits (`to_uint8`); the default
            is this version's rule, `LEGACY_BIT_DEPTH_RULE` reproduces exports written
            before preprocessing version 2.

    Returns:
        uint8 resolution x resolution x channels.

    Raises:
        DataError: for an unreadable or too large image (naming the file) or a nonsense
            resolution.
        ValueError: for an unknown `bit_depth_rule`.
    """
    check_resolution(resolution, channels)
    _check_bit_depth_rule(bit_depth_rule)
    if isinstance(path_or_array, str | Path):
        grey_HxW = decode_image(
            path_or_array,
            max_pixels=max_pixels,
            limit_name=limit_name,
            bit_depth_rule=bit_depth_rule,
        )
    else:
        grey_HxW = _array_to_grey(np.asarray(path_or_array), bit_depth_rule)
    out_HxW = crop_and_resize(grey_HxW, resolution)
    return np.repeat(out_HxW[:, :, None], channels, axis=2)


def _array_to_grey(array: np.ndarray, bit_depth_rule: str) -> np.ndarray:
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
    if bit_depth_rule == LEGACY_BIT_DEPTH_RULE:  # version 1 clipped integer arrays
        return np.clip(array, 0, 255).astype(np.uint8)
    return to_uint8(array, bit_depth_rule=bit_depth_rule)
