"""`preprocessing.json` alone reproduces the model input.

`recipe_input` below is an implementation of the recipe with NumPy and PIL only, as someone
deploying an export without this package would write it: it reads every number and choice
from the recipe's fields (indexing, so a missing field raises) and calls nothing of
`covidnet_jax`. It must match what `covidnet predict` gives the model (both the export path
and the workdir path) to 1e-5 on 8-bit, 16-bit (full range, 12-bit-in-16, 8-bit-in-16),
32-bit integer, colour with alpha and EXIF orientation, palette and large non-square files,
and every field it reads must matter: a wrong or missing value breaks the match.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageOps

from covidnet_jax import export, predict
from covidnet_jax.data import preprocess
from covidnet_jax.models import build_model
from covidnet_jax.presets import get_preset

ATOL = 1e-5

# ---------------------------------------------------------------------------------------
# The independent implementation: preprocessing.json + NumPy + PIL, nothing else.

_ROUNDING = {"floor": math.floor, "ceil": math.ceil, "round": round}


def _decode_grayscale(step: dict[str, Any], path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        orientation = step["exif_orientation"]
        if orientation == "applied":
            img = ImageOps.exif_transpose(img)
        elif orientation != "ignored":
            raise ValueError(f"exif_orientation {orientation!r}")
        high = step["high_bit_depth"]
        if img.mode in high["pil_modes"]:
            values = np.asarray(img).astype(np.float64)
            if high["negative_values"] != "clipped to 0":
                raise ValueError(high["negative_values"])
            values = np.maximum(values, 0)
            top = int(values.max())
            if high["rule"] == "inferred_bit_depth":
                bits_of = high["bits"]
                bits = max(bits_of["at_least"], top.bit_length())
                multiple = bits_of["round_up_to_multiple_of"]
                bits = multiple * math.ceil(bits / multiple)
                scaled = values * 255 / (2**bits - 1)
            elif high["rule"] == "per_image_max":
                scaled = values * 255 / top if top > 255 else values
            else:
                raise ValueError(high["rule"])
            if high["rounding"] != "half_to_even":
                raise ValueError(high["rounding"])
            return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        other = step["other_modes"]
        if img.mode == "L":
            return np.asarray(img, dtype=np.uint8)
        if img.mode in ("LA", "RGBA") and not other["alpha"].startswith("dropped"):
            raise ValueError(other["alpha"])
        if img.mode == "LA":
            return np.asarray(img)[:, :, 0]
        if img.mode == "P":
            if not other["palette"].startswith("indices looked up in the palette's RGB"):
                raise ValueError(other["palette"])
            img = img.convert("RGB")
        if img.mode in ("RGB", "RGBA"):
            luma = other["rgb_luma"]
            rgb = np.asarray(img)[:, :, :3].astype(np.int64)
            weighted = rgb @ np.asarray(luma["weights_q16"], np.int64)
            return ((weighted + luma["add"]) >> luma["shift_right"]).astype(np.uint8)
        if other["pil"] != "Image.convert('L')":  # any other mode, e.g. CMYK or F
            raise ValueError(other["pil"])
        return np.asarray(img.convert("L"), dtype=np.uint8)


def recipe_input(recipe: dict[str, Any], path: Path) -> np.ndarray:
    """One image file -> the model's H x W x C input, from the recipe alone."""
    image = None
    for step in recipe["steps"]:
        op = step["op"]
        if op == "decode_grayscale":
            image = _decode_grayscale(step, path)
        elif op == "drop_top_rows":
            rows = _ROUNDING[step["rounding"]](image.shape[0] * step["fraction"])
            image = image[rows:]
        elif op == "center_square_crop":
            height, width = image.shape
            side = min(height, width)
            rounding = _ROUNDING[step["offset_rounding"]]
            top, left = rounding((height - side) / 2), rounding((width - side) / 2)
            image = image[top : top + side, left : left + side]
        elif op == "resize":
            if image.dtype.name != step["input_dtype"]:
                raise ValueError(step["input_dtype"])
            size = tuple(step["size"])
            if image.shape != size:
                pil = step["pil"]
                resized = Image.fromarray(image).resize(
                    size,
                    resample=Image.Resampling[pil["resample"]],
                    reducing_gap=pil["reducing_gap"],
                )
                image = np.asarray(resized)
            if image.dtype.name != step["output_dtype"]:
                raise ValueError(step["output_dtype"])
        elif op == "repeat_channels":
            image = np.repeat(image[:, :, None], step["channels"], axis=2)
        elif op == "scale":
            image = image.astype(step["dtype"]) / step["divide_by"]
        else:
            raise ValueError(f"unknown op {op!r}")
    want = recipe["input"]
    if list(image.shape) != want["shape"][1:] or image.dtype.name != want["dtype"]:
        raise ValueError(f"got {image.shape} {image.dtype}, the recipe says {want}")
    return image


