"""End to end on a small synthetic data set: train, resume, fail safely, evaluate, predict."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from covidnet_jax import parallel
from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec, StemSpec
from covidnet_jax.checkpointing import Checkpoints
from covidnet_jax.config import TrainConfig
from covidnet_jax.data import load_data, write_synthetic_dataset
from covidnet_jax.evaluate import evaluate_workdir, write_evaluation
from covidnet_jax.metrics import EvalMetrics, netscore
from covidnet_jax.models import build_model
from covidnet_jax.predict import predict_images
from covidnet_jax.steps import StepFunctions, StepSettings
from covidnet_jax.train import TrainFailure, TrainResult, _inherit, resolve_spec, train_and_evaluate
from covidnet_jax.typed_yaml import from_dict
from search.cli import main
from tests.conftest import no_memoised_steps

pytestmark = pytest.mark.slow


# A one-module PEPX design: every code path of the trainer, a fraction of tiny's compile time.
SMALL = ArchSpec(
    input_size=16,
    stem=StemSpec(channels=4, kernel_size=3, stride=2, pool_size=0),
    stages=(StageSpec(stride=1, modules=(ModuleSpec(4, 8, 4, 8),)),),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "covidx"
    write_synthetic_dataset(out, per_class=16, image_size=32, seed=0)
    (out.parent / "small.json").write_text(SMALL.to_json())
    return out


def make_config(data_dir: Path, cache: Path, **overrides) -> TrainConfig:
    raw = {
        "model": {"arch": str(data_dir.parent / "small.json")},
        "data": {
            "covidx_dir": str(data_dir),
            "resolution": 16,
            "channels": 3,
            "validation_fraction": 0.2,
            "rebalance_class": "COVID-19",
            "class_weights": "balanced",
        },
        "optimizer": {"learning_rate": 0.003},
        "schedule": {"kind": "plateau", "plateau_patience": 1},
        # Precise-BN calibration on: the resume test also proves it deterministic.
        "train": {
            "steps": 6,
            "batch_size": 8,
            "log_every": 2,
            "eval_every": 2,
            "bn_calibration_batches": 2,
        },
        "compile_cache_dir": str(cache),
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    return from_dict(TrainConfig, raw)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = make_config(data_dir, root / "cache")
    with no_memoised_steps():  # the run compiles its own steps (asserted below)
        result = train_and_evaluate(config, root / "run", show_progress=False)
    return config, result, root / "run"


class ScriptedData:
    """A data set whose train stream is interrupted or poisoned at a given step."""

    def __init__(self, data, *, interrupt_at=None, nan_at=None):
        self._data, self.interrupt_at, self.nan_at = data, interrupt_at, nan_at

    def __getattr__(self, name):
        return getattr(self._data, name)

    def train_batches(self, batch_size, *, seed=None, start_step=0):
        stream = self._data.train_batches(batch_size, seed=seed, start_step=start_step)
        for step, batch in zip(itertools.count(start_step), stream, strict=False):
            if step == self.interrupt_at:
                raise KeyboardInterrupt
            if step == self.nan_at:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch


def _final_arrays(workdir: Path):
    with Checkpoints.open_existing(workdir) as ckpts:
        return ckpts.latest_step(), jax.tree.leaves(ckpts.restore_arrays())


def test_train_writes_result_logs_and_checkpoints(trained):
    config, result, workdir = trained
    assert isinstance(result, TrainResult) and result.ok
    assert result.step == 6 and result.best_step in (2, 4, 6)
    assert result.metrics.count > 0 and 0.0 <= result.metrics.accuracy <= 1.0
    assert result.selection_value == result.metrics.accuracy
    assert result.compile_s > 0 and result.train_s > 0 and result.images_per_s > 0
    assert (workdir / "config.yaml").is_file() and (workdir / "spec.json").is_file()
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[1] == "compile" and kinds[-1] == "end"
    assert [e["step"] for e in events if e["event"] == "train"] == [2, 4, 6]
    assert [e["step"] for e in events if e["event"] == "validation"] == [2, 4, 6]
    with Checkpoints.open_existing(workdir) as ckpts:
        assert ckpts.latest_step() == 6 and 6 in ckpts.steps()
        assert len(ckpts.steps()) <= config.train.keep_checkpoints + config.train.keep_best


def test_the_checkpoint_reported_is_the_one_handed_on(trained, data_dir, tmp_path):
    # `select: last`: the metrics reported are those of the last checkpoint, and that
    # checkpoint is what evaluate restores (and children inherit): never the best of many.
    config, _, _ = trained
    last = dataclasses.replace(config, train=dataclasses.replace(config.train, select="last"))
    result = train_and_evaluate(last, tmp_path / "last", show_progress=False)
    assert result.ok and result.best_step == 6
    with Checkpoints.open_existing(tmp_path / "last") as ckpts:
        assert ckpts.selected_step() == 6
        saved = ckpts.metrics(6)["validation"]
    assert result.metrics.to_dict() == EvalMetrics.from_dict(saved).to_dict()
    assert evaluate_workdir(tmp_path / "last").step == 6
    assert evaluate_workdir(tmp_path / "last").metrics.to_dict() == result.metrics.to_dict()
    # `select: best` (the training default) hands on the best by the selection metric.
    _, result_best, workdir = trained
    with Checkpoints.open_existing(workdir) as ckpts:
        assert ckpts.selected_step() == result_best.best_step == ckpts.best_step()


def test_rerun_of_a_finished_run_trains_nothing(trained, data_dir):
    config, result, workdir = trained
    again = train_and_evaluate(config, workdir, show_progress=False)
    assert again.ok and again.resumed_from == 6 and again.train_s == 0.0
    assert (
        again.best_step == result.best_step and again.metrics.to_dict() == result.metrics.to_dict()
    )


def test_interrupted_and_resumed_run_equals_uninterrupted(trained, data_dir, tmp_path):
    config, _, workdir = trained
    data = load_data(config.data, seed=config.seed)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(
            config, tmp_path, data=ScriptedData(data, interrupt_at=3), show_progress=False
        )
    assert Checkpoints.open_existing(tmp_path).latest_step() == 2
    resumed = train_and_evaluate(config, tmp_path, show_progress=False)
    assert resumed.ok and resumed.resumed_from == 2
    step_a, arrays_a = _final_arrays(workdir)
    step_b, arrays_b = _final_arrays(tmp_path)
    assert step_a == step_b == 6
    for a, b in zip(arrays_a, arrays_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_returns_failure_and_keeps_last_good_checkpoint(trained, tmp_path):
    config, _, _ = trained
    data = load_data(config.data, seed=config.seed)
    failure = train_and_evaluate(
        config, tmp_path, data=ScriptedData(data, nan_at=3), show_progress=False
    )
    assert isinstance(failure, TrainFailure) and not failure.ok
    assert failure.kind == "non_finite" and failure.step == 4
    assert "step 4" in failure.reason and failure.last_good_step == 2
    with Checkpoints.open_existing(tmp_path) as ckpts:
        assert ckpts.steps() == [2]
        assert all(
            np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpts.restore_arrays())
        )
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failure" and events[-1]["kind"] == "non_finite"


def test_huge_learning_rate_fails_without_spoiling_checkpoints(trained, tmp_path):
    config, _, _ = trained
    assert train_and_evaluate(
        make_config_like(config, train__steps=2), tmp_path, show_progress=False
    ).ok
    failure = train_and_evaluate(
        make_config_like(config, train__steps=40, optimizer__learning_rate=1e30),
        tmp_path,
        show_progress=False,
    )
    assert isinstance(failure, TrainFailure) and failure.kind == "non_finite"
    with Checkpoints.open_existing(tmp_path) as ckpts:
        assert all(
            np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpts.restore_arrays())
        )


def make_config_like(config: TrainConfig, **overrides) -> TrainConfig:
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **{name: value})}
        )
    return config


def test_init_from_copies_matching_weights(trained, tmp_path):
    config, _, workdir = trained
    child = train_and_evaluate(
        make_config_like(config, train__steps=2),
        tmp_path / "same",
        init_from=workdir,
        show_progress=False,
    )
    assert child.ok and child.inherited == child.inheritable > 0

    data = load_data(config.data, seed=config.seed)
    wider = StageSpec(stride=1, modules=(ModuleSpec(4, 12, 4, 8),))  # expand 8 -> 12
    spec = resolve_spec(config, data, dataclasses.replace(SMALL, stages=(wider,)))
    model = build_model(spec, rngs=nnx.Rngs(1))
    fns = StepFunctions.for_model(
        model, key=spec.content_hash(), settings=StepSettings(), mesh=parallel.make_mesh()
    )
    fresh = fns.init_state(model)
    state, copied = _inherit(fresh, workdir, fns.mesh)
    total = len(jax.tree.leaves(fresh.params))
    assert 0 < copied < total
    with Checkpoints.open_existing(workdir) as parent:
        parent_stem = parent.restore_arrays(parent.best_step())["params"]["stem"]
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(state.params["stem"])[0]),
        np.asarray(jax.tree.leaves(parent_stem)[0]),
    )


def test_evaluate_and_predict(trained, data_dir):
    config, result, workdir = trained
    evaluation = evaluate_workdir(workdir, split="test")
    assert evaluation.step == result.best_step
    assert evaluation.metrics.count == load_data(config.data, seed=0).num_examples("test")
    assert evaluation.params > 0 and evaluation.macs > 0
    assert evaluation.netscore == netscore(
        evaluation.metrics.accuracy, evaluation.params, evaluation.macs
    )
    json_path, png = write_evaluation(evaluation, workdir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(json_path.read_text())
    assert saved["split"] == "test"
    # Every rate with its interval, AUROC per class, calibration and its diagram.
    assert saved["intervals"]["accuracy"]["trials"] == evaluation.metrics.count
    assert set(saved["auroc"]) == set(evaluation.metrics.class_names)
    assert 0.0 <= saved["calibration"]["ece"] <= 1.0
    assert sum(saved["calibration"]["count"]) == evaluation.metrics.count
    assert (workdir / "evaluation" / "test_reliability.png").is_file()

    images = sorted((data_dir / "test").glob("*.png"))[:3]
    predictions = predict_images(workdir, images)
    assert [p.path for p in predictions] == [str(p) for p in images]
    for p in predictions:
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.predicted == max(p.probabilities, key=p.probabilities.get)
        assert set(p.probabilities) == set(result.metrics.class_names)


def test_cli_evaluate_predict_and_one_line_errors(trained, data_dir, tmp_path, capsys):
    _, _, workdir = trained
    assert main(["evaluate", "--workdir", str(workdir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "validation" and "netscore" in out and "confusion" in out
    images = [str(p) for p in sorted((data_dir / "test").glob("*.png"))[:3]]
    assert main(["predict", "--workdir", str(workdir), *images, "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["path"] for p in predictions] == images

    assert main(["evaluate", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint found" in err
    search_dir = tmp_path / "a_search"
    (search_dir / "trials" / "0").mkdir(parents=True)
    (search_dir / "best" / "train").mkdir(parents=True)
    assert main(["evaluate", "--workdir", str(search_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--workdir {search_dir / 'best' / 'train'}" in err
    again = main(["train", "--config", str(workdir / "config.yaml"), "--workdir", str(workdir)])
    assert again == 0 and "nothing trained" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: tiny}\ndata: {covidx_dir: x}\ntrain: {steps: 0}\n")
    assert main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps: expected a value >= 1, got 0" in err
    assert main(["predict", "--workdir", str(workdir), str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9.9GiB"),
            "out_of_memory",
        ),
        (TypeError("conv_general_dilated lhs feature dimension mismatch"), "compile_error"),
    ],
)
def test_oom_and_compile_errors_become_failures(trained, tmp_path, monkeypatch, error, kind):
    config, _, _ = trained

    def broken_compile(*args, **kwargs):
        raise error

    monkeypatch.setattr(StepFunctions, "compile_train", broken_compile)
    failure = train_and_evaluate(config, tmp_path, show_progress=False)
    assert isinstance(failure, TrainFailure) and failure.kind == kind
    assert failure.step == 0 and failure.last_good_step is None
    assert str(error).split(":")[0] in failure.reason


_TRAIN_IN_A_PROCESS = """
import json, sys
from pathlib import Path
from covidnet_jax.config import TrainConfig
from covidnet_jax.train import train_and_evaluate
from covidnet_jax.typed_yaml import from_dict
config = from_dict(TrainConfig, json.loads(sys.argv[1]))
train_and_evaluate(config, Path(sys.argv[2]), show_progress=False)
"""


def _compile_event(workdir: Path) -> dict:
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "compile")


@pytest.mark.slow
def test_compile_events_tell_xla_compiles_from_persistent_cache_reads(data_dir, tmp_path):
    import os
    import subprocess
    import sys

    from covidnet_jax.typed_yaml import to_dict

    config = make_config(data_dir, tmp_path / "cache", train__steps=2)
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for run in ("first", "second"):  # two processes, one cache: the second reads it
        command = [sys.executable, "-c", _TRAIN_IN_A_PROCESS, json.dumps(to_dict(config))]
        done = subprocess.run(
            [*command, str(tmp_path / run)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = _compile_event(tmp_path / "first"), _compile_event(tmp_path / "second")
    # train, eval and BN-moments steps: compiled by XLA in the first process, read back in
    # the second
    assert first["cache_misses"] >= 3 and first["cache_hits"] == 0
    assert second["cache_hits"] >= 3 and second["cache_misses"] == 0
