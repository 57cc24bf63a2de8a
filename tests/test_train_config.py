"""TrainConfig: validation errors name the key path and the bad value; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidnet_jax.config import TrainConfig, load_train_config
from covidnet_jax.errors import ConfigError
from covidnet_jax.typed_yaml import from_dict, to_dict

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"arch": "tiny"},
    "data": {"covidx_dir": "data/synth"},
    "train": {"steps": 10},
}


def _with(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


def test_smoke_config_loads_and_round_trips():
    config = load_train_config(ROOT / "experiments" / "smoke.yaml")
    assert config.model.arch == "tiny"
    assert config.train.steps and config.train.steps > 0
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_defaults():
    config = from_dict(TrainConfig, BASE)
    assert config.optimizer.name == "adam" and config.optimizer.learning_rate == 2e-4
    assert config.schedule.plateau_factor == 0.7 and config.schedule.plateau_patience == 5
    assert config.schedule.min_learning_rate == 1e-6
    assert config.train.checkpoint_interval == config.train.eval_every


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(optimizer={"lr": 0.1}), r"optimizer\.lr: unknown key"),
        (_with(optimizer={"name": "sgd"}), r"optimizer\.name: expected one of 'adam', 'adamw'"),
        (
            _with(optimizer={"learning_rate": -1.0}),
            r"optimizer\.learning_rate: expected a value > 0",
        ),
        (_with(train={"batch_size": "big"}), r"train\.batch_size: expected int, got 'big'"),
        (_with(train={"batch_size": 0}), r"train\.batch_size: expected a value >= 1, got 0"),
        (_with(train={"epochs": 2.0}), r"train\.steps: set exactly one of steps and epochs"),
        (
            _with(train={"eval_every": 10, "checkpoint_every": 15}),
            r"train\.checkpoint_every: expected a multiple of eval_every \(10\)",
        ),
        (_with(train={"selection_metric": "f1"}), r"train\.selection_metric: expected 'accuracy'"),
        (
            _with(schedule={"plateau_factor": 1.5}),
            r"schedule\.plateau_factor: expected a value < 1",
        ),
        (_with(model={"compute_dtype": "float16"}), r"model\.compute_dtype: expected one of"),
        ({"data": BASE["data"], "train": BASE["train"]}, r"model: required key is missing"),
    ],
)
def test_validation_errors_name_key_and_value(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, data)


def test_set_overrides_and_file_name_in_errors(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {arch: tiny}\ndata: {covidx_dir: d}\ntrain: {steps: 5}\n")
    config = load_train_config(path, ["train.steps=7", "optimizer.name=adamw", "seed=3"])
    assert (config.train.steps, config.optimizer.name, config.seed) == (7, "adamw", 3)
    with pytest.raises(ConfigError, match=r"exp\.yaml: train\.steps: expected a value >= 1"):
        load_train_config(path, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_train_config(path, ["train.steps"])


def test_epoch_budget_rounds_up_to_whole_steps():
    from covidnet_jax.train import _total_steps

    class FakeData:
        def num_examples(self, split):
            assert split == "train"
            return 100

    config = from_dict(TrainConfig, _with(train={"steps": None, "epochs": 1.5, "batch_size": 8}))
    assert _total_steps(config, FakeData()) == 19  # ceil(1.5 * 100 / 8)
    assert _total_steps(from_dict(TrainConfig, BASE), FakeData()) == 10
