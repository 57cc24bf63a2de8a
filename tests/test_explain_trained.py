"""Explanations of a small trained model: they find the lesion, and the CLI writes overlays.

The task is small enough to learn in a few dozen steps on 2 CPU cores: 32 px grey images of
noise, half of them with a bright blob (the "lesion", whose mask is known). A tiny PEPX
network learns it; Grad-CAM and integrated gradients of the lesion class must then point at
the blob far more often than random maps do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from test_explain_validation import explain_validation

from covidnet_jax import export
from covidnet_jax.models import build_model
from covidnet_jax.presets import get_preset
from search.cli import main

pytestmark = pytest.mark.slow

_SIZE = 32


def _blob_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images Bx32x32x1 in [0, 1], labels B, lesion masks Bx32x32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:_SIZE, :_SIZE]
    images = rng.normal(0.4, 0.08, (count, _SIZE, _SIZE)).astype(np.float32)
    labels = rng.integers(0, 2, count).astype(np.int32)
    masks = np.zeros((count, _SIZE, _SIZE), bool)
    for i in np.flatnonzero(labels):
        cy, cx = rng.uniform(6, _SIZE - 6, 2)
        radius = rng.uniform(2.5, 4.5)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        images[i] += 0.5 * np.exp(-d2 / (2 * radius**2))
        masks[i] = d2 <= (1.5 * radius) ** 2
    return np.clip(images, 0, 1)[..., None], labels, masks


def _train(model: nnx.Module, steps: int) -> None:
    images, labels, _ = _blob_images(1024, seed=0)
    tx = optax.adam(3e-3)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        def loss_fn(p, r):
            # Fresh Variables at this trace level: BatchNorm updates its statistics in place.
            m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state

    rng = np.random.default_rng(1)
    for _ in range(steps):
        pick = rng.integers(0, len(images), 32)
        params, rest, opt_state = step(
            params, rest, opt_state, jnp.asarray(images[pick]), jnp.asarray(labels[pick])
        )
    nnx.update(model, params, rest)
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = dataclasses.replace(
        get_preset("tiny"), input_channels=1, class_names=("clear", "lesion")
    )
    model = build_model(spec, rngs=nnx.Rngs(0))
    _train(model, steps=40)
    card = export.ModelCard(
        title="blob detector",
        spec_summary=spec.summary(),
        class_names=spec.class_names,
        params=1,
        macs=1,
    )
    out = export.write_export(model, spec, tmp_path_factory.mktemp("x") / "export", card=card)
    return model, out


def test_heatmaps_find_the_lesion_far_more_often_than_random_maps(trained):
    model, _ = trained
    images, labels, masks = _blob_images(64, seed=2)
    lesion = labels == 1
    lesions = explain_validation.LesionSet(
        images_BxHxWxC=images[lesion],
        masks_BxHxW=masks[lesion],
        labels_B=labels[lesion],
        paths=tuple(f"blob{i}" for i in np.flatnonzero(lesion)),
        class_names=("clear", "lesion"),
    )
    accuracy = float(np.mean(np.argmax(model(jnp.asarray(images)), axis=-1) == labels))
    assert accuracy >= 0.9, "the model did not learn the task; the test would mean nothing"
    report = explain_validation.localization_report(model, lesions, ig_steps=16, draws=200)
    assert report.accuracy == pytest.approx(
        np.mean(np.argmax(model(jnp.asarray(images[lesion])), axis=-1) == 1)
    )
    assert report.random.pointing < 0.15  # blobs cover under a tenth of the image
    assert report.lesion_fraction == pytest.approx(masks[lesion].mean())
    for rates in (report.grad_cam, report.integrated_gradients):
        assert rates.count == lesion.sum()
        assert rates.pointing >= 0.8 and rates.pointing >= report.random.pointing + 0.5
        assert rates.mass >= 2 * report.random.mass
    assert report.by_class["lesion"]["grad_cam"] == report.grad_cam


def test_explain_command_writes_overlays_of_the_image_size(trained, tmp_path, capsys):
    _, out = trained
    images, _, _ = _blob_images(4, seed=3)
    path = tmp_path / "scan.png"
    # Not square and not the model size: the overlay must come back at 40 x 56.
    big = np.asarray(Image.fromarray(np.uint8(images[1, ..., 0] * 255)).resize((40, 52)))
    Image.fromarray(np.pad(big, ((4, 0), (0, 0)))).save(path)
    heat_png = tmp_path / "heat.png"
    argv = ["explain", "--model", str(out), str(path), "--out", str(heat_png), "--method", "both"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "predicted" in stdout and "Grad-CAM of" in stdout
    for png in (heat_png, tmp_path / "heat_ig.png"):
        with Image.open(png) as overlay:
            assert overlay.format == "PNG" and overlay.size == (40, 56)
    # Without --out the overlay goes beside the model, not into the current directory.
    assert main(["explain", "--model", str(out), str(path)]) == 0
    assert f"{Path(out) / 'explain' / 'scan_gradcam.png'}" in capsys.readouterr().out
    assert (Path(out) / "explain" / "scan_gradcam.png").exists()
    assert main(["explain", "--model", str(out), str(path), "--class", "nope"]) == 2
    assert "not a class of this model" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path), str(path)]) == 2
    assert "not an export" in capsys.readouterr().err
    assert main(["explain", "--model", str(out), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and err.count("\n") == 1
