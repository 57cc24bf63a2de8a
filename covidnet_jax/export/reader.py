"""Reading an export folder and predicting from it.

`load_export` validates `export.json` and `preprocessing.json` and deserializes the StableHLO
artifact into a `LoadedExport`; `predict` and `predict_files` are the one-call APIs. Predicting
needs only jax and numpy (plus flatbuffers); `LoadedExport.restore_model` also rebuilds the
NNX model for attributions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from covidnet_jax.data.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    preprocess_image,
)
from covidnet_jax.export.inference_state import restore_inference_state
from covidnet_jax.export.layout import (
    CHECKPOINT_DIR,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST_FILE,
    MISSING,
    RECIPE_FILE,
    SPEC_FILE,
    STABLEHLO_FILE,
    ExportError,
    describe_value,
)
from covidnet_jax.export.recipe import recipe_bit_depth_rule


@dataclasses.dataclass(frozen=True)
class LoadedExport:
    """An export read from disk, ready to predict.

    Attributes:
        path: the export folder.
        manifest: the parsed `export.json`.
        recipe: the parsed `preprocessing.json`.
        exported: the deserialized `jax.export.Exported`.
    """

    path: Path
    manifest: Mapping[str, Any]
    recipe: Mapping[str, Any]
    exported: jax.export.Exported
    _call: Callable[[Any], jax.Array] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One jitted wrapper per artifact, so repeated batches of one size compile once.
        object.__setattr__(self, "_call", jax.jit(self.exported.call))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Output classes, in probability order."""
        return tuple(self.manifest["class_names"])

    @property
    def input_size(self) -> int:
        """Side length H = W of the model input."""
        return int(self.manifest["input"]["shape"][1])

    @property
    def channels(self) -> int:
        """Input channels C."""
        return int(self.manifest["input"]["shape"][3])

    @property
    def bit_depth_rule(self) -> str:
        """How high-bit-depth images become 8 bits for this export (`recipe_bit_depth_rule`):
        exports written before recipe version 2 keep the rule they were trained with."""
        return recipe_bit_depth_rule(self.recipe)

    def spec_json(self) -> str:
        """The text of the export's `spec.json`."""
        return (self.path / SPEC_FILE).read_text(encoding="utf-8")

    def preprocess(
        self,
        image: str | Path | np.ndarray,
        *,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        limit_name: str = "max_pixels",
    ) -> np.ndarray:
        """One image file or array -> float32 H x W x C in [0, 1], as the recipe says.

        High-bit-depth images are scaled by the export's `bit_depth_rule`. An image file over
        `max_pixels` (width x height) is refused from its header, as a possible
        decompression bomb, with a DataError naming it, its size and `limit_name`.
        """
        pixels = preprocess_image(
            image,
            resolution=self.input_size,
            channels=self.channels,
            max_pixels=max_pixels,
            limit_name=limit_name,
            bit_depth_rule=self.bit_depth_rule,
        )
        return pixels.astype(np.float32) / 255.0

    def predict_batch(self, images_BxHxWxC: Any) -> np.ndarray:
        """Class probabilities of preprocessed images.

        Args:
            images_BxHxWxC: float in [0, 1], or uint8 (scaled by 1/255 here).

        Returns:
            float32 B x K probabilities.

        Raises:
            ExportError: if the images do not have the export's H x W x C.
        """
        images = np.asarray(images_BxHxWxC)
        want = (self.input_size, self.input_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != want:
            raise ExportError(
                f"{self.path}: expects images B x {want[0]} x {want[1]} x {want[2]}, got "
                f"{'x'.join(map(str, images.shape))}"
            )
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        return np.asarray(self._call(images.astype(np.float32)))

    def predict_images(
        self,
        images: Sequence[str | Path | np.ndarray],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        limit_name: str = "max_pixels",
    ) -> np.ndarray:
        """Class probabilities of image files (or raw arrays), preprocessed as in training.

        Args:
            images: image paths or arrays.
            batch_size: images per call of the exported function.
            max_pixels: largest image file (width x height) decoded.
            limit_name: the setting that raises `max_pixels`, named in the error.

        Returns:
            float32 N x K probabilities, in the order of `images`.

        Raises:
            DataError: naming an unreadable or too large image.
        """
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [
                    self.preprocess(im, max_pixels=max_pixels, limit_name=limit_name)
                    for im in images[start : start + batch_size]
                ]
            )
            chunks.append(self.predict_batch(batch))
        if not chunks:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(chunks)

    def restore_model(self) -> nnx.Module:
        """Rebuilds the trained NNX model from the spec and the Orbax checkpoint (for
        attributions such as Grad-CAM, which need more than the exported function).

        Returns:
            The model (float32 compute), in eval mode.

        Raises:
            SpecError: if `spec.json` is not a valid spec.
            CheckpointError: if the checkpoint is missing or does not fit the spec.
        """
        from covidnet_jax.arch import spec_from_json

        return restore_inference_state(self.path / CHECKPOINT_DIR, spec_from_json(self.spec_json()))


