"""`preprocessing.json`: the input recipe of an export as data, and reading its bit-depth rule.

Everything an implementation without this package needs to turn an image file into the
tensor the exported function takes; `recipe_bit_depth_rule` reads back the one choice that
changed between recipe versions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL

from covidnet_jax.data.preprocess import (
    BIT_DEPTH_RULE,
    BIT_DEPTH_RULES,
    BITS_MULTIPLE,
    HIGH_BIT_DEPTH_MODES,
    LEGACY_BIT_DEPTH_RULE,
    MIN_BITS,
    PIL_LUMA_WEIGHTS_Q16,
    PREPROCESS_VERSION,
    RESIZE_REDUCING_GAP,
    RESIZE_RESAMPLE,
    TOP_CROP_FRACTION,
)
from covidnet_jax.export.layout import MISSING, describe_value

# Version of the `preprocessing.json` format. 1: steps as names and notes (no version field);
# 2: every detail an independent implementation needs, including the bit-depth rule.
RECIPE_VERSION = 2


def preprocessing_recipe(*, resolution: int, channels: int) -> dict[str, Any]:
    """The preprocessing of `covidnet_jax.data.preprocess_image` plus scaling, as data.

    Everything an implementation without this package needs to give the exported function
    the input the model was trained on: the steps in order, with crop rounding, the resize's
    PIL call and parameters, how each kind of file becomes 8-bit grey (the bit-depth rule
    for 16-bit files, luma weights, alpha, palette, EXIF orientation) and the final scaling.
    Machine-readable fields carry the numbers; `pil`, `formula` and `note` fields say the
    same in words or code.

    Args:
        resolution: the model's input side length.
        channels: the model's input channels.

    Returns:
        A JSON-ready mapping: `recipe_version`, `preprocess_version`, `reference`, ordered
        `steps` and the tensor the exported function takes (`input`).
    """
    weights = list(PIL_LUMA_WEIGHTS_Q16)
    return {
        "recipe_version": RECIPE_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        "reference": {
            "implementation": "covidnet_jax.data.preprocess.preprocess_image",
            "pillow_version": PIL.__version__,
            "numpy_version": np.__version__,
        },
        "steps": [
            {
                "op": "decode_grayscale",
                "decoder": "Pillow Image.open; the first frame; pixels in the order stored",
                "exif_orientation": "ignored",
                "color_management": "none (ICC profiles, gAMA and sRGB chunks ignored)",
                "high_bit_depth": {
                    "pil_modes": list(HIGH_BIT_DEPTH_MODES),
                    "rule": BIT_DEPTH_RULE,
                    "bits": {
                        "of": "max(0, maximum of the image).bit_length()",
                        "at_least": MIN_BITS,
                        "round_up_to_multiple_of": BITS_MULTIPLE,
                    },
                    "formula": "clip(rint(v * 255 / (2**bits - 1)), 0, 255)",
                    "arithmetic": "float64",
                    "rounding": "half_to_even",
                    "negative_values": "clipped to 0",
                    "sbit_chunk": "ignored",
                    "note": (
                        "16-bit grey (PNG, TIFF, JPEG 2000) is divided by the full range of "
                        "the bit depth inferred from its maximum (8, 10, 12, 14, 16, ...), "
                        "not by 65535: 12-bit data stored in 16 bits is divided by 4095, and "
                        "an image saved as 16-bit by v * 257 gives back its 8-bit values. "
                        "Exports before recipe_version 2 divided by the image's own maximum "
                        f"({LEGACY_BIT_DEPTH_RULE!r}) when it was over 255."
                    ),
                },
                "other_modes": {
                    "pil": "Image.convert('L')",
                    "rgb_luma": {
                        "weights_q16": weights,
                        "add": 1 << 15,
                        "shift_right": 16,
                        "formula": (
                            f"({weights[0]} * R + {weights[1]} * G + {weights[2]} * B + 32768)"
                            " >> 16 (ITU-R 601-2 luma in Pillow's integer arithmetic)"
                        ),
                    },
                    "alpha": "dropped (not composited onto any background)",
                    "palette": "indices looked up in the palette's RGB, then rgb_luma",
                    "bilevel": "0 -> 0, 1 -> 255",
                    "colour_16_bit": (
                        "Pillow decodes 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits per "
                        "channel (the high byte of each sample), then rgb_luma"
                    ),
                },
                "output": {"dtype": "uint8", "layout": "HxW"},
            },
            {
                "op": "drop_top_rows",
                "fraction": TOP_CROP_FRACTION,
                "rounding": "floor",
                "rows": "floor(height * 8 / 100) rows from the top (integer arithmetic)",
            },
            {
                "op": "center_square_crop",
                "side": "min(height, width) of the image left by drop_top_rows",
                "offset_rounding": "floor",
                "offsets": "top = (height - side) // 2, left = (width - side) // 2",
            },
            {
                "op": "resize",
                "size": [resolution, resolution],
                "method": "bilinear_antialias",
                "input_dtype": "uint8",
                "output_dtype": "uint8",
                "pil": {
                    "call": (
                        f"Image.fromarray(square_uint8).resize(({resolution}, {resolution}), "
                        f"resample=Image.Resampling.{RESIZE_RESAMPLE}, "
                        f"reducing_gap={RESIZE_REDUCING_GAP})"
                    ),
                    "resample": RESIZE_RESAMPLE,
                    "reducing_gap": RESIZE_REDUCING_GAP,
                },
                "same_size": "unchanged (no resampling when side == resolution)",
                "note": (
                    "Pillow's algorithm (7.0 and later) for these arguments: if f = "
                    "int(side / resolution / reducing_gap) is 2 or more, the square is first "
                    "reduced by f with Image.reduce (each pixel the rounded mean of an f x f "
                    "block; blocks cut by the right or bottom edge average the pixels they "
                    "have), then the box (0, 0, side / f, side / f) of the result is resampled "
                    "with a separable triangle filter (support 1 pixel, widened by the scale "
                    "when shrinking) in Pillow's 8-bit fixed-point arithmetic. Plain bilinear "
                    "interpolation, or the same filter without the reduce step, differs by "
                    "up to a few grey levels."
                ),
            },
            {"op": "repeat_channels", "channels": channels},
            {
                "op": "scale",
                "divide_by": 255.0,
                "multiply": 1.0 / 255.0,
                "dtype": "float32",
                "formula": (
                    "float32(pixel) / 255 (multiplying by float32(1 / 255), as training "
                    "does, differs by at most one float32 ulp)"
                ),
            },
        ],
        "input": {
            "layout": "BxHxWxC",
            "shape": ["batch", resolution, resolution, channels],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "normalization": "none (no mean/std)",
        },
    }


def recipe_bit_depth_rule(recipe: Any) -> str:
    """The bit-depth rule a parsed `preprocessing.json` asks for (see
    `covidnet_jax.data.preprocess`): its `high_bit_depth.rule`, or the rule of preprocessing
    version 1 for a recipe written before `recipe_version` 2 (which has neither field).

    Raises:
        ValueError: "<key>: expected ..., got ..." for a recipe that is not an object, is of
            a newer recipe_version, or names no known rule.
    """
    if not isinstance(recipe, dict):
        raise ValueError(f"expected a JSON object, got {describe_value(recipe)}")
    version = recipe.get("recipe_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"recipe_version: expected a version number, got {describe_value(version)}"
        )
    if version > RECIPE_VERSION:
        raise ValueError(
            f"recipe_version {version} is newer than this covidnet-jax reads "
            f"({RECIPE_VERSION}); upgrade covidnet-jax"
        )
    steps = recipe.get("steps")
    decode: dict[str, Any] = {}
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("op") == "decode_grayscale":
            decode = step
            break
    high = decode.get("high_bit_depth")
    rule = high.get("rule", MISSING) if isinstance(high, dict) else MISSING
    if rule is MISSING and version < 2:
        return LEGACY_BIT_DEPTH_RULE
    if rule not in BIT_DEPTH_RULES:
        raise ValueError(
            "steps[decode_grayscale].high_bit_depth.rule: expected one of "
            f"{', '.join(BIT_DEPTH_RULES)}, got {describe_value(rule)}"
        )
    return rule
