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
exposure non-uniformity and noise, plus findings that are not disease (breast shadows,
scapulae, ECG electrodes and central lines on any class). Every image, whatever its class,
also carries density in the lung fields with the same distribution of place and amount: a
lobar density in one lung and peripheral, lower-zone density in both. Disease is what that
density looks like, following the radiology, so that brightness at fixed pixels (or the total
density in the lungs) is not a finding and texture and edges are:

- pneumonia: the lobar density is a focal consolidation in a random lobe (upper, middle /
  lingula, lower) of a random lung, placed and sized per patient; dense, lobulated, sharply
  bounded by a fissure, with dark branching air bronchograms;
- COVID-19: the peripheral density is bilateral (sometimes unilateral) ground glass, several
  patches along the chest wall weighted to the lower zones, with per-patient upward reach;
  patchy, with reticular (crazy-paving) texture;
- any other density is smooth (overlapping soft tissue and vessels, poor inspiration): the
  same density with its fine detail removed. Normal images have only smooth density.

Severity (how much of the disease texture shows) varies per patient, so there are subtle
cases and the task is learnable but not trivial. Patients have several images each and every
patient is in exactly one split. Output is a pure function of the arguments. Calibration (a
linear model against a small CNN at 64 px): bench/README.md, "Synthetic data calibration".

Example:
    >>> summary = write_synthetic_dataset("data/synth", per_class=300, image_size=128, seed=0)
    >>> summary.class_counts["train"]
    {'normal': 239, 'pneumonia': 239, 'COVID-19': 240}
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

