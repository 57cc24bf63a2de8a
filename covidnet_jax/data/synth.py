"""A procedural synthetic chest X-ray data set in COVIDx format (the embedded default).

`write_synthetic_dataset(out_dir, ...)` writes:

```
out_dir/
  train/*.png  test/*.png          8-bit grayscale radiographs (height S, width ~1.08 S)
  train.txt    test.txt            COVIDx split files: <patient_id> <filename> <label> <source>
  masks/*.png                      per-image lesion masks, same file name as the image
                                   (255 = lesion, 0 elsewhere; all zero for normal images)
  synth.json                       the generator settings (seed, sizes, counts, version)
```

Images are drawn from an anatomical model rather than copied from anywhere: a thorax with
soft tissue, two lung fields, ribs, clavicles, spine and heart shadow, with per-patient
anatomy and per-image exposure, position and noise, plus findings that are not disease and
overlap the places where disease appears (breast shadows, scapulae, ECG electrodes). Class evidence follows the radiology:

- pneumonia: focal lobar consolidation, dense and sharply bounded by a fissure, usually in
  one lung;
- COVID-19: bilateral, peripheral ground-glass opacities (hazy, faint), weighted to the
  lower zones;
- normal: neither.

Severity varies per patient, so there are subtle cases, and the classes overlap (multifocal
pneumonia, unilateral-dominant COVID-19 with denser patches, faint vascular haze on
any image), so the task is learnable but not trivial. Patients have several images each
and every patient is in exactly one split. Output is a pure function of the arguments.

Example:
    >>> summary = write_synthetic_dataset("data/synth", per_class=300, image_size=128, seed=0)
    >>> summary.class_counts["train"]
    {'normal': 240, 'pneumonia': 240, 'COVID-19': 240}
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from covidnet_jax.errors import DataError

SYNTH_VERSION = 1
CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
DEFAULT_PER_CLASS = 300
DEFAULT_IMAGE_SIZE = 128
TEST_FRACTION = 0.2
_WIDTH_RATIO = 1.08  # radiographs are rarely square; this exercises the centre crop


@dataclasses.dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_dataset` wrote.

    Attributes:
        out_dir: the folder.
        class_counts: images per class, per split ("train", "test").
        patients: number of patients per split.
        settings: the generator settings (also stored in synth.json).
    """

    out_dir: Path
    class_counts: dict[str, dict[str, int]]
    patients: dict[str, int]
    settings: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Patient:
    pid: str
    label: str
    n_images: int
    split: str
    seed: int


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates: x in [0, 1] across, y in [0, 1] down."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    return np.meshgrid(y, x, indexing="ij")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse uniform noise upsampled bicubically."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize(
        (shape[1], shape[0]), resample=Image.Resampling.BICUBIC
    )
    field = np.asarray(img, dtype=np.float32)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _soft_ellipse(
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    edge: float,
    power: float = 2.0,
) -> np.ndarray:
    """1 inside the (super)ellipse, 0 outside, with a soft edge of relative width `edge`."""
    r = (np.abs((yy - cy) / ry) ** power + np.abs((xx - cx) / rx) ** power) ** (1.0 / power)
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-patient anatomy and disease: sizes, tissue density, severity, lesion sites."""
    return {
        "body_rx": rng.uniform(0.42, 0.48),
        "body_ry": rng.uniform(0.50, 0.58),
        "lung_rx": rng.uniform(0.13, 0.16),
        "lung_ry": rng.uniform(0.27, 0.32),
        "lung_dx": rng.uniform(0.17, 0.20),
        "heart_rx": rng.uniform(0.10, 0.14),
        "heart_ry": rng.uniform(0.09, 0.12),
        "rib_gap": rng.uniform(0.05, 0.065),
        "rib_bend": rng.uniform(0.05, 0.10),
        "tissue": rng.uniform(0.38, 0.52),
        # disease severity: mostly clear, a tail of subtle cases
        "severity": 1.0 - 0.6 * rng.beta(1.0, 3.0),
        # breast / soft-tissue shadow over the lower lateral zones (any class)
        "breast": rng.uniform(0.04, 0.10) if rng.random() < 0.45 else 0.0,
        "side": float(rng.integers(2)),  # pneumonia: which lung
        "lobe": float(rng.choice(3, p=[0.2, 0.3, 0.5])),  # pneumonia: upper/middle/lower
    }


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def _draw_lesions(
    rng: np.random.Generator,
    label: str,
    anat: dict[str, float],
    yy: np.ndarray,
    xx: np.ndarray,
    lungs: np.ndarray,
    centres: Sequence[tuple[float, float]],
) -> np.ndarray:
    """The opacity added by disease (0 for normal), confined to the lung fields."""
    opacity = np.zeros_like(yy)
    sev = anat["severity"]
    ry, rx = anat["lung_ry"], anat["lung_rx"]
    shape = yy.shape
    if label == "pneumonia":
        foci = [int(anat["side"])]
        if rng.random() < 0.2:  # multifocal: the overlap with COVID-19
            foci.append(1 - foci[0])
        for k, side in enumerate(foci):
            cy_l, cx_l = centres[side]
            lobe = int(anat["lobe"]) if k == 0 else 2
            # a lobe: the part of the lung beyond an oblique fissure
            fissure = cy_l + ry * (-0.25, 0.1, 0.3)[lobe] + rng.normal(0, 0.03)
            tilt = rng.normal(0.0, 0.35)
            beyond = (yy - fissure - tilt * (xx - cx_l)) * (-1.0 if lobe == 0 else 1.0)
            lobe_mask = np.clip(beyond / 0.006, 0.0, 1.0)
            cy = fissure + (-1.0 if lobe == 0 else 1.0) * ry * 0.35
            cx = cx_l + rng.normal(0, rx * 0.3)
            size = rng.uniform(0.10, 0.16) * (1.0 if k == 0 else 0.6)
            extent = _blob(yy, xx, cy, cx, size, size * rng.uniform(0.9, 1.3))
            # dense, with dark branching air bronchograms (where a smooth field crosses 0.5)
            bronchi = np.exp(-(((_smooth_noise(rng, shape, 12) - 0.5) / 0.06) ** 2))
            dense = np.clip((extent - 0.25) * 3.0, 0.0, 1.0) * lobe_mask * (1.0 - 0.6 * bronchi)
            opacity += dense * rng.uniform(0.32, 0.45) * sev
    elif label == "COVID-19":
        unilateral = rng.random() < 0.15  # unilateral-dominant: the overlap with pneumonia
        for side, (cy_l, cx_l) in enumerate(centres):
            lateral = -1.0 if side == 0 else 1.0  # towards the chest wall
            # peripheral band along the chest wall, weighted to the lower zone
            depth = rx * rng.uniform(0.8, 1.2) * (0.4 if unilateral and side == 1 else 1.0)
            # 0 just inside the lateral lung edge (the lung mask fades right at the edge)
            from_wall = np.abs(0.8 * rx - (xx - cx_l) * lateral)
            band = np.clip(1.0 - from_wall / depth, 0.0, 1.0)
            lower = np.clip(0.35 + (yy - cy_l) / ry, 0.0, 1.0)
            # ground glass: hazy, with a fine blotchy (reticulonodular) texture
            haze = 0.4 * np.clip((_smooth_noise(rng, shape, 10) - 0.2) * 2.0, 0.0, 1.0)
            blotches = np.clip((_smooth_noise(rng, shape, 28) - 0.45) * 4.0, 0.0, 1.0)
            opacity += band * lower * (haze + blotches) * rng.uniform(0.32, 0.45) * sev
        if rng.random() < 0.15:  # a denser, consolidative patch
            cy_l, cx_l = centres[int(rng.integers(2))]
            opacity += _blob(yy, xx, cy_l + ry * 0.5, cx_l, 0.05, 0.05) * 0.15 * sev
    return opacity * lungs


def _draw_haze(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, centres: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Faint perihilar vascular haze, not disease (drawn on any image; not in the mask)."""
    haze = np.zeros_like(yy)
    if rng.random() < 0.3:
        for cy_l, cx_l in centres:
            haze += _blob(yy, xx, cy_l, cx_l, 0.08, 0.06) * rng.uniform(0.03, 0.07)
    return haze


