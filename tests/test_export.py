"""Exports: the StableHLO artifact in a jax-only process, the Orbax state, the loader."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from covidnet_jax import export
from covidnet_jax.errors import CheckpointError
from covidnet_jax.models import build_model
from covidnet_jax.presets import get_preset

# Runs in a fresh interpreter that may import jax and numpy, nothing of this project and
# none of flax/optax/orbax: an import of those fails loudly.
_JAX_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    FORBIDDEN = {"covidnet_jax", "search", "flax", "optax", "orbax"}

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{name} imported in the jax-only process")
            return None

    sys.meta_path.insert(0, Forbid())
    import jax, numpy as np

    export_dir, inputs, outputs = sys.argv[1:4]
    with open(f"{export_dir}/export.json") as f:
        manifest = json.load(f)
    with open(f"{export_dir}/{manifest['files']['stablehlo']}", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    batches = np.load(inputs)
    np.savez(outputs, **{k: np.asarray(exported.call(batches[k])) for k in batches.files})
    assert not [m for m in sys.modules if m.split(".")[0] in FORBIDDEN]
    """
)


def _perturb_batch_stats(model: nnx.Module, seed: int) -> None:
    # Non-trivial running statistics: an export that used batch statistics would differ.
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        shape = var[...].shape
        value = rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0, 0.2, shape)
        var[...] = jnp.asarray(value, jnp.float32)


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    spec = dataclasses.replace(get_preset("tiny"), input_channels=1, class_names=("a", "b"))
    model = build_model(spec, rngs=nnx.Rngs(7))
    _perturb_batch_stats(model, 0)
    card = export.ModelCard(
        title="tiny test design",
        spec_summary=spec.summary(),
        class_names=spec.class_names,
        params=1234,
        macs=56789,
        requirements=(
            export.RequirementCheck("accuracy >= 0.9", 0.95, True, "validation"),
            export.RequirementCheck("MACs <= 1e6", 56789.0, True, "cost model"),
        ),
        metrics={"validation": {"accuracy": 0.95}, "test": {"accuracy": 0.9}},
        training={"optimizer": "adam", "steps": 10},
    )
    out = export.write_export(model, spec, tmp_path_factory.mktemp("x") / "export", card=card)
    return model, spec, out


def test_stablehlo_runs_without_covidnet_at_two_batch_sizes(exported_tiny, tmp_path):
    model, _, out = exported_tiny
    rng = np.random.default_rng(1)
    batches = {f"b{n}": rng.random((n, 32, 32, 1)).astype(np.float32) for n in (1, 5)}
    np.savez(tmp_path / "in.npz", **batches)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _JAX_ONLY_SCRIPT, str(out), tmp_path / "in.npz", tmp_path / "out"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    for name, images in batches.items():
        want = np.asarray(jax.nn.softmax(model(jnp.asarray(images)), axis=-1))
        assert got[name].shape == (len(images), 2)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name].sum(axis=1), 1.0, rtol=1e-5)


def test_export_folder_describes_itself(exported_tiny):
    _, spec, out = exported_tiny
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == export.EXPORT_FORMAT
    assert manifest["class_names"] == ["a", "b"]
    assert manifest["input"]["shape"] == ["batch", 32, 32, 1]
    assert set(manifest["platforms"]) == {"cpu", "cuda"}
    assert (out / "spec.json").read_text().strip() == spec.to_json()
    recipe = json.loads((out / "preprocessing.json").read_text())
    assert recipe["recipe_version"] == export.RECIPE_VERSION  # tests/test_preprocessing_recipe.py
    assert [step["op"] for step in recipe["steps"]][:3] == [
        "decode_grayscale",
        "drop_top_rows",
        "center_square_crop",
    ]
    card = (out / "model_card.md").read_text()
    for needle in ("accuracy >= 0.9", "Verdict: all met", "| accuracy | 0.95 | 0.9 |", "medical"):
        assert needle in card
    assert "jax and `flatbuffers` installed" in card  # deserializing needs flatbuffers
    assert not list(out.parent.glob(".export.*")), "staging folders must not be left behind"


def test_loader_predicts_files_like_the_live_model(exported_tiny, tmp_path):
    model, _, out = exported_tiny
    loaded = export.load_export(out)
    assert loaded.class_names == ("a", "b") and loaded.input_size == 32 and loaded.channels == 1
    rng = np.random.default_rng(2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(paths[-1])
    probs = export.predict(out, paths, batch_size=2)  # batches of 2 and 1
    images = np.stack([loaded.preprocess(p) for p in paths])
    want = np.asarray(jax.nn.softmax(model(jnp.asarray(images)), axis=-1))
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    uint8_images = np.rint(images * 255).astype(np.uint8)
    np.testing.assert_allclose(loaded.predict_batch(uint8_images), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(export.ExportError, match="expects images B x 32 x 32 x 1"):
        loaded.predict_batch(np.zeros((1, 32, 32, 3), np.float32))


def test_orbax_state_restores_the_trained_model(exported_tiny):
    model, _, out = exported_tiny
    restored = export.load_export(out).restore_model()
    x = jnp.asarray(np.random.default_rng(3).random((2, 32, 32, 1)), jnp.float32)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6, atol=1e-6)


def test_bad_export_paths_give_one_line_errors(tmp_path, exported_tiny):
    with pytest.raises(export.ExportError, match="export folder not found"):
        export.load_export(tmp_path / "nowhere")
    with pytest.raises(export.ExportError, match="not an export"):
        export.load_export(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("export.json", "preprocessing.json"):
        (broken / name).write_text((exported_tiny[2] / name).read_text())
    with pytest.raises(export.ExportError, match=r"incomplete export, missing model\.jax_export"):
        export.load_export(broken)
    (broken / "model.jax_export").write_bytes(b"not flatbuffers")
    with pytest.raises(export.ExportError, match="cannot deserialize") as err:
        export.load_export(broken)
    assert "\n" not in str(err.value)


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(tmp_path, exported_tiny):
    model, spec, _ = exported_tiny
    (tmp_path / "keep.txt").write_text("user data")
    card = export.ModelCard(title="t", spec_summary="s", class_names=("a", "b"), params=1, macs=1)
    with pytest.raises(export.ExportError, match="not empty and holds no export"):
        export.write_export(model, spec, tmp_path, card=card)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_inference_state_round_trip_with_a_dropout_head(tmp_path):
    # A dropout head carries random-number streams besides weights: the restore path that
    # builds a concrete model.
    from covidnet_jax.arch import HeadSpec

    spec = dataclasses.replace(
        get_preset("tiny"), head=HeadSpec(pool="avg", hidden=(8,), dropout=0.3)
    )
    model = build_model(spec, rngs=nnx.Rngs(5))
    _perturb_batch_stats(model, 1)
    export.save_inference_state(tmp_path / "ckpt", model, spec=spec)
    restored = export.restore_inference_state(tmp_path / "ckpt", spec)
    x = jnp.asarray(np.random.default_rng(4).random((2, 32, 32, 3)), jnp.float32)
    np.testing.assert_array_equal(restored(x), model(x))
    other = dataclasses.replace(spec, head=HeadSpec(pool="avg", hidden=(16,), dropout=0.3))
    with pytest.raises(CheckpointError, match="does not match this model"):
        export.restore_inference_state(tmp_path / "ckpt", other)
