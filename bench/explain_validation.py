"""Do the heatmaps fall on the lesions? Grad-CAM and integrated gradients vs random maps.

The synthetic data set knows where its lesions are (`masks/`). Over the images of a split
whose lesion mask is non-empty (pneumonia and COVID-19), each image's true class is
explained and scored two ways:

- pointing game: the hottest pixel of the map lies inside the lesion mask;
- mass inside the mask: the share of the map's total heat that falls on the lesion.

Random maps (uniform noise) hit as often as the lesion is large; a useful attribution must
clearly beat them. Results print as a table and go to a JSON file.

The scoring lives here, beside the one benchmark that uses it (tests load this file too):
`lesion_hit_rates`, `random_map_rates`, `load_lesion_set` and `localization_report`.

    python bench/explain_validation.py --model runs/quickstart/export --data data/synth
    python bench/explain_validation.py --workdir runs/smoke --data data/synth --limit 100
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidnet_jax.data.covidx import open_covidx_folder
from covidnet_jax.data.preprocess import preprocess_image
from covidnet_jax.errors import DataError
from covidnet_jax.explain import grad_cam, integrated_gradients


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
    model = nnx.merge(graphdef, state)
    model.eval()  # running BatchNorm statistics, no dropout; the caller's module untouched
    return model(images_BxHxWxC)


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


def _load_model(args: argparse.Namespace) -> tuple[nnx.Module, object, str]:
    if args.model:
        from covidnet_jax.arch import spec_from_json
        from covidnet_jax.export import load_export

        loaded = load_export(args.model)
        return loaded.restore_model(), spec_from_json(loaded.spec_json()), str(args.model)
    from covidnet_jax.evaluate import load_trained

    trained = load_trained(args.workdir)
    params, model_state = jax.device_get((trained.params, trained.model_state))
    model = nnx.merge(trained.fns.graphdef_eval, params, model_state)
    return model, trained.spec, f"{args.workdir} (step {trained.step})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an export folder (covidnet export)")
    source.add_argument("--workdir", help="a training workdir (its best checkpoint)")
    parser.add_argument("--data", required=True, help="the synthetic COVIDx folder with masks/")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--limit", type=int, help="score at most this many lesion images")
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--draws", type=int, default=200, help="random maps per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/explain_validation.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, spec, where = _load_model(args)
    lesions = load_lesion_set(
        args.data,
        resolution=spec.input_size,
        channels=spec.input_channels,
        class_names=tuple(spec.class_names),
        split=args.split,
        limit=args.limit,
    )
    report = localization_report(
        model, lesions, seed=args.seed, ig_steps=args.ig_steps, draws=args.draws
    )
    seconds = time.perf_counter() - start
    print(f"model: {where}  ({spec.summary()})")
    print(
        f"{len(lesions.paths)} {args.split} images with lesions, mean lesion share "
        f"{report.lesion_fraction:.3f}, model accuracy on them {report.accuracy:.3f}"
    )
    print(f"{'images':16s} {'map':24s} {'pointing game':>14s} {'mass in mask':>13s}")
    groups = [("all lesions", vars(report))]
    groups += [
        (f"{name} ({rates['random'].count})", rates) for name, rates in report.by_class.items()
    ]
    for group, rates in groups:
        for key, name in (
            ("grad_cam", "Grad-CAM (last stage)"),
            ("integrated_gradients", "integrated gradients"),
            ("random", "random (baseline)"),
        ):
            print(f"{group:16s} {name:24s} {rates[key].pointing:14.3f} {rates[key].mass:13.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": where,
        "spec": spec.summary(),
        "data": str(args.data),
        "split": args.split,
        "images": len(lesions.paths),
        "seconds": round(seconds, 1),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        **report.to_dict(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
