"""TrainConfig: validation errors name the key path and the bad value; --set overrides."""

from __future__ import annotations

import dataclasses
import functools
import pickle
from pathlib import Path

import pytest

import search
from covidnet_jax.arch import HeadSpec
from covidnet_jax.config import LoopConfig, ModelConfig, TrainConfig, load_train_config
from covidnet_jax.data import DataConfig
from covidnet_jax.errors import ConfigError
from covidnet_jax.typed_yaml import from_dict, to_dict
from search.config import ClassRequirement, RequirementsConfig, SearchSettings, SpaceConfig
from search.execution.training import SearchExperiment, TrainingEvaluator, load_experiment

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


def test_configs_and_experiments_pickle_to_equal_objects():
    # Worker processes are spawned: the parsed configs must pickle. Before, a `dict` field
    # (data.class_weights, search.requirements.classes) held a mappingproxy, which does not.
    config = from_dict(TrainConfig, _with(data={"class_weights": {"normal": 1.0}}))
    assert pickle.loads(pickle.dumps(config)) == config
    experiment = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    assert experiment.search.requirements.classes  # a mapping section is exercised
    again = pickle.loads(pickle.dumps(experiment))
    assert again == experiment and again.training == experiment.training


def test_train_config_built_in_python_equals_the_parsed_one_and_is_validated():
    built = TrainConfig(
        model=ModelConfig(arch="tiny"),
        data=DataConfig(covidx_dir="data/synth"),
        train=LoopConfig(steps=10),
    )
    assert built == from_dict(TrainConfig, BASE)
    assert from_dict(TrainConfig, to_dict(built)) == built
    with pytest.raises(ConfigError, match=r"^train\.batch_size: expected a value >= 1, got 0$"):
        dataclasses.replace(built, train=LoopConfig(steps=10, batch_size=0))
    with pytest.raises(ConfigError, match=r"^data\.classes: expected a tuple, got \['a', 'b'\]$"):
        dataclasses.replace(built, data=DataConfig(covidx_dir="d", classes=["a", "b"]))
    with pytest.raises(ConfigError, match=r"^optimizer: expected OptimizerConfig, got 'adam'$"):
        dataclasses.replace(built, optimizer="adam")


def test_search_evaluator_from_an_experiment_built_in_python(tmp_path):
    # No YAML file: the experiment is built from objects and reaches a (spawned) worker by
    # pickling, where the evaluator is made from it.
    training = TrainConfig(
        model=ModelConfig(arch="tiny"),
        data=DataConfig(covidx_dir=str(tmp_path / "data")),
        train=LoopConfig(steps=10, batch_size=4),
    )
    settings = SearchSettings(
        space=SpaceConfig(prototype="tiny", heads=(HeadSpec(), HeadSpec(hidden=(8,)))),
        requirements=RequirementsConfig(classes={"COVID-19": ClassRequirement(min_ppv=0.5)}),
    )
    experiment = SearchExperiment(training, settings)
    make = pickle.loads(
        pickle.dumps(functools.partial(TrainingEvaluator.from_experiment, experiment))
    )
    assert make().config == training
    with pytest.raises(ConfigError, match=r"^search\.space\.heads\[0\]: expected HeadSpec"):
        SearchSettings(space=SpaceConfig(prototype="tiny", heads=({"pool": "avg"},)))
    with pytest.raises(ConfigError, match=r"^training: expected a TrainConfig, got dict"):
        SearchExperiment({"model": {}}, settings)
    # No file name to name the run directory after: `search.run` asks for one, up front.
    with pytest.raises(ConfigError, match=r"^workdir: required for an experiment built in"):
        search.run(experiment)


def test_search_heads_are_the_library_head_spec(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model: {arch: tiny}\ndata: {covidx_dir: d}\n"
        "search: {space: {heads: [{pool: flatten, hidden: [16], dropout: 0.2}]}}\n"
    )
    head = load_experiment(path).search.space.heads[0]
    assert head == HeadSpec(pool="flatten", hidden=(16,), dropout=0.2)
    for value, message in [
        ("{dropout: 1.5}", r"heads\[0\]\.dropout: expected a number in \[0, 1\), got 1\.5$"),
        ("{hidden: [0]}", r"heads\[0\]\.hidden\[0\]: expected an int in \[1, 65536\], got 0$"),
        ("{pool: max}", r"heads\[0\]\.pool: expected one of 'avg', 'flatten', got 'max'$"),
    ]:
        with pytest.raises(ConfigError, match=r"exp\.yaml: search\.space\." + message):
            load_experiment(path, (f"search.space.heads=[{value}]",))
