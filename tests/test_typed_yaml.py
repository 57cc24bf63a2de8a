"""The YAML -> frozen dataclass loader used by every experiment file."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Literal

import pytest

from covidnet_jax.errors import ConfigError, SpecError
from covidnet_jax.typed_yaml import (
    JSON_SPEC,
    FrozenDict,
    bounded,
    check,
    from_dict,
    load_yaml_config,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class Optim:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = bounded(2e-4, gt=0)


@dataclasses.dataclass(frozen=True)
class Exp:
    name: str
    steps: int = bounded(10, ge=1)
    widths: tuple[int, ...] = (8, 16)
    optim: Optim = Optim()
    weights: dict[str, float] | None = None

    def __post_init__(self):
        if len(self.widths) == 0:
            raise ConfigError("widths: expected at least one width")


def test_round_trip_and_defaults():
    exp = from_dict(Exp, {"name": "a", "steps": 1e3, "optim": {"lr": 1}, "weights": {"x": 2}})
    assert exp.steps == 1000 and isinstance(exp.steps, int)
    assert exp.optim == Optim("adam", 1.0)
    assert exp.weights["x"] == 2.0
    assert from_dict(Exp, to_dict(exp)) == dataclasses.replace(exp)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "stepz": 3}, "stepz: unknown key; expected one of"),
        ({}, "name: required key is missing"),
        ({"name": 3}, "name: expected str, got 3"),
        ({"name": "a", "steps": 0}, "steps: expected a value >= 1, got 0"),
        ({"name": "a", "steps": True}, "steps: expected int, got True"),
        ({"name": "a", "optim": {"name": "sgd"}}, "optim.name: expected one of 'adam', 'adamw'"),
        ({"name": "a", "optim": {"lr": -1.0}}, "optim.lr: expected a value > 0, got -1.0"),
        ({"name": "a", "widths": [8, "x"]}, "widths[1]: expected int, got 'x'"),
        ({"name": "a", "widths": []}, "widths: expected at least one width"),
        ({"name": "a", "optim": 3}, "optim: expected a mapping (Optim), got 3"),
    ],
)
def test_errors_name_key_and_value(data, message):
    with pytest.raises(ConfigError, match=None) as info:
        from_dict(Exp, data)
    assert message in str(info.value)


def test_file_overrides_and_file_errors(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.1\n")
    exp = load_yaml_config(path, Exp, ["optim.name=adamw", "steps=5", "widths=[4]"])
    assert (exp.optim.name, exp.steps, exp.widths) == ("adamw", 5, (4,))
    with pytest.raises(ConfigError, match=r"exp.yaml: optim.lr: expected a value > 0"):
        load_yaml_config(path, Exp, ["optim.lr=0"])
    with pytest.raises(ConfigError, match=r"expected KEY.PATH=VALUE"):
        load_yaml_config(path, Exp, ["steps"])
    path.write_text("name: a\n  bad: [\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:\d+: invalid YAML"):
        load_yaml_config(path, Exp)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml_config(tmp_path / "missing.yaml", Exp)


def test_scientific_notation_that_yaml_reads_as_text():
    # PyYAML (YAML 1.1) reads 6.0e5 and 1e6 as strings; number fields take them anyway.
    exp = from_dict(Exp, {"name": "a", "steps": "1e3", "optim": {"lr": "6.0e-4"}})
    assert exp.steps == 1000 and exp.optim.lr == 6.0e-4
    with pytest.raises(ConfigError, match="steps: expected int, got '1e3x'"):
        from_dict(Exp, {"name": "a", "steps": "1e3x"})
    with pytest.raises(ConfigError, match=r"steps: expected int, got '2\.5'"):
        from_dict(Exp, {"name": "a", "steps": "2.5"})


def test_parsed_mappings_are_frozen_hashable_and_pickle():
    # A parsed config goes to spawned worker processes as it is: types.MappingProxyType
    # (what dict fields held before) could not be pickled.
    exp = from_dict(Exp, {"name": "a", "weights": {"x": 2, "y": 0.5}})
    assert isinstance(exp.weights, FrozenDict) and exp.weights == {"x": 2.0, "y": 0.5}
    with pytest.raises(TypeError):
        exp.weights["x"] = 3.0  # type: ignore[index]
    again = pickle.loads(pickle.dumps(exp))
    assert again == exp and isinstance(again.weights, FrozenDict)
    assert hash(again) == hash(exp)
    assert to_dict(exp)["weights"] == {"x": 2.0, "y": 0.5}


@dataclasses.dataclass(frozen=True)
class Root:
    exp: Exp
    seed: int = bounded(0, ge=0)

    def __post_init__(self):
        check(self)


def test_check_validates_objects_built_in_python():
    # The same rules and messages as a file, for sections passed as Python objects.
    root = Root(Exp("a", widths=(4,), weights={"x": 1.0}), seed=3)
    assert root == from_dict(
        Root, {"exp": {"name": "a", "widths": [4], "weights": {"x": 1}}, "seed": 3}
    )
    cases = [
        (lambda: Root(Exp("a", steps=0)), "exp.steps: expected a value >= 1, got 0"),
        (lambda: Root(Exp("a", widths=[4])), "exp.widths: expected a tuple, got [4]"),
        (lambda: Root(Exp("a", widths=(4, "x"))), "exp.widths[1]: expected int, got 'x'"),
        (lambda: Root(Exp("a", optim=Optim(lr=0))), "exp.optim.lr: expected a value > 0, got 0"),
        (lambda: Root(Exp("a", optim={"lr": 1.0})), "exp.optim: expected Optim, got {'lr': 1.0}"),
        (lambda: Root(Exp("a", optim=Optim(name="sgd"))), "exp.optim.name: expected one of"),
        (lambda: Root(Exp("a"), seed=1.0), "seed: expected int, got 1.0"),
        (lambda: Root(Exp("a", weights={"x": "big"})), "exp.weights.x: expected a finite number"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value).startswith(message), (str(info.value), message)


def test_spec_dialect_speaks_of_fields_and_objects():
    # One converter reads YAML configs and JSON specs; only the words and the leniency differ.
    with pytest.raises(SpecError, match=r"^stepz: unknown field; expected one of name, steps"):
        from_dict(Exp, {"name": "a", "stepz": 1}, dialect=JSON_SPEC)
    with pytest.raises(SpecError, match=r"^optim: expected an object \(Optim\), got 3$"):
        from_dict(Exp, {"name": "a", "optim": 3}, dialect=JSON_SPEC)
    with pytest.raises(SpecError, match=r"^name: required field is missing$"):
        from_dict(Exp, {}, dialect=JSON_SPEC)
    # JSON has real numbers: text is not read as a number there.
    with pytest.raises(SpecError, match=r"^optim\.lr: expected a finite number, got '1e-3'$"):
        from_dict(Exp, {"name": "a", "optim": {"lr": "1e-3"}}, dialect=JSON_SPEC)
    # A section's own ConfigError is prefixed and raised in the dialect's type.
    with pytest.raises(SpecError, match=r"^widths: expected at least one width$"):
        from_dict(Exp, {"name": "a", "widths": []}, dialect=JSON_SPEC)