def render_radiograph(
    rng: np.random.Generator,
    label: str,
    anat: dict[str, float],
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one radiograph and its lesion mask.

    Args:
        rng: the image's random generator (exposure, position, noise, lesion detail).
        label: "normal", "pneumonia" or "COVID-19".
        anat: the patient's anatomy from `_anatomy`.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        (uint8 HxW image, uint8 HxW mask with 255 where a lesion is visible).
    """
    yy, xx = _grid(height, width)
    # position: off-centre, nearer or farther, slightly rotated (x scaled to physical units)
    aspect = width / height
    scale = rng.uniform(0.9, 1.1)
    angle = np.deg2rad(rng.normal(0.0, 3.0))
    cy0, cx0 = 0.56 + rng.normal(0.0, 0.03), 0.5 + rng.normal(0.0, 0.035)
    dy, dx = yy - cy0, (xx - cx0) * aspect
    yy_s = cy0 + (np.cos(angle) * dy - np.sin(angle) * dx) / scale
    xx_s = cx0 + (np.sin(angle) * dy + np.cos(angle) * dx) / scale

    # soft tissue: a boxy torso with shoulders, and the neck above it
    body = _soft_ellipse(
        yy_s, xx_s, cy0 + 0.12, cx0, anat["body_ry"], anat["body_rx"], 0.06, power=3.0
    )
    neck = _soft_ellipse(yy_s, xx_s, cy0 - 0.45, cx0, 0.2, 0.09, 0.2)
    body = np.maximum(body, neck)
    img = 0.04 + anat["tissue"] * body

    centres = [
        (cy0 - 0.02, cx0 - anat["lung_dx"] - 0.005),  # patient's right lung (image left)
        (cy0 - 0.03, cx0 + anat["lung_dx"]),
    ]
    lungs = np.zeros_like(yy)
    for k, (cy, cx) in enumerate(centres):
        rx = anat["lung_rx"] * (1.04 if k == 0 else 0.97)
        lung = _soft_ellipse(yy_s, xx_s, cy, cx, anat["lung_ry"], rx, 0.12)
        # the diaphragm dome flattens the lung base
        dome = cy + anat["lung_ry"] * 0.8 - 0.06 * ((xx_s - cx) / rx) ** 2
        lung *= np.clip((dome - yy_s) / 0.02, 0.0, 1.0)
        lungs = np.maximum(lungs, lung)
    img -= 0.27 * lungs * body

    # ribs: curved bright bands across each lung field
    bend = anat["rib_bend"] * ((xx_s - cx0) / 0.2) ** 2
    rib_phase = (yy_s - cy0 + 0.35 - bend) / anat["rib_gap"]
    ribs = np.clip(np.cos(2 * np.pi * rib_phase) * 2.0 - 1.0, 0.0, 1.0)
    img += 0.07 * ribs * lungs
    # clavicles: two oblique bands at the lung apices
    for side in (-1.0, 1.0):
        line = (yy_s - (cy0 - 0.33) - 0.25 * side * (xx_s - cx0)) / 0.012
        reach = np.clip(1.0 - np.abs(xx_s - cx0 - side * 0.15) / 0.16, 0.0, 1.0)
        img += 0.12 * np.exp(-(line**2)) * reach * body
    # spine and mediastinum, then the heart shadow (to the patient's left)
    img += 0.12 * np.exp(-(((xx_s - cx0) / 0.035) ** 2)) * body
    heart = _soft_ellipse(
        yy_s, xx_s, cy0 + 0.12, cx0 + 0.05, anat["heart_ry"], anat["heart_rx"], 0.15
    )
    img = np.maximum(img, heart * (anat["tissue"] + 0.08))

    # nuisance that overlaps where disease appears: breast shadows, scapulae, ECG leads
    for side in (-1.0, 1.0):
        if anat["breast"] > 0:
            breast = _soft_ellipse(yy_s, xx_s, cy0 + 0.2, cx0 + side * 0.2, 0.15, 0.17, 0.5)
            img += anat["breast"] * breast * body
        if rng.random() < 0.5:
            scapula = _soft_ellipse(yy_s, xx_s, cy0 - 0.12, cx0 + side * 0.3, 0.17, 0.06, 0.4)
            img += rng.uniform(0.03, 0.07) * scapula * body
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.3 else 0):
        cy, cx = cy0 + rng.uniform(-0.3, 0.3), cx0 + rng.uniform(-0.3, 0.3)
        img = np.maximum(img, 0.75 * _soft_ellipse(yy_s, xx_s, cy, cx, 0.015, 0.015, 0.3))

    opacity = _draw_lesions(rng, label, anat, yy_s, xx_s, lungs, centres)
    mask = (opacity > 0.03).astype(np.uint8) * 255
    img += opacity + _draw_haze(rng, yy_s, xx_s, centres) * lungs

    # exposure: contrast, brightness and gamma of this acquisition; then quantum noise
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    img += rng.normal(0.0, rng.uniform(0.01, 0.03), size=img.shape).astype(np.float32)
    img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img, mask


def _plan_patients(per_class: int, classes: Sequence[str], seed: int) -> list[_Patient]:
    """Assigns images to patients (1-4 each) and patients to splits, per class."""
    rng = np.random.default_rng([seed, 0])
    patients: list[_Patient] = []
    number = 0
    for label in classes:
        sizes = []
        remaining = per_class
        while remaining > 0:
            n = int(min(rng.integers(1, 5), remaining))
            sizes.append(n)
            remaining -= n
        order = rng.permutation(len(sizes))
        n_test_images = max(1, round(per_class * TEST_FRACTION))
        taken = 0
        split_of = {}
        for idx in order:
            split_of[idx] = "test" if taken < n_test_images else "train"
            if split_of[idx] == "test":
                taken += sizes[idx]
        for idx, n in enumerate(sizes):
            number += 1
            # one patient id in eight contains a space, as in the COVIDx8A release
            pid = f"synth {number:05d}" if number % 8 == 0 else f"P{number:05d}"
            patients.append(_Patient(pid, label, n, split_of[idx], int(rng.integers(2**31))))
    return patients


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    overwrite: bool = False,
) -> SynthSummary:
    """Writes the synthetic COVIDx-format data set (atomically: a temp folder, then renamed).

    Args:
        out_dir: the folder to create.
        per_class: images per class over both splits (about 80% train, 20% test, by patient).
        image_size: image height in pixels (width is 8% larger, as radiographs are not square).
        seed: the seed; the same arguments give byte-identical files.
        overwrite: replace an existing folder; otherwise an existing non-empty folder is an
            error.

    Returns:
        A summary of what was written.

    Raises:
        DataError: for bad sizes or an existing non-empty `out_dir` without `overwrite`.
    """
    out_dir = Path(out_dir)
    if per_class < 4:
        raise DataError(f"--per-class {per_class} is too small; use at least 4 (default 300)")
    if not 32 <= image_size <= 1024:
        raise DataError(f"--image-size {image_size} is out of range; use 32..1024 (default 128)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(
            f"{out_dir}: folder exists and is not empty; choose another --out or pass --overwrite"
        )
    classes = CLASS_NAMES
    height = image_size
    width = round(image_size * _WIDTH_RATIO)
    patients = _plan_patients(per_class, classes, seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for sub in ("train", "test", "masks"):
            (tmp / sub).mkdir()
        lines: dict[str, list[str]] = {"train": [], "test": []}
        counts = {s: dict.fromkeys(classes, 0) for s in ("train", "test")}
        for patient in patients:
            rng = np.random.default_rng(patient.seed)
            anat = _anatomy(rng)
            stem = patient.pid.replace(" ", "_")
            for k in range(patient.n_images):
                image, mask = render_radiograph(rng, patient.label, anat, height, width)
                filename = f"{stem}_{k}.png"
                _save_png(image, tmp / patient.split / filename)
                _save_png(mask, tmp / "masks" / filename)
                lines[patient.split].append(f"{patient.pid} {filename} {patient.label} synth")
                counts[patient.split][patient.label] += 1
        for split, split_lines in lines.items():
            (tmp / f"{split}.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
        settings = {
            "version": SYNTH_VERSION,
            "per_class": per_class,
            "image_size": image_size,
            "seed": seed,
        }
        (tmp / "synth.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_patients = {s: sum(p.split == s for p in patients) for s in ("train", "test")}
    return SynthSummary(out_dir, counts, n_patients, settings)


def read_synth_settings(folder: str | Path) -> dict[str, int] | None:
    """The settings a synthetic folder was written with, or None if it is not one."""
    path = Path(folder) / "synth.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
