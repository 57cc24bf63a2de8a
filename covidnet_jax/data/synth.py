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
anatomy (including lung aeration) and per-image exposure, position, rotation, a smooth
exposure non-uniformity and noise, plus findings that are not disease and overlap the places
where disease appears (breast shadows, scapulae, faint vascular / soft-tissue densities,
ECG electrodes and central lines on any class), so that brightness at fixed pixels is a poor
cue. Class evidence follows the radiology and is placed per patient:

- pneumonia: focal lobar consolidation in a random lobe (upper, middle / lingula, lower) of
  a random lung, placed and sized per patient; dense, lobulated, bounded by a fissure, with
  air bronchograms; sometimes a second, smaller focus;
- COVID-19: bilateral, peripheral ground-glass opacities, several patches along the chest
  wall weighted to the lower zones, with per-patient upward reach; hazy, patchy, with
  reticular (crazy-paving) texture;
- normal: neither.

Severity varies per patient, so there are subtle cases, and the classes overlap (multifocal
pneumonia, unilateral COVID-19 with a denser patch, non-disease densities on any image), so
the task is learnable but not trivial. Patients have several images each and every patient
is in exactly one split. Output is a pure function of the arguments. Calibration (a linear
model against a small CNN at 64 px): bench/README.md, "Synthetic data calibration".

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

SYNTH_VERSION = 2
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
    a, b = (yy - cy) * (1.0 / ry), (xx - cx) * (1.0 / rx)
    if power == 2.0:
        r = np.sqrt(a * a + b * b)
    else:
        r = (np.abs(a) ** power + np.abs(b) ** power) ** (1.0 / power)
    return np.clip((1.0 - r) * (1.0 / edge), 0.0, 1.0)


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-patient anatomy and disease: sizes, tissue density, severity, lesion sites."""
    return {
        "body_rx": rng.uniform(0.40, 0.50),
        "body_ry": rng.uniform(0.50, 0.60),
        "lung_rx": rng.uniform(0.13, 0.165),
        "lung_ry": rng.uniform(0.26, 0.33),
        "lung_dx": rng.uniform(0.165, 0.205),
        "heart_rx": rng.uniform(0.09, 0.15),
        "heart_ry": rng.uniform(0.085, 0.125),
        "rib_gap": rng.uniform(0.05, 0.065),
        "rib_bend": rng.uniform(0.05, 0.10),
        "tissue": rng.uniform(0.34, 0.56),
        # how dark the aerated lung is (inspiration, habitus): varies as much as a faint lesion
        "aeration": rng.uniform(0.17, 0.37),
        # disease severity: mostly clear, a tail of subtle cases
        "severity": 1.0 - 0.35 * rng.beta(1.0, 3.0),
        # breast / soft-tissue shadow over the lower lateral zones (any class)
        "breast": rng.uniform(0.04, 0.12) if rng.random() < 0.45 else 0.0,
        "side": float(rng.integers(2)),  # pneumonia: which lung
        # pneumonia: lobe 0 upper, 1 middle lobe / lingula, 2 lower
        "lobe": float(rng.choice(3, p=[0.3, 0.25, 0.45])),
        "lobe_u": rng.uniform(-1.0, 1.0),  # pneumonia: placement across the lobe
        "lobe_v": rng.uniform(-1.0, 1.0),  # pneumonia: placement down the lobe
        "extent": rng.uniform(0.0, 1.0),  # consolidation size / upward reach of COVID-19 GGO
        "devices": float(rng.random() < 0.35),  # central line (any class)
    }


def _blobs(
    u: np.ndarray, v: np.ndarray, cu: np.ndarray, cv: np.ndarray, ru: np.ndarray, rv: np.ndarray
) -> np.ndarray:
    """Sum of Gaussian blobs (centres cu, cv; radii ru, rv, all 1-D) on the grid (u, v)."""
    f32 = np.float32
    du = (u[None] - cu.astype(f32)[:, None, None]) * (1.0 / ru).astype(f32)[:, None, None]
    dv = (v[None] - cv.astype(f32)[:, None, None]) * (1.0 / rv).astype(f32)[:, None, None]
    return np.exp(-(du * du + dv * dv)).sum(axis=0)


def _lung_coords(
    yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float], anat: dict[str, float], side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lung-relative coordinates: u towards the chest wall, v down; the lung is about |.| < 1."""
    lateral = -1.0 if side == 0 else 1.0
    u = (xx - centre[1]) * (lateral / anat["lung_rx"])
    v = (yy - centre[0]) / anat["lung_ry"]
    return u, v


