"""The search space, requirements, the experiment schema and successive halving's rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covidnet_jax import presets
from covidnet_jax.cost import count_cost
from covidnet_jax.errors import ConfigError
from covidnet_jax.metrics import compute_metrics
from covidnet_jax.typed_yaml import from_dict
from search.config import RequirementsConfig, SearchSettings, SpaceConfig
from search.execution.fidelity import should_promote
from search.ledger.records import RungResult, TrialRecord
from search.ledger.requirements import (
    Cost,
    check_class_names,
    cost_violations,
    describe_violations,
    is_feasible,
    outcome_violations,
)
from search.strategies.registry import strategy_factory
from search.strategies.space import SearchSpace

TINY = presets.get_preset("tiny").with_input_size(64)
SPACE = {
    "prototype": "tiny",
    "stage_depths": [[1, 3], [1, 2]],
    "stage_width": {"min": 0.5, "max": 1.5, "step": 0.25},
    "module_width": {"min": 0.25, "max": 2.0, "step": 0.25},
    "kernel_sizes": [3, 5],
    "connectivity": ["dense", "residual", "none"],
    "heads": [{"pool": "avg"}, {"pool": "avg", "hidden": [32], "dropout": 0.1}],
    "resolutions": [32, 64],
}


def make_space(**changes: object) -> SearchSpace:
    return SearchSpace(from_dict(SpaceConfig, {**SPACE, **changes}, path="space"), TINY)


def test_the_prototype_genome_decodes_to_the_prototype():
    space = make_space()
    assert space.decode(space.prototype_genome()) == TINY
    paper = presets.get_preset("covidnet-prototype")
    config = from_dict(SpaceConfig, {"prototype": "covidnet-prototype"})
    assert SearchSpace(config, paper).decode({}) == paper


def test_class_names_come_from_the_data():
    space = SearchSpace(from_dict(SpaceConfig, SPACE), TINY, class_names=("neg", "pos"))
    assert space.decode(space.prototype_genome()).class_names == ("neg", "pos")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_genome_decodes_to_a_valid_spec_and_every_mutation_changes_it(seed):
    space = make_space()
    genome = space.random_genome(np.random.default_rng(seed))
    spec = space.decode(genome)
    for stage, (low, high) in zip(spec.stages, SPACE["stage_depths"], strict=True):
        assert low <= len(stage.modules) <= high
        for module in stage.modules:
            assert module.kernel_size in (3, 5)
            assert all(w % 4 == 0 for w in (module.proj1, module.expand, module.proj2, module.out))
    for note, child in space.mutation_options(genome):
        child_spec = space.decode(child)
        assert child_spec.content_hash() != spec.content_hash(), note
        if note.startswith("add module"):
            stage = int(note.split("s", 2)[-1].split(".")[0])
            assert len(child_spec.stages[stage].modules) == len(spec.stages[stage].modules) + 1
            # The new module copies its predecessor's width multiplier.
            depth = len(child_spec.stages[stage].modules)
            if f"s{stage}.m{depth - 1}.width" in child:
                new, previous = f"s{stage}.m{depth - 1}.width", f"s{stage}.m{depth - 2}.width"
                assert child[new] == child[previous]
    for _, child in space.shrink_options(genome):
        assert count_cost(space.decode(child)).macs <= count_cost(spec).macs


def test_optuna_distributions_cover_every_gene():
    space = make_space()
    distributions = space.distributions()
    assert set(distributions) == {g.name for g in space.genes}
    assert "s0.m2.width" in distributions and "s1.m2.width" not in distributions
    # Genes with a single choice are not searched.
    single = make_space(kernel_sizes=[3], connectivity=["dense"], heads=[], resolutions=[])
    assert not {"s0.kernel", "connectivity", "head", "resolution"} & set(single.distributions())


def test_space_errors_name_the_key_and_the_bad_value():
    with pytest.raises(ConfigError, match=r"space.stage_depths: expected 2 \[min, max\] pairs"):
        make_space(stage_depths=[[1, 2]])
    with pytest.raises(ConfigError, match=r"space.stage_depths\[0\]: .* got \[3, 1\]"):
        make_space(stage_depths=[[3, 1], [1, 1]])
    with pytest.raises(ConfigError, match=r"space.kernel_sizes\[1\]: expected an odd size"):
        make_space(kernel_sizes=[3, 4])
    with pytest.raises(ConfigError, match=r"space.module_width.step: expected \(max - min\)"):
        make_space(module_width={"min": 0.25, "max": 1.0, "step": 0.3})
    with pytest.raises(ConfigError, match=r"search.budget.rungs\[1\]: expected ascending"):
        from_dict(SearchSettings, {"space": SPACE, "budget": {"rungs": [200, 100]}}, path="search")
    # Strategy names are checked against the registry (`search.strategies.registry`), which
    # users extend, so the settings accept any name and the search refuses an unknown one.
    with pytest.raises(ConfigError, match=r"search.strategy.name: unknown strategy 'grid'; reg"):
        strategy_factory(
            from_dict(SearchSettings, {"space": SPACE, "strategy": {"name": "grid"}}).strategy.name
        )


def _metrics(confusion):
    return compute_metrics(confusion, ("normal", "pneumonia", "COVID-19"))


def test_requirements_are_evaluated_per_class():
    reqs = from_dict(
        RequirementsConfig,
        {
            "min_accuracy": 0.7,
            "classes": {
                "COVID-19": {"min_sensitivity": 0.8, "min_ppv": 0.9},
                "pneumonia": {"min_ppv": 0.5},
            },
            "decision": "point",  # the lower-bound rule: tests/test_requirements.py
        },
    )
    # COVID-19: 8 of 10 found (sensitivity 0.8); 8 of 12 predictions right (PPV 0.667).
    metrics = _metrics([[9, 0, 1], [0, 7, 3], [0, 2, 8]])
    found = outcome_violations(reqs, metrics)
    assert found["accuracy"] == 0.0
    assert found["sensitivity:COVID-19"] == 0.0
    assert found["ppv:COVID-19"] == pytest.approx(0.9 - 8 / 12)
    assert found["ppv:pneumonia"] == 0.0
    assert not is_feasible(found)
    assert describe_violations(found) == "ppv:COVID-19 0.233 below minimum"
    # A model that never predicts COVID-19 fails its PPV requirement (PPV reported as 0).
    never = outcome_violations(reqs, _metrics([[10, 0, 0], [0, 10, 0], [5, 5, 0]]))
    assert never["ppv:COVID-19"] == 0.9 and never["sensitivity:COVID-19"] == 0.8
    perfect = outcome_violations(reqs, _metrics([[10, 0, 0], [0, 10, 0], [0, 0, 10]]))
    assert is_feasible(perfect)


def test_cost_limits_and_class_names():
    reqs = RequirementsConfig(max_macs=1e6, max_params=1000, max_activation_bytes=None)
    found = cost_violations(reqs, Cost(macs=1_500_000, params=900, activation_bytes=10**12))
    assert found == {"macs": pytest.approx(0.5), "params": 0.0}
    assert describe_violations(found) == "macs +50% over limit"
    with pytest.raises(ConfigError, match=r"requirements.classes.covid: no such class"):
        check_class_names(
            from_dict(RequirementsConfig, {"classes": {"covid": {"min_ppv": 0.5}}}),
            ("normal", "COVID-19"),
        )


def _record(number: int, accuracy_at_rungs: list[float], macs: int = 1000) -> TrialRecord:
    rungs = []
    for rung, accuracy in enumerate(accuracy_at_rungs):
        correct = round(accuracy * 10)
        metrics = compute_metrics([[correct, 10 - correct], [10 - correct, correct]], ("a", "b"))
        violation = {"accuracy": max(0.0, 0.9 - metrics.accuracy)}
        rungs.append(RungResult(rung, 100 * (rung + 1), metrics, 0.0, 1.0, "", violation))
    return TrialRecord(number, "COMPLETE", "trained", {}, {"macs": macs}, tuple(rungs), None)


def test_successive_halving_keeps_the_top_fraction_at_each_rung():
    done = [_record(i, [acc]) for i, acc in enumerate([0.5, 0.6, 0.7, 0.8, 0.4, 0.3])]
    promote = lambda r: should_promote(r, 0, done, reduction_factor=3, objective="max_netscore")  # noqa: E731
    # 6 finished rung 0: the best 2 continue.
    assert [promote(r) for r in done] == [False, False, True, True, False, False]
    # Before reduction_factor candidates finished, only the best so far continues.
    assert should_promote(done[1], 0, done[:2], reduction_factor=3, objective="min_macs")
    assert not should_promote(done[0], 0, done[:2], reduction_factor=3, objective="min_macs")
    # Meeting the requirements outranks the objective (fewer MACs) at the rung.
    feasible = dataclasses.replace(_record(7, [0.9]), attrs={"macs": 10**9})
    cheap = [_record(10 + i, [0.7], macs=10) for i in range(5)]
    assert should_promote(feasible, 0, cheap, reduction_factor=3, objective="min_macs")
