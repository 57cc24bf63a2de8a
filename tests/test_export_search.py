"""`covidnet export` on a real (one-trial) search, then `covidnet_jax.export.predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covidnet_jax.data import write_synthetic_dataset
from covidnet_jax.export import load_export, predict, predict_files
from covidnet_jax.predict import predict_images
from search.cli import main

pytestmark = pytest.mark.slow

_CONFIG = """
seed: 0
model: {{arch: tiny}}
data: {{covidx_dir: {data}, resolution: 32, channels: 1}}
optimizer: {{name: adam, learning_rate: 0.003}}
train: {{batch_size: 8, log_every: 2, eval_every: 3}}
search:
  requirements: {{max_macs: 1000000, min_accuracy: 0.0}}
  strategy: {{name: random}}
  budget: {{max_trials: 1, rungs: [3]}}
"""


@pytest.fixture(scope="module")
def search_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    write_synthetic_dataset(root / "synth", per_class=8, image_size=40, seed=0)
    config = root / "mini.yaml"
    config.write_text(_CONFIG.format(data=root / "synth"))
    workdir = root / "mini"
    assert main(["search", "--config", str(config), "--workdir", str(workdir)]) == 0
    assert (workdir / "best" / "metrics.json").is_file()
    return workdir


def test_export_of_the_best_design_predicts_like_its_run(search_workdir, capsys):
    assert main(["export", "--workdir", str(search_workdir)]) == 0
    assert "exported best design (trial 0)" in capsys.readouterr().out
    out = search_workdir / "export"
    card = (out / "model_card.md").read_text()
    assert "| MACs <= 1e+06 |" in card and "| accuracy >= 0 |" in card
    assert "| metric | validation | test |" in card and "Verdict: all met." in card
    best = json.loads((search_workdir / "best" / "metrics.json").read_text())
    assert load_export(out).manifest["name"] == best["spec_hash"]
    images = sorted((search_workdir.parent / "synth" / "test").glob("*.png"))[:3]
    probs = predict(out, images)
    reference = predict_images(search_workdir / "best" / "train", images)
    want = np.array([[p.probabilities[n] for n in load_export(out).class_names] for p in reference])
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    # Same records as `covidnet predict --workdir` prints.
    from_export = predict_files(out, images)
    assert [(p.path, p.predicted) for p in from_export] == [
        (p.path, p.predicted) for p in reference
    ]
    assert list(from_export[0].probabilities) == list(reference[0].probabilities)


def test_predict_command_reads_exports_like_workdirs(search_workdir, capsys):
    out = search_workdir / "export"
    if not (out / "export.json").is_file():
        assert main(["export", "--workdir", str(search_workdir)]) == 0
    images = [str(p) for p in sorted((search_workdir.parent / "synth" / "test").glob("*.png"))[:2]]
    capsys.readouterr()
    assert main(["predict", "--model", str(out), *images, "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)["predictions"]
    run = search_workdir / "best" / "train"
    assert main(["predict", "--workdir", str(run), *images, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["path"] for p in from_export] == images
    assert [p["predicted"] for p in from_export] == [p["predicted"] for p in from_run]
    for a, b in zip(from_export, from_run, strict=True):
        np.testing.assert_allclose(
            list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-6
        )
    assert main(["predict", "--model", str(out), "--step", "3", *images]) == 2
    assert "not of an export" in capsys.readouterr().err


def test_export_errors_are_one_line(search_workdir, tmp_path, capsys):
    from search.ledger import store

    empty = tmp_path / "empty"
    store.open_study(store.open_storage(empty), "empty", "min_macs")  # a study, no trials
    cases = [
        (["--workdir", str(empty)], "no finished best design yet"),
        (["--workdir", str(empty), "--trial", "0"], "has no trials yet"),
        (["--workdir", str(tmp_path / "nowhere")], "no such folder"),
        (["--workdir", str(tmp_path)], "not a search workdir"),
        (["--workdir", str(search_workdir), "--trial", "5"], "no trial 5"),
        (["--workdir", str(search_workdir), "--trial", "last"], "expected a trial number"),
        (["--workdir", str(search_workdir), "--out", str(search_workdir)], "holds no export"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