def load_export(path: str | Path) -> LoadedExport:
    """Reads an export folder written by `write_export`.

    Needs only jax and numpy (plus flatbuffers) to predict from preprocessed batches.

    Args:
        path: the export folder.

    Returns:
        The `LoadedExport`.

    Raises:
        ExportError: one line naming the file (and key) at fault: the folder is missing, not
            an export, of a newer format version or incomplete, or its `export.json` is not
            valid JSON, lacks a key, holds a malformed value or disagrees with the model in
            `model.jax_export`, or its `preprocessing.json` is of a newer recipe version or
            names no known bit-depth rule (a recipe without `recipe_version`, written before
            version 2, is read with the rule of its time).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: export folder not found")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(
            f"{path}: not an export (no {MANIFEST_FILE}); create one with `covidnet export`"
        )
    manifest = _read_export_json(path, MANIFEST_FILE)
    recipe = _read_export_json(path, RECIPE_FILE)
    try:
        recipe_bit_depth_rule(recipe)
    except ValueError as err:
        raise ExportError(f"{path / RECIPE_FILE}: {err}") from None
    try:
        blob = (path / STABLEHLO_FILE).read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: incomplete export, missing {STABLEHLO_FILE}") from None
    except OSError as err:
        raise ExportError(f"{path / STABLEHLO_FILE}: unreadable ({err})") from None
    exported = _check_manifest(manifest, manifest_path, blob)
    return LoadedExport(path=path, manifest=manifest, recipe=recipe, exported=exported)


def _read_export_json(path: Path, name: str) -> Any:
    """The parsed JSON file `name` of the export folder `path` (ExportError if it is missing,
    unreadable or not JSON)."""
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: incomplete export, missing {name}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ExportError(f"{path / name}: not valid JSON ({err})") from None
    except OSError as err:
        raise ExportError(f"{path / name}: unreadable ({err})") from None


def _check_manifest(manifest: Any, manifest_path: Path, blob: bytes) -> jax.export.Exported:
    """Validates a parsed `export.json` and deserializes the artifact it describes.

    Checks, in order: a JSON object; `format` and `version`; `class_names` (a list of two
    or more distinct, non-empty strings); `input.shape` (["batch", H, H, C], H a supported
    resolution, C 1 or 3); then that the artifact takes B x H x H x C and returns one
    probability per class name. A tampered or truncated manifest fails here, with the key,
    rather than later with a KeyError or wrong class labels.

    Args:
        manifest: the parsed `export.json`.
        manifest_path: its path, for the messages.
        blob: the bytes of `model.jax_export`.

    Returns:
        The deserialized `jax.export.Exported`.

    Raises:
        ExportError: "<export.json>: <key>: expected ..., got ...", one line.
    """

    def fail(key: str, expected: str, value: Any) -> ExportError:
        return ExportError(
            f"{manifest_path}: {key}: expected {expected}, got {describe_value(value)}"
        )

    if not isinstance(manifest, dict):
        raise ExportError(
            f"{manifest_path}: expected a JSON object, got {describe_value(manifest)}"
        )
    if manifest.get("format") != EXPORT_FORMAT:
        raise fail(
            "format", f"{EXPORT_FORMAT!r} (a covidnet-jax export)", manifest.get("format", MISSING)
        )
    version = manifest.get("version", MISSING)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fail("version", "a format version number", version)
    if version > EXPORT_VERSION:
        raise ExportError(
            f"{manifest_path}: export format version {version} is newer than this "
            f"covidnet-jax reads ({EXPORT_VERSION}); upgrade covidnet-jax"
        )
    names = manifest.get("class_names", MISSING)
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise fail("class_names", "a list of two or more distinct class names", names)
    if not isinstance(manifest.get("input"), dict) or "shape" not in manifest["input"]:
        raise fail(
            "input",
            'an object with "shape": ["batch", H, W, C] (as covidnet export writes it)',
            manifest.get("input", MISSING),
        )
    shape = manifest["input"]["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape[1:])
        or shape[1] != shape[2]
        or not MIN_RESOLUTION <= shape[1] <= MAX_RESOLUTION
        or shape[3] not in (1, 3)
    ):
        raise fail(
            "input.shape",
            f'["batch", H, H, C] with H in {MIN_RESOLUTION}..{MAX_RESOLUTION} and C 1 or 3',
            shape,
        )
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # corrupt bytes surface as assorted flatbuffer/MLIR errors
        where = manifest_path.with_name(STABLEHLO_FILE)
        raise ExportError(f"{where}: cannot deserialize ({err})") from None
    takes = tuple(exported.in_avals[0].shape[1:])
    if takes != tuple(shape[1:]):
        raise fail(
            "input.shape",
            f'the input of {STABLEHLO_FILE}, ["batch", {", ".join(map(str, takes))}]',
            shape,
        )
    outputs = exported.out_avals[0].shape[-1]
    if outputs != len(names):
        raise fail("class_names", f"{outputs} names, one per output of {STABLEHLO_FILE}", names)
    return exported


def predict(
    export_dir: str | Path,
    images: Sequence[str | Path | np.ndarray],
    *,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Loads an export and returns class probabilities of image files: the one-call API.

    Args:
        export_dir: an export folder written by `covidnet export`.
        images: image paths (or raw image arrays), preprocessed as in training.
        batch_size: images per call of the exported function.
        max_pixels: largest image file (width x height) decoded; larger ones are refused
            as possible decompression bombs.

    Returns:
        float32 N x K probabilities; the class order is `load_export(export_dir).class_names`.

    Raises:
        ExportError: for a missing or broken export.
        DataError: naming an unreadable image.

    Example:
        >>> probs = predict("runs/quickstart/export", ["chest.png"])
    """
    return load_export(export_dir).predict_images(
        images, batch_size=batch_size, max_pixels=max_pixels
    )


def predict_files(
    export_dir: str | Path,
    images: Sequence[str | Path],
    *,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = "max_pixels",
):
    """Predictions in the form `covidnet predict --workdir` prints (`covidnet_jax.predict`).

    Args:
        export_dir: an export folder.
        images: image files.
        batch_size: images per call of the exported function.
        max_pixels: largest image file (width x height) decoded.
        limit_name: the setting that raises `max_pixels`, named in the error.

    Returns:
        One `covidnet_jax.predict.Prediction` per image, in order.

    Raises:
        ExportError: for a missing or broken export.
        DataError: naming an unreadable image.
    """
    from covidnet_jax.predict import Prediction

    loaded = load_export(export_dir)
    probs_NxK = loaded.predict_images(
        list(images), batch_size=batch_size, max_pixels=max_pixels, limit_name=limit_name
    )
    names = loaded.class_names
    return [
        Prediction(
            path=str(path),
            probabilities={name: float(p) for name, p in zip(names, probs, strict=True)},
            predicted=names[int(np.argmax(probs))],
        )
        for path, probs in zip(images, probs_NxK, strict=True)
    ]