# pneumonia: lobe centre (u, v) and the fissure that bounds it (v of the fissure, +1 if the
# lobe lies below it, -1 above)
_LOBES = ((0.0, -0.5, -0.05, -1.0), (-0.35, 0.15, -0.05, 1.0), (0.1, 0.5, 0.05, 1.0))


def _draw_lesions(
    rng: np.random.Generator,
    label: str,
    anat: dict[str, float],
    yy: np.ndarray,
    xx: np.ndarray,
    lungs: np.ndarray,
    centres: Sequence[tuple[float, float]],
) -> np.ndarray:
    """The opacity added by disease (0 for normal), confined to the lung fields.

    Placement, extent and texture vary per patient and image, so the evidence is a local
    pattern (a dense, sharply bounded region with air bronchograms; or patchy, reticular
    ground glass along the chest wall) rather than brightness at fixed pixels.
    """
    opacity = np.zeros_like(yy)
    sev = anat["severity"]
    shape = yy.shape
    if label == "pneumonia":
        foci = [int(anat["side"])]
        if rng.random() < 0.15:  # multifocal: the overlap with COVID-19
            foci.append(1 - foci[0])
        for k, side in enumerate(foci):
            u, v = _lung_coords(yy, xx, centres[side], anat, side)
            lobe = int(anat["lobe"]) if k == 0 else int(rng.integers(3))
            cu0, cv0, fissure, below = _LOBES[lobe]
            cu = cu0 + 0.35 * anat["lobe_u"] + rng.normal(0, 0.05)
            cv = cv0 + 0.2 * anat["lobe_v"] + rng.normal(0, 0.04)
            size = (0.4 + 0.35 * anat["extent"]) * (1.0 if k == 0 else 0.6)
            ru, rv = size * rng.uniform(0.8, 1.25), size * rng.uniform(0.8, 1.25)
            # lobulated border: the radius is perturbed by a smooth field
            wobble = _smooth_noise(rng, shape, 6) - 0.5
            r = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) + 0.5 * wobble
            region = np.clip((1.0 - r) / 0.2, 0.0, 1.0)
            # a fissure bounds the lobe sharply (slightly oblique)
            edge = (v - fissure - rng.normal(0, 0.08) - rng.normal(0, 0.2) * u) * below
            region *= np.clip(edge / 0.04, 0.0, 1.0)
            # dense, with dark branching air bronchograms (where a smooth field crosses 0.5)
            bronchi = np.exp(-(((_smooth_noise(rng, shape, 10) - 0.5) / 0.05) ** 2))
            texture = 1.0 - 0.55 * bronchi * (rng.random() < 0.8)
            opacity += region * texture * rng.uniform(0.45, 0.6) * sev
    elif label == "COVID-19":
        unilateral = rng.random() < 0.12  # unilateral-dominant: the overlap with pneumonia
        reach = 0.5 + 1.1 * anat["extent"]  # how far up from the bases the opacities go
        fine = _smooth_noise(rng, shape, 22)
        reticular = np.exp(-(((fine - 0.5) / 0.07) ** 2))  # crazy-paving lines
        patchy = np.clip((_smooth_noise(rng, shape, 14) - 0.25) * 1.6, 0.0, 1.0)
        for side in range(2):
            if unilateral and side == 1:
                continue
            u, v = _lung_coords(yy, xx, centres[side], anat, side)
            n = int(rng.integers(4, 9))
            cu = rng.uniform(0.45, 0.95, n)  # peripheral
            cv = 0.8 - reach * rng.beta(1.0, 1.8, n)  # weighted to the lower zone
            rad = rng.uniform(0.2, 0.35, n)
            ggo = np.clip(_blobs(u, v, cu, cv, rad, rad * rng.uniform(0.8, 1.6, n)), 0.0, 1.0)
            strength = rng.uniform(0.3, 0.42) * sev
            opacity += ggo * (0.3 + 0.6 * patchy + 0.8 * reticular) * strength
        if rng.random() < 0.15:  # a denser, consolidative patch
            side = int(rng.integers(2))
            u, v = _lung_coords(yy, xx, centres[side], anat, side)
            dense = _blobs(u, v, np.array([0.6]), np.array([0.5]), np.array([0.2]), np.array([0.2]))
            opacity += dense * 0.15 * sev
    return opacity * lungs