# ---------------------------------------------------------------------------------------
# Test images.


def _radiograph(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth structure plus noise in [0, 1]: every resize detail shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    body = 0.5 + 0.3 * np.sin(9 * x) * np.cos(7 * y) + 0.15 * np.sin(40 * x * y)
    return np.clip(body + rng.normal(0, 0.08, (height, width)), 0, 1)


def _write_images(folder: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}

    def save(name: str, array: np.ndarray, **kwargs: Any) -> None:
        paths[name] = folder / name
        Image.fromarray(array).save(paths[name], **kwargs)

    save("grey_8bit.png", np.rint(_radiograph(301, 260, 0) * 255).astype(np.uint8))
    # 1024 wide, 1108 high: reduce-then-resample (reducing_gap) matters here.
    save("large_1024x1108.png", np.rint(_radiograph(1108, 1024, 1) * 255).astype(np.uint8))
    full = np.rint(_radiograph(420, 397, 2) * 65535).astype(np.uint16)
    full[0, 0] = 65535
    save("full_range_16bit.png", full)
    twelve = np.rint(_radiograph(387, 410, 3) * 4095).astype(np.uint16)
    twelve[-1, -1] = 4095
    save("12bit_in_16.png", twelve)
    # Maximum 1900: 11 significant bits, read as a 12-bit detector.
    save("dim_12bit_in_16.png", np.rint(_radiograph(350, 333, 4) * 1900).astype(np.uint16))
    # 8-bit values stored unscaled in a 16-bit container.
    save("8bit_in_16.png", np.rint(_radiograph(300, 311, 5) * 200).astype(np.uint16))
    save("14bit_int32.tif", np.rint(_radiograph(290, 310, 6) * 16383).astype(np.int32))
    grey = _radiograph(280, 352, 7)
    rgba = np.stack([grey, grey**1.3, grey**0.7, 1 - grey / 2], axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": the recipe says it is ignored
    save("rgba_exif6.png", np.rint(rgba * 255).astype(np.uint8), exif=exif)
    colour = np.rint(np.stack([grey, grey**2, 1 - grey], axis=2) * 255).astype(np.uint8)
    paths["palette.png"] = folder / "palette.png"
    Image.fromarray(colour).quantize(64).save(paths["palette.png"])
    save("small_40x48.png", np.rint(_radiograph(48, 40, 8) * 255).astype(np.uint8))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    paths = _write_images(tmp_path_factory.mktemp("images"))
    modes = {}
    for name, path in paths.items():
        with Image.open(path) as img:
            modes[name] = img.mode
    assert modes["full_range_16bit.png"] == "I;16" and modes["14bit_int32.tif"] == "I"
    assert modes["rgba_exif6.png"] == "RGBA" and modes["palette.png"] == "P"
    return paths


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    spec = dataclasses.replace(get_preset("tiny"), input_channels=1, class_names=("a", "b"))
    model = build_model(spec, rngs=nnx.Rngs(3))
    card = export.ModelCard(
        title="recipe test",
        spec_summary=spec.summary(),
        class_names=spec.class_names,
        params=1,
        macs=1,
    )
    out = tmp_path_factory.mktemp("export") / "export"
    return export.write_export(model, spec, out, card=card, platforms=("cpu",))


# ---------------------------------------------------------------------------------------
# Tests.


def test_recipe_file_alone_reproduces_covidnet_predict_input(tiny_export, images):
    recipe = json.loads((tiny_export / "preprocessing.json").read_text())
    assert recipe["recipe_version"] == export.RECIPE_VERSION
    loaded = export.load_export(tiny_export)
    for name, path in images.items():
        mine = recipe_input(recipe, path)
        # `covidnet predict --model` (export) and `covidnet predict --workdir` (predict.py).
        np.testing.assert_allclose(loaded.preprocess(path), mine, rtol=0, atol=ATOL, err_msg=name)
        workdir_input = predict.model_input(
            [path], resolution=loaded.input_size, channels=loaded.channels
        )
        np.testing.assert_allclose(workdir_input[0], mine, rtol=0, atol=ATOL, err_msg=name)
    # And the probabilities: the artifact fed the recipe's input, as a deployment would.
    paths = list(images.values())
    mine_BxHxWxC = np.stack([recipe_input(recipe, p) for p in paths])
    with open(tiny_export / "model.jax_export", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    np.testing.assert_allclose(
        np.asarray(exported.call(mine_BxHxWxC)), export.predict(tiny_export, paths), atol=1e-6
    )


@pytest.mark.parametrize(("resolution", "channels"), [(224, 3), (480, 1)])
def test_recipe_reproduces_preprocessing_at_paper_resolutions(images, resolution, channels):
    recipe = json.loads(
        json.dumps(export.preprocessing_recipe(resolution=resolution, channels=channels))
    )
    paths = list(images.values())
    want = predict.model_input(paths, resolution=resolution, channels=channels)
    for i, (name, path) in enumerate(images.items()):
        mine = recipe_input(recipe, path)
        np.testing.assert_allclose(mine, want[i], rtol=0, atol=ATOL, err_msg=name)


def _set(recipe: dict[str, Any], op: str, keys: str, value: Any) -> None:
    node = next(step for step in recipe["steps"] if step["op"] == op)
    *parents, last = keys.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


_WRONG = [
    ("decode_grayscale", "exif_orientation", "applied"),
    ("decode_grayscale", "high_bit_depth.pil_modes", ["I"]),
    ("decode_grayscale", "high_bit_depth.rule", "per_image_max"),
    ("decode_grayscale", "high_bit_depth.bits.at_least", 10),
    ("decode_grayscale", "high_bit_depth.bits.round_up_to_multiple_of", 1),
    ("decode_grayscale", "other_modes.rgb_luma.weights_q16", [21845, 21846, 21845]),
    ("decode_grayscale", "other_modes.rgb_luma.add", 0),
    ("decode_grayscale", "other_modes.rgb_luma.shift_right", 15),
    ("decode_grayscale", "other_modes.alpha", "composited onto white"),
    ("decode_grayscale", "other_modes.palette", "indices used as grey levels"),
    ("decode_grayscale", "high_bit_depth.negative_values", "absolute value"),
    ("decode_grayscale", "high_bit_depth.rounding", "half_up"),
    ("drop_top_rows", "fraction", 0.1),
    ("drop_top_rows", "rounding", "round"),
    ("center_square_crop", "offset_rounding", "ceil"),
    ("resize", "pil.resample", "BICUBIC"),
    ("resize", "pil.reducing_gap", None),
    ("resize", "size", [223, 223]),
    ("repeat_channels", "channels", 1),
    ("scale", "divide_by", 256.0),
    ("scale", "dtype", "float64"),
]


class _Reads(dict):
    """A recipe that records the key path of every field `recipe_input` looks up."""

    def __init__(self, data: dict[str, Any], path: tuple, seen: set[tuple]) -> None:
        super().__init__({k: _reads(v, (*path, k), seen) for k, v in data.items()})
        self._path, self._seen = path, seen

    def __getitem__(self, key: str) -> Any:
        self._seen.add((*self._path, key))
        return super().__getitem__(key)


def _reads(value: Any, path: tuple, seen: set[tuple]) -> Any:
    if isinstance(value, dict):
        return _Reads(value, path, seen)
    if isinstance(value, list):
        return [_reads(v, (*path, i), seen) for i, v in enumerate(value)]
    return value


def _breaks(recipe: dict[str, Any], images: dict[str, Path], want: list[np.ndarray]) -> bool:
    """Whether `recipe_input` under this recipe fails or misses the input on some image."""
    for path, good in zip(images.values(), want, strict=True):
        try:
            mine = recipe_input(recipe, path)
        except (KeyError, ValueError, TypeError):
            return True
        if mine.shape != good.shape or mine.dtype != good.dtype:
            return True
        if np.max(np.abs(mine.astype(np.float64) - good)) > ATOL:
            return True
    return False


def test_a_wrong_or_missing_recipe_field_breaks_the_match(images):
    recipe = export.preprocessing_recipe(resolution=224, channels=3)
    paths = list(images.values())
    want = list(predict.model_input(paths, resolution=224, channels=3))
    assert not _breaks(recipe, images, want)
    survivors = []
    for op, keys, value in _WRONG:
        wrong = copy.deepcopy(recipe)
        _set(wrong, op, keys, value)
        if not _breaks(wrong, images, want):
            survivors.append(f"{op}.{keys} = {value!r}")
    read: set[tuple] = set()
    assert not _breaks(_reads(recipe, (), read), images, want)
    assert len(read) >= 25, sorted(read)
    for path in sorted(read, key=str):
        missing = copy.deepcopy(recipe)
        node = missing
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        if not _breaks(missing, images, want):
            survivors.append(f"{'.'.join(map(str, path))} deleted")
    swapped = copy.deepcopy(recipe)
    swapped["steps"][1], swapped["steps"][2] = swapped["steps"][2], swapped["steps"][1]
    if not _breaks(swapped, images, want):
        survivors.append("drop_top_rows and center_square_crop swapped")
    assert not survivors, f"the test images do not notice: {survivors}"


# The preprocessing.json that exports wrote before recipe_version 2 (verbatim).
_RECIPE_V1 = {
    "preprocess_version": 1,
    "steps": [
        {"op": "decode_grayscale", "note": "8-bit luma (ITU-R 601); 16-bit scaled to 8 bits"},
        {"op": "drop_top_rows", "fraction": 0.08, "rounding": "floor"},
        {"op": "center_square_crop", "offset_rounding": "floor"},
        {"op": "resize", "size": [32, 32], "method": "bilinear_antialias"},
        {"op": "repeat_channels", "channels": 1},
        {"op": "scale", "multiply": 1.0 / 255.0, "dtype": "float32"},
    ],
    "input": {
        "layout": "BxHxWxC",
        "shape": ["batch", 32, 32, 1],
        "dtype": "float32",
        "range": [0.0, 1.0],
        "normalization": "none (no mean/std)",
    },
}


def test_exports_before_recipe_version_2_load_and_keep_their_rule(tiny_export, images, tmp_path):
    old = tmp_path / "old_export"
    shutil.copytree(tiny_export, old)
    (old / "preprocessing.json").write_text(json.dumps(_RECIPE_V1, indent=2) + "\n")
    loaded = export.load_export(old)
    assert loaded.bit_depth_rule == "per_image_max"
    legacy = json.loads((tiny_export / "preprocessing.json").read_text())
    _set(legacy, "decode_grayscale", "high_bit_depth.rule", "per_image_max")
    for name, path in images.items():
        np.testing.assert_allclose(
            loaded.preprocess(path), recipe_input(legacy, path), atol=ATOL, err_msg=name
        )
    assert export.predict(old, [images["dim_12bit_in_16.png"]]).shape == (1, 2)
    recipe = json.loads((tiny_export / "preprocessing.json").read_text())
    for mutate, message in [
        (lambda r: r.update(recipe_version=99), "recipe_version 99 is newer"),
        (lambda r: _set(r, "decode_grayscale", "high_bit_depth.rule", "x"), "rule: expected"),
    ]:
        bad = copy.deepcopy(recipe)
        mutate(bad)
        (old / "preprocessing.json").write_text(json.dumps(bad))
        with pytest.raises(export.ExportError, match=message) as err:
            export.load_export(old)
        assert "preprocessing.json" in str(err.value) and "\n" not in str(err.value)


def test_one_radiograph_as_8_bit_and_as_16_bit_reaches_the_model_alike(images, tmp_path):
    grey = np.asarray(Image.open(images["grey_8bit.png"]))
    as_16 = {
        "times_257.png": grey.astype(np.uint16) * 257,  # the usual 8 -> 16-bit conversion
        "unscaled.png": grey.astype(np.uint16),
    }
    want = preprocess.preprocess_image(images["grey_8bit.png"], resolution=64, channels=1)
    for name, array in as_16.items():
        Image.fromarray(array).save(tmp_path / name)
        got = preprocess.preprocess_image(tmp_path / name, resolution=64, channels=1)
        np.testing.assert_array_equal(got, want, err_msg=name)
        # Arrays follow the same rule as files.
        np.testing.assert_array_equal(
            preprocess.preprocess_image(array, resolution=64, channels=1), want, err_msg=name
        )
    # 12 bits stored shifted left (as PNG's sBIT convention asks) or unscaled: the same.
    twelve = np.asarray(Image.open(images["12bit_in_16.png"])).astype(np.uint16)
    Image.fromarray(twelve << 4).save(tmp_path / "shifted.png")
    a = preprocess.decode_image(tmp_path / "shifted.png").astype(int)
    b = preprocess.decode_image(images["12bit_in_16.png"]).astype(int)
    assert np.abs(a - b).max() <= 1
    assert b.max() == 255 and b.mean() > 64  # not nearly black, as /65535 would make it
    # 8-bit files are untouched by the change of rule.
    for name in ("grey_8bit.png", "rgba_exif6.png", "palette.png", "8bit_in_16.png"):
        new, old = (
            preprocess.preprocess_image(images[name], resolution=64, channels=1, bit_depth_rule=r)
            for r in (preprocess.BIT_DEPTH_RULE, preprocess.LEGACY_BIT_DEPTH_RULE)
        )
        np.testing.assert_array_equal(new, old, err_msg=name)


def test_inferred_bit_depth():
    depth = preprocess.inferred_bit_depth
    assert [depth(m) for m in (0, 200, 255, 256, 1023, 1024, 1900, 4095, 9000, 65535)] == [
        8, 8, 8, 10, 10, 12, 12, 12, 14, 16,
    ]  # fmt: skip
    assert depth(-5) == 8 and depth(2**20 - 1) == 20
