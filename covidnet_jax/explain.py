"""Where a model looks: Grad-CAM, integrated gradients, overlays and their validation.

Two attributions of one class score to the input image:

- **Grad-CAM** over the output of the last PEPX stage: the feature maps `A_BxhxwxC` of
  `model.features(x)` weighted by the spatial mean of d score / d A, summed over channels,
  rectified and resized to the input size. It relies on the split
  `model(x) == model.classify(model.features(x))`.
- **Integrated gradients** from a black baseline: (x - x0) times the mean gradient along the
  straight path x0 -> x (midpoint rule), summed in absolute value over channels.

Both return maps in [0, 1] (each image scaled by its maximum; an all-zero map stays zero).
`lesion_hit_rates` scores such maps against known lesion masks with the pointing game
(does the hottest pixel lie in the lesion?) and the heat mass inside the mask, and
`random_map_rates` gives the same two numbers for random maps, the baseline an attribution
has to beat.

Example:
    >>> heat_BxHxW, target_B = grad_cam(model, images_BxHxWxC)
    >>> rates = lesion_hit_rates(heat_BxHxW, masks_BxHxW)
    >>> rates.pointing, rates.mass
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from covidnet_jax.data.covidx import open_covidx_folder
from covidnet_jax.data.preprocess import TOP_CROP_FRACTION, preprocess_image
from covidnet_jax.errors import DataError

__all__ = [
    "HitRates",
    "LesionSet",
    "LocalizationReport",
    "grad_cam",
    "heatmap_to_original",
    "integrated_gradients",
    "integrated_gradients_attribution",
    "lesion_hit_rates",
    "load_lesion_set",
    "localization_report",
    "overlay_heatmap",
    "random_map_rates",
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


@dataclasses.dataclass(frozen=True)
class HitRates:
    """How well heatmaps fall on lesions.

    Attributes:
        pointing: fraction of images whose hottest pixel lies inside the lesion mask (an
            all-zero map counts as a miss).
        mass: mean over images of the fraction of heat inside the mask.
        count: number of images scored.
    """

    pointing: float
    mass: float
    count: int


def _check_maps(heat_BxHxW: np.ndarray, mask_BxHxW: np.ndarray) -> None:
    if heat_BxHxW.ndim != 3 or heat_BxHxW.shape != mask_BxHxW.shape:
        raise ValueError(
            f"heatmaps and masks must both be BxHxW of one shape, got {heat_BxHxW.shape} "
            f"and {mask_BxHxW.shape}"
        )
    if heat_BxHxW.shape[0] == 0:
        raise ValueError("no images to score")


def _score_maps(heat_BxHxW: np.ndarray, inside_BxHxW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pointing hits (bool B) and heat mass inside the mask (float B)."""
    flat_heat = heat_BxHxW.reshape(heat_BxHxW.shape[0], -1)
    flat_inside = inside_BxHxW.reshape(flat_heat.shape)
    peak = np.argmax(flat_heat, axis=1)
    hits = flat_inside[np.arange(flat_heat.shape[0]), peak] & (flat_heat.max(axis=1) > 0)
    total = flat_heat.sum(axis=1)
    mass = np.where(total > 0, (flat_heat * flat_inside).sum(axis=1) / np.maximum(total, 1e-30), 0)
    return hits, mass


def lesion_hit_rates(heat_BxHxW: Any, mask_BxHxW: Any) -> HitRates:
    """Pointing-game hit rate and mean heat mass inside the lesion masks.

    Args:
        heat_BxHxW: non-negative heatmaps at the masks' size.
        mask_BxHxW: lesion masks (non-zero inside the lesion).

    Returns:
        The `HitRates` over the batch.

    Raises:
        ValueError: if the shapes differ or the batch is empty.

    Example:
        >>> lesion_hit_rates(heat_BxHxW, masks_BxHxW).pointing
    """
    heat = np.asarray(heat_BxHxW, np.float64)
    inside = np.asarray(mask_BxHxW) > 0
    _check_maps(heat, inside)
    hits, mass = _score_maps(heat, inside)
    return HitRates(pointing=float(hits.mean()), mass=float(mass.mean()), count=len(hits))


def random_map_rates(mask_BxHxW: Any, *, seed: int, draws: int = 100) -> HitRates:
    """The baseline: the same rates for maps of independent uniform noise.

    For such maps the expected pointing rate and heat mass both equal the lesion's share of
    the image; the estimate averages `draws` maps per mask.

    Args:
        mask_BxHxW: lesion masks (non-zero inside the lesion).
        seed: seed of the noise.
        draws: random maps per mask.

    Returns:
        The `HitRates` averaged over all maps (count = number of masks).

    Example:
        >>> random_map_rates(masks_BxHxW, seed=0).pointing
    """
    inside = np.asarray(mask_BxHxW) > 0
    _check_maps(inside.astype(np.float64), inside)
    rng = np.random.default_rng(seed)
    pointing, mass = [], []
    for _ in range(draws):
        noise = rng.random(inside.shape)
        hits, share = _score_maps(noise, inside)
        pointing.append(hits.mean())
        mass.append(share.mean())
    return HitRates(pointing=float(np.mean(pointing)), mass=float(np.mean(mass)), count=len(inside))