SYNTH_VERSION = 3
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


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Patient coordinates of every pixel and the way back to pixels.

    `yy`, `xx` (HxW, float32) are in image heights, isotropic, after the image's shift,
    rotation and magnification; `window` gives the pixel box around a patient-space disc, so
    that small structures are computed on their bounding box only.
    """

    yy: np.ndarray
    xx: np.ndarray
    cy: float
    cx: float
    cos: float
    sin: float
    scale: float

    def window(self, cy: float, cx: float, radius: float) -> tuple[slice, slice]:
        height, width = self.yy.shape
        dy, dx = cy - self.cy, cx - self.cx
        py = (self.cy + self.scale * (self.cos * dy + self.sin * dx)) * height
        px = self.cx * width + self.scale * (self.cos * dx - self.sin * dy) * height
        r = radius * self.scale * height + 2.0
        rows = slice(min(max(int(py - r), 0), height), min(max(int(py + r) + 1, 0), height))
        cols = slice(min(max(int(px - r), 0), width), min(max(int(px + r) + 1, 0), width))
        return rows, cols

    def ellipse(
        self,
        cy: float,
        cx: float,
        ry: float,
        rx: float,
        edge: float,
        power: float = 2.0,
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """A soft (super)ellipse on its bounding box: (box, values in [0, 1])."""
        box = self.window(cy, cx, float(np.hypot(ry, rx)))
        return box, _soft_ellipse(self.yy[box], self.xx[box], cy, cx, ry, rx, edge, power)


def _make_frame(rng: np.random.Generator, height: int, width: int) -> _Frame:
    """Position: off-centre, nearer or farther, rotated (x scaled to physical units)."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    scale = rng.uniform(0.88, 1.12)
    angle = float(np.deg2rad(rng.normal(0.0, 4.0)))
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    cy0, cx0 = 0.56 + rng.normal(0.0, 0.035), 0.5 + rng.normal(0.0, 0.04)
    dy = (y - np.float32(cy0))[:, None]
    dx = ((x - np.float32(cx0)) * np.float32(width / height))[None, :]
    inv = np.float32(1.0 / scale)
    yy = np.float32(cy0) + (np.float32(cos) * dy - np.float32(sin) * dx) * inv
    xx = np.float32(cx0) + (np.float32(sin) * dy + np.float32(cos) * dx) * inv
    return _Frame(yy, xx, float(cy0), float(cx0), cos, sin, float(scale))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse uniform noise upsampled bicubically."""
    coarse = rng.random((max(cells[0], 2), max(cells[1], 2)), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize(
        (shape[1], shape[0]), resample=Image.Resampling.BICUBIC
    )
    field = np.asarray(img, dtype=np.float32)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) * np.float32(1.0 / max(hi - lo, 1e-6))


def _cells(shape: tuple[int, int], height: int, per_height: float) -> tuple[int, int]:
    """Noise cells over a box of `shape` pixels for `per_height` cells per image height."""
    return (
        round(shape[0] * per_height / height) + 1,
        round(shape[1] * per_height / height) + 1,
    )


def _lowpass(field: np.ndarray, cell: float) -> np.ndarray:
    """`field` without detail finer than about `cell` pixels (box down, bicubic up)."""
    h, w = field.shape
    small = Image.fromarray(field, mode="F").resize(
        (max(round(w / cell), 1), max(round(h / cell), 1)), resample=Image.Resampling.BOX
    )
    smooth = small.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.maximum(np.asarray(smooth, dtype=np.float32), 0.0)


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
    f32 = np.float32
    a, b = (yy - f32(cy)) * f32(1.0 / ry), (xx - f32(cx)) * f32(1.0 / rx)
    if power == 2.0:
        r = np.sqrt(a * a + b * b)
    else:
        a, b = np.abs(a), np.abs(b)
        r = np.cbrt(a * a * a + b * b * b) if power == 3.0 else (a**power + b**power) ** (1 / power)
    return np.clip((1.0 - r) * f32(1.0 / edge), 0.0, 1.0)


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
        # how conspicuous disease texture is: mostly clear, a tail of subtle cases
        "severity": 1.0 - 0.45 * rng.beta(1.0, 3.5),
        # breast / soft-tissue shadow over the lower lateral zones (any class)
        "breast": rng.uniform(0.04, 0.12) if rng.random() < 0.45 else 0.0,
        # lobar density (consolidation, or non-disease density of the same layout): which lung
        "side": float(rng.integers(2)),
        # lobe 0 upper, 1 middle lobe / lingula, 2 lower
        "lobe": float(rng.choice(3, p=[0.3, 0.25, 0.45])),
        "lobe_u": rng.uniform(-1.0, 1.0),  # placement across the lobe
        "lobe_v": rng.uniform(-1.0, 1.0),  # placement down the lobe
        "extent": rng.uniform(0.0, 1.0),  # lobar density size / upward reach of peripheral
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
    u = (xx - np.float32(centre[1])) * np.float32(lateral / anat["lung_rx"])
    v = (yy - np.float32(centre[0])) * np.float32(1.0 / anat["lung_ry"])
    return u, v


# lobar density: lobe centre (u, v) and the fissure that bounds it (v of the fissure, +1 if
# the lobe lies below it, -1 above)
_LOBES = ((0.0, -0.5, -0.05, -1.0), (-0.35, 0.15, -0.05, 1.0), (0.1, 0.5, 0.05, 1.0))
# detail finer than this (in image heights) is what tells disease from other density: lobar
# density is smoothed more, so that the lung's own border does not give it a sharp edge
_DETAIL_LOBAR = 1.0 / 4.0
_DETAIL_PERIPHERAL = 1.0 / 5.0


def _consolidation(
    rng: np.random.Generator, anat: dict[str, float], u: np.ndarray, v: np.ndarray, height: int
) -> np.ndarray:
    """Lobar consolidation (values about 0..1): dense, lobulated, sharply bounded by a fissure,
    with dark branching air bronchograms."""
    cu0, cv0, fissure, below = _LOBES[int(anat["lobe"])]
    cu = cu0 + 0.35 * anat["lobe_u"] + rng.normal(0, 0.05)
    cv = cv0 + 0.2 * anat["lobe_v"] + rng.normal(0, 0.04)
    size = 0.4 + 0.35 * anat["extent"]
    ru, rv = size * rng.uniform(0.8, 1.25), size * rng.uniform(0.8, 1.25)
    wobble = _smooth_noise(rng, u.shape, _cells(u.shape, height, 8)) - 0.5
    du, dv = (u - np.float32(cu)) * np.float32(1 / ru), (v - np.float32(cv)) * np.float32(1 / rv)
    r = np.sqrt(du * du + dv * dv) + 0.5 * wobble
    region = np.clip((1.0 - r) * np.float32(1 / 0.08), 0.0, 1.0)
    edge = (v - np.float32(fissure + rng.normal(0, 0.08)) - np.float32(rng.normal(0, 0.2)) * u) * (
        np.float32(below / 0.03)
    )
    region *= np.clip(edge, 0.0, 1.0)
    bronchi = _smooth_noise(rng, u.shape, _cells(u.shape, height, 14)) - 0.5
    bronchi = np.exp(-(bronchi * bronchi) * np.float32(1 / 0.06**2))
    return region * (1.0 - 0.8 * bronchi)


def _ground_glass(
    rng: np.random.Generator,
    anat: dict[str, float],
    u: np.ndarray,
    v: np.ndarray,
    height: int,
) -> np.ndarray:
    """Peripheral ground-glass patches weighted to the lower zone (values about 0..1), hazy,
    patchy and reticular (crazy paving)."""
    reach = 0.5 + 1.1 * anat["extent"]
    n = int(rng.integers(4, 9))
    cu = rng.uniform(0.45, 0.95, n)
    cv = 0.8 - reach * rng.beta(1.0, 1.8, n)
    rad = rng.uniform(0.2, 0.35, n)
    ggo = np.clip(_blobs(u, v, cu, cv, rad, rad * rng.uniform(0.8, 1.6, n)), 0.0, 1.0)
    patchy = _smooth_noise(rng, u.shape, _cells(u.shape, height, 18))
    patchy = np.clip((patchy - 0.5) * 2.0 + 0.5, 0.0, 1.0)
    reticular = _smooth_noise(rng, u.shape, _cells(u.shape, height, 18)) - 0.5
    reticular = np.exp(-(reticular * reticular) * np.float32(1 / 0.07**2))
    return ggo * (0.2 + 0.6 * patchy + 1.4 * reticular)


def _lung_densities(
    rng: np.random.Generator,
    label: str,
    anat: dict[str, float],
    frame: _Frame,
    lungs: np.ndarray,
    centres: Sequence[tuple[float, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """Density in the lung fields: (all of it, the part that is disease).

    Every image, whatever its class, gets a lobar density in one lung and peripheral,
    lower-zone density in both, with the same distribution of place and amount. Disease is
    how that density looks: pneumonia turns the lobar density into consolidation (dense,
    sharply bounded, air bronchograms), COVID-19 turns the peripheral density into ground
    glass (patchy, reticular); otherwise the density is smooth (overlapping soft tissue,
    vessels, poor inspiration), the same amount of density with the detail finer than
    `_DETAIL_LOBAR` / `_DETAIL_PERIPHERAL` removed. So the amount of density is not a
    finding; texture and edges are.
    """
    height = lungs.shape[0]
    total = np.zeros_like(lungs)
    disease = np.zeros_like(lungs)
    sev = anat["severity"]
    unilateral = rng.random() < 0.12
    for side in range(2):
        cy, cx = centres[side]
        box = frame.window(cy, cx, float(np.hypot(anat["lung_ry"], anat["lung_rx"])))
        u, v = _lung_coords(frame.yy[box], frame.xx[box], centres[side], anat, side)
        parts = []
        if side == int(anat["side"]):
            lobar = _consolidation(rng, anat, u, v, height) * rng.uniform(0.4, 0.62)
            parts.append((lobar, _DETAIL_LOBAR, label == "pneumonia"))
        if not (unilateral and side == 1):
            ggo = _ground_glass(rng, anat, u, v, height) * rng.uniform(0.35, 0.48)
            parts.append((ggo, _DETAIL_PERIPHERAL, label == "COVID-19"))
        lung = lungs[box]
        # smoothing normalised by the smoothed lung field keeps the density inside the lung
        # where it was (plain smoothing would move density from the chest wall out of it)
        for density, detail, is_disease in parts:
            cell = detail * frame.scale * height
            density *= lung
            smooth = _lowpass(density, cell) / np.maximum(_lowpass(lung, cell), 0.05) * lung
            smooth *= float(density.sum()) / max(float(smooth.sum()), 1e-6)  # same amount
            if is_disease:  # severity: how much of the detail shows
                density = smooth + sev * (density - smooth)
                disease[box] += density
            else:
                density = smooth
            total[box] += density
    return total, disease


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
    f32 = np.float32
    frame = _make_frame(rng, height, width)
    yy_s, xx_s, cy0, cx0 = frame.yy, frame.xx, frame.cy, frame.cx

    # soft tissue: a boxy torso with shoulders, and the neck above it
    body = _soft_ellipse(
        yy_s, xx_s, cy0 + 0.12, cx0, anat["body_ry"], anat["body_rx"], 0.06, power=3.0
    )
    box, neck = frame.ellipse(cy0 - 0.45, cx0, 0.2, 0.09, 0.2)
    body[box] = np.maximum(body[box], neck)
    img = f32(0.04) + f32(anat["tissue"]) * body

    centres = [
        (cy0 - 0.02, cx0 - anat["lung_dx"] - 0.005),  # patient's right lung (image left)
        (cy0 - 0.03, cx0 + anat["lung_dx"]),
    ]
    lungs = np.zeros_like(img)
    boxes = []
    for k, (cy, cx) in enumerate(centres):
        rx = anat["lung_rx"] * (1.04 if k == 0 else 0.97)
        box, lung = frame.ellipse(cy, cx, anat["lung_ry"], rx, 0.12)
        boxes.append(box)
        # the diaphragm dome flattens the lung base (the right hemidiaphragm sits higher)
        xr = (xx_s[box] - f32(cx)) * f32(1.0 / rx)
        dome = f32(cy + anat["lung_ry"] * (0.78 if k == 0 else 0.84)) - 0.06 * xr * xr
        lung *= np.clip((dome - yy_s[box]) * f32(1 / 0.02), 0.0, 1.0)
        lungs[box] = np.maximum(lungs[box], lung)
    lungs *= body
    img -= f32(anat["aeration"]) * lungs

    # ribs: curved bright bands across each lung field (computed on the lungs' box)
    box = (
        slice(min(b[0].start for b in boxes), max(b[0].stop for b in boxes)),
        slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes)),
    )
    xr = (xx_s[box] - f32(cx0)) * f32(1 / 0.2)
    rib_phase = (yy_s[box] - f32(cy0 - 0.35) - f32(anat["rib_bend"]) * xr * xr) * f32(
        2 * np.pi / anat["rib_gap"]
    )
    ribs = np.clip(np.cos(rib_phase) * 2.0 - 1.0, 0.0, 1.0)
    img[box] += 0.07 * ribs * lungs[box]
    # clavicles: two oblique bands at the lung apices
    for side in (-1.0, 1.0):
        box = frame.window(cy0 - 0.33, cx0 + side * 0.15, 0.2)
        ys, xs = yy_s[box], xx_s[box] - f32(cx0)
        line = (ys - f32(cy0 - 0.33) - f32(0.25 * side) * xs) * f32(1 / 0.012)
        reach = np.clip(1.0 - np.abs(xs - f32(side * 0.15)) * f32(1 / 0.16), 0.0, 1.0)
        img[box] += 0.12 * np.exp(-(line * line)) * reach * body[box]
    # spine and mediastinum, then the heart shadow (to the patient's left)
    spine = (xx_s - f32(cx0)) * f32(1 / 0.035)
    img += 0.12 * np.exp(-(spine * spine)) * body
    box, heart = frame.ellipse(cy0 + 0.12, cx0 + 0.05, anat["heart_ry"], anat["heart_rx"], 0.15)
    img[box] = np.maximum(img[box], heart * f32(anat["tissue"] + 0.08))

    # nuisance that overlaps where disease appears: breast shadows, scapulae
    for side in (-1.0, 1.0):
        if anat["breast"] > 0:
            box, breast = frame.ellipse(cy0 + 0.2, cx0 + side * 0.2, 0.15, 0.17, 0.5)
            img[box] += f32(anat["breast"]) * breast * body[box]
        if rng.random() < 0.5:
            box, scapula = frame.ellipse(cy0 - 0.12, cx0 + side * 0.3, 0.17, 0.06, 0.4)
            img[box] += f32(rng.uniform(0.03, 0.07)) * scapula * body[box]

    density, disease = _lung_densities(rng, label, anat, frame, lungs, centres)
    mask = (disease > 0.03).astype(np.uint8) * 255
    img += density

    # devices on any class: a central venous line from the shoulder to the mediastinum,
    # ECG electrodes (bright discs) anywhere on the chest
    if anat["devices"]:
        side = 1.0 if rng.random() < 0.5 else -1.0
        t = np.clip((xx_s - f32(cx0)) * f32(side / 0.3), 0.0, 1.0)
        path = (yy_s - f32(cy0 - 0.3 + rng.normal(0, 0.01)) - 0.25 * (1.0 - t) ** 2) * f32(
            1 / 0.006
        )
        line = np.exp(-(path * path)) * ((t > 0.05) & (t < 0.95))
        np.maximum(img, 0.8 * line, out=img)
    if rng.random() < 0.4:
        n = int(rng.integers(1, 5))
        for cy, cx in zip(rng.uniform(-0.3, 0.35, n), rng.uniform(-0.35, 0.35, n), strict=True):
            box, disc = frame.ellipse(cy0 + cy, cx0 + cx, 0.014, 0.014, 0.3)
            img[box] = np.maximum(img[box], 0.8 * disc)

    # acquisition: a smooth non-uniformity (heel effect, scatter), contrast, brightness and
    # gamma; then quantum noise
    tilt = rng.normal(0.0, 0.03, 2)
    y = (np.arange(height, dtype=f32) + 0.5) / height - 0.5
    x = (np.arange(width, dtype=f32) + 0.5) / width - 0.5
    img += f32(tilt[0]) * y[:, None] + f32(tilt[1]) * x[None, :]
    img += f32(rng.uniform(0.0, 0.08)) * (_smooth_noise(rng, img.shape, (3, 3)) - 0.5)
    img = img * f32(rng.uniform(0.85, 1.15)) + f32(rng.uniform(-0.05, 0.05))
    img = np.clip(img, 0.0, 1.0) ** f32(rng.uniform(0.8, 1.25))
    img += rng.standard_normal(img.shape, dtype=f32) * f32(rng.uniform(0.01, 0.03))
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
