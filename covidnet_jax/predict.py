"""Class probabilities for image files from a trained run.

Images go through exactly the training preprocessing (`covidnet_jax.data.preprocess_image`:
8-bit grey with high-bit-depth files scaled by their inferred bit depth, drop the top 8% of
rows, centre square crop, resize to the model's input size, scale to [0, 1];
`model_input`) and the run's best checkpoint by validation. `covidnet export` writes the
same steps as `preprocessing.json`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidnet_jax.data import preprocess_image
from covidnet_jax.data.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from covidnet_jax.evaluate import TrainedModel, load_trained


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's output for one image.

    Attributes:
        path: the image file.
        probabilities: class name -> probability (they sum to 1).
        predicted: the most probable class.
    """

    path: str
    probabilities: dict[str, float]
    predicted: str

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe dict."""
        return dataclasses.asdict(self)


def model_input(
    images: Sequence[str | Path],
    *,
    resolution: int,
    channels: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = "max_pixels",
) -> np.ndarray:
    """The batch the model is given for image files, as in training.

    Args:
        images: image files.
        resolution: the model's input side length.
        channels: the model's input channels.
        max_pixels: largest image (width x height) decoded.
        limit_name: the setting that raises `max_pixels`, named in the error.

    Returns:
        float32 B x resolution x resolution x channels in [0, 1].

    Raises:
        DataError: an image cannot be read or is too large (naming the file).
    """
    pixels_BxHxWxC = np.stack(
        [
            preprocess_image(
                p,
                resolution=resolution,
                channels=channels,
                max_pixels=max_pixels,
                limit_name=limit_name,
            )
            for p in images
        ]
    )
    return pixels_BxHxWxC.astype(np.float32) * np.float32(1.0 / 255.0)


def predict_images(
    workdir: str | Path,
    images: Sequence[str | Path],
    *,
    step: int | None = None,
    batch_size: int = 32,
    trained: TrainedModel | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = "max_pixels",
) -> list[Prediction]:
    """Class probabilities of image files.

    Args:
        workdir: a training workdir (its best checkpoint by validation is used).
        images: image files (PNG, JPEG, ...).
        step: a specific checkpoint step instead of the best.
        batch_size: images per forward pass.
        trained: an already restored model (then `workdir` and `step` are ignored).
        max_pixels: largest image (width x height) decoded; larger files are refused from
            their header as possible decompression bombs.
        limit_name: the setting that raises `max_pixels`, named in that error.

    Returns:
        One prediction per image, in order.

    Raises:
        CheckpointError: the workdir has no checkpoint.
        DataError: an image cannot be read or is too large (naming the file).
    """
    trained = load_trained(workdir, step=step) if trained is None else trained
    predictions: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        paths = list(images[start : start + batch_size])
        batch_BxHxWxC = model_input(
            paths,
            resolution=trained.resolution,
            channels=trained.channels,
            max_pixels=max_pixels,
            limit_name=limit_name,
        )
        probs_BxK = trained.predict_probabilities(batch_BxHxWxC)
        for path, probs in zip(paths, probs_BxK, strict=True):
            predictions.append(
                Prediction(
                    path=str(path),
                    probabilities={
                        name: float(p) for name, p in zip(trained.class_names, probs, strict=True)
                    },
                    predicted=trained.class_names[int(np.argmax(probs))],
                )
            )
    return predictions


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """A table: one row per image, one column per class probability."""
    if not predictions:
        return "no images"
    names = list(predictions[0].probabilities)
    width = max(len("image"), *(len(p.path) for p in predictions)) + 2
    cell = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'image':<{width}}" + "".join(f"{n:>{cell}}" for n in names) + "  predicted"]
    for p in predictions:
        row = "".join(f"{p.probabilities[n]:>{cell}.4f}" for n in names)
        lines.append(f"{p.path:<{width}}{row}  {p.predicted}")
    return "\n".join(lines)