@dataclasses.dataclass(frozen=True)
class LesionSet:
    """Images of lesion classes with their lesion masks, preprocessed for one model.

    Attributes:
        images_BxHxWxC: float32 in [0, 1], as the model sees them.
        masks_BxHxW: bool, the lesion masks put through the same crop and resize.
        labels_B: int32 class indices into `class_names`.
        paths: the image files.
        class_names: the model's classes, in label order.
    """

    images_BxHxWxC: np.ndarray
    masks_BxHxW: np.ndarray
    labels_B: np.ndarray
    paths: tuple[str, ...]
    class_names: tuple[str, ...]


def load_lesion_set(
    covidx_dir: str | Path,
    *,
    resolution: int,
    channels: int,
    class_names: tuple[str, ...],
    split: str = "test",
    limit: int | None = None,
) -> LesionSet:
    """Reads the images of a split whose lesion masks are non-empty (the synthetic data set
    writes one mask per image to `masks/<file name>`; normal images have empty masks).

    Args:
        covidx_dir: a COVIDx-format folder with a `masks/` folder.
        resolution: the model's input side.
        channels: the model's input channels.
        class_names: the model's classes, in label order.
        split: "train" or "test".
        limit: keep at most this many images (in split-file order).

    Returns:
        The `LesionSet`.

    Raises:
        DataError: for a bad split name, a folder without masks, or a split without any
            image with a lesion.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    folder = open_covidx_folder(covidx_dir, classes=class_names)
    mask_dir = Path(covidx_dir) / "masks"
    if not mask_dir.is_dir():
        raise DataError(
            f"{covidx_dir}: no masks/ folder; lesion masks come with the synthetic data set "
            "(covidnet data synth)"
        )
    entries = folder.train if split == "train" else folder.test
    images, masks, labels, paths = [], [], [], []
    for entry, path in zip(entries.entries, entries.image_paths(), strict=True):
        mask_path = mask_dir / entry.filename
        if not mask_path.is_file():
            continue
        mask = preprocess_image(mask_path, resolution=resolution, channels=1)[..., 0] >= 128
        if not mask.any():
            continue
        images.append(preprocess_image(path, resolution=resolution, channels=channels))
        masks.append(mask)
        labels.append(class_names.index(entry.label))
        paths.append(str(path))
        if limit is not None and len(paths) >= limit:
            break
    if not paths:
        raise DataError(f"{covidx_dir}: no {split} image has a non-empty lesion mask")
    return LesionSet(
        images_BxHxWxC=np.stack(images).astype(np.float32) / 255.0,
        masks_BxHxW=np.stack(masks),
        labels_B=np.asarray(labels, np.int32),
        paths=tuple(paths),
        class_names=tuple(class_names),
    )


@dataclasses.dataclass(frozen=True)
class LocalizationReport:
    """Attribution maps against lesion masks, and the random-map baseline.

    Attributes:
        grad_cam: hit rates of Grad-CAM.
        integrated_gradients: hit rates of integrated gradients.
        random: hit rates of uniform random maps.
        lesion_fraction: mean share of the image covered by the lesion.
        accuracy: the model's accuracy on these images.
        by_class: class name -> {"grad_cam", "integrated_gradients", "random"} -> hit rates
            over that class's images.
    """

    grad_cam: HitRates
    integrated_gradients: HitRates
    random: HitRates
    lesion_fraction: float
    accuracy: float
    by_class: dict[str, dict[str, HitRates]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(graphdef: Any, state: Any, images_BxHxWxC: jax.Array) -> jax.Array:
    return _eval_copy(graphdef, state)(images_BxHxWxC)


def _predicted_classes(model: nnx.Module, images_BxHxWxC: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jnp.argmax(_logits_jit(graphdef, state, jnp.asarray(images_BxHxWxC)), -1))


def localization_report(
    model: nnx.Module,
    lesions: LesionSet,
    *,
    seed: int = 0,
    batch_size: int = 32,
    ig_steps: int = 32,
    draws: int = 100,
) -> LocalizationReport:
    """Scores Grad-CAM and integrated gradients of each image's true class against its
    lesion mask, next to random maps.

    Args:
        model: the trained model.
        lesions: images with lesion masks.
        seed: seed of the random maps.
        batch_size: images per attribution call.
        ig_steps: path points of integrated gradients.
        draws: random maps per mask.

    Returns:
        The `LocalizationReport`.
    """
    cams, igs, correct = [], [], 0
    for start in range(0, len(lesions.paths), batch_size):
        images = lesions.images_BxHxWxC[start : start + batch_size]
        labels = lesions.labels_B[start : start + batch_size]
        cams.append(grad_cam(model, images, target=labels)[0])
        igs.append(integrated_gradients(model, images, target=labels, steps=ig_steps)[0])
        correct += int((_predicted_classes(model, images) == labels).sum())
    masks, cam_maps, ig_maps = lesions.masks_BxHxW, np.concatenate(cams), np.concatenate(igs)
    by_class = {}
    for label in np.unique(lesions.labels_B):
        pick = lesions.labels_B == label
        by_class[lesions.class_names[label]] = {
            "grad_cam": lesion_hit_rates(cam_maps[pick], masks[pick]),
            "integrated_gradients": lesion_hit_rates(ig_maps[pick], masks[pick]),
            "random": random_map_rates(masks[pick], seed=seed, draws=draws),
        }
    return LocalizationReport(
        grad_cam=lesion_hit_rates(cam_maps, masks),
        integrated_gradients=lesion_hit_rates(ig_maps, masks),
        random=random_map_rates(masks, seed=seed, draws=draws),
        lesion_fraction=float(masks.mean()),
        accuracy=correct / len(lesions.paths),
        by_class=by_class,
    )


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