def _draw_mimics(
    rng: np.random.Generator,
    anat: dict[str, float],
    yy: np.ndarray,
    xx: np.ndarray,
    centres: Sequence[tuple[float, float]],
) -> np.ndarray:
    """Densities in the lungs that are not disease (any class; not in the mask).

    Perihilar vascular haze, and overlapping soft tissue / vessels that add faint, smooth
    density anywhere in the lung fields, so a brighter lung zone alone is not a finding.
    """
    haze = np.zeros_like(yy)
    if rng.random() < 0.4:
        for side, centre in enumerate(centres):
            u, v = _lung_coords(yy, xx, centre, anat, side)
            cu, cv = np.array([-0.6]), np.array([rng.uniform(-0.2, 0.2)])
            haze += _blobs(u, v, cu, cv, np.array([0.5]), np.array([0.4])) * rng.uniform(0.03, 0.08)
    if rng.random() < 0.3:
        side = int(rng.integers(2))
        u, v = _lung_coords(yy, xx, centres[side], anat, side)
        n = int(rng.integers(1, 3))
        rad = rng.uniform(0.3, 0.6, n)
        haze += _blobs(
            u, v, rng.uniform(-0.6, 0.8, n), rng.uniform(-0.7, 0.8, n), rad, rad
        ) * rng.uniform(0.03, 0.07)
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
    # position: off-centre, nearer or farther, rotated (x scaled to physical units)
    aspect = width / height
    scale = rng.uniform(0.88, 1.12)
    angle = float(np.deg2rad(rng.normal(0.0, 4.0)))
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    cy0, cx0 = 0.56 + rng.normal(0.0, 0.035), 0.5 + rng.normal(0.0, 0.04)
    dy, dx = yy - cy0, (xx - cx0) * aspect
    yy_s = cy0 + (cos * dy - sin * dx) * (1.0 / scale)
    xx_s = cx0 + (sin * dy + cos * dx) * (1.0 / scale)

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
        # the diaphragm dome flattens the lung base (the right hemidiaphragm sits higher)
        dome = cy + anat["lung_ry"] * (0.78 if k == 0 else 0.84) - 0.06 * ((xx_s - cx) / rx) ** 2
        lung *= np.clip((dome - yy_s) / 0.02, 0.0, 1.0)
        lungs = np.maximum(lungs, lung)
    img -= anat["aeration"] * lungs * body

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

    # nuisance that overlaps where disease appears: breast shadows, scapulae
    for side in (-1.0, 1.0):
        if anat["breast"] > 0:
            breast = _soft_ellipse(yy_s, xx_s, cy0 + 0.2, cx0 + side * 0.2, 0.15, 0.17, 0.5)
            img += anat["breast"] * breast * body
        if rng.random() < 0.5:
            scapula = _soft_ellipse(yy_s, xx_s, cy0 - 0.12, cx0 + side * 0.3, 0.17, 0.06, 0.4)
            img += rng.uniform(0.03, 0.07) * scapula * body

    opacity = _draw_lesions(rng, label, anat, yy_s, xx_s, lungs, centres)
    mask = (opacity > 0.03).astype(np.uint8) * 255
    img += opacity + _draw_mimics(rng, anat, yy_s, xx_s, centres) * lungs
    # smooth, featureless lung density (any class): mean density is not a finding
    img += rng.uniform(0.0, 0.2) * _smooth_noise(rng, img.shape, 3) * lungs

    # devices on any class: a central venous line from the shoulder to the mediastinum,
    # ECG electrodes (bright discs) anywhere on the chest
    if anat["devices"]:
        side = 1.0 if rng.random() < 0.5 else -1.0
        t = np.clip((xx_s - cx0) * side / 0.3, 0.0, 1.0)
        path = cy0 - 0.3 + 0.25 * (1.0 - t) ** 2 + rng.normal(0, 0.01)
        line = np.exp(-(((yy_s - path) / 0.006) ** 2)) * (t > 0.05) * (t < 0.95)
        img = np.maximum(img, 0.8 * line)
    if rng.random() < 0.4:
        n = int(rng.integers(1, 5))
        for cy, cx in zip(rng.uniform(-0.3, 0.35, n), rng.uniform(-0.35, 0.35, n), strict=True):
            disc = _soft_ellipse(yy_s, xx_s, cy0 + cy, cx0 + cx, 0.014, 0.014, 0.3)
            img = np.maximum(img, 0.8 * disc)

    # acquisition: a smooth non-uniformity (heel effect, scatter), contrast, brightness and
    # gamma; then quantum noise
    tilt = rng.normal(0.0, 0.03, 2)
    img += tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5)
    img += rng.uniform(0.0, 0.08) * (_smooth_noise(rng, img.shape, 3) - 0.5)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
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
