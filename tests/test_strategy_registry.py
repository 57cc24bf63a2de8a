"""Bring your own strategy: any Optuna sampler, registered by name, drives a search."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import optuna
import pytest
from search_support import PROTOTYPE, fast_tmp, read, settings

from covidnet_jax.errors import ConfigError
from search.execution.runner import Worker
from search.execution.surrogate import SurrogateEvaluator, surrogate_job
from search.strategies import (
    StrategyContext,
    register_strategy,
    registered_strategies,
    registry,
    strategy_factory,
)

__all__ = ["fast_tmp"]

BUILT_IN = ("evolution", "nsga2", "random", "shrink", "tpe")


def smallest_first(ctx: StrategyContext) -> optuna.samplers.BaseSampler:
    """A user's strategy: every gene at its first choice, then Optuna's random sampler."""
    return optuna.samplers.PartialFixedSampler(
        {gene.name: 0 for gene in ctx.space.genes},
        optuna.samplers.RandomSampler(seed=ctx.trial_seed),
    )


@pytest.fixture
def registered():
    register_strategy("smallest_first", smallest_first, replace=True)
    yield "smallest_first"


def test_the_built_in_strategies_are_registered():
    assert set(BUILT_IN) <= set(registered_strategies())


def test_an_unknown_name_lists_what_is_registered():
    with pytest.raises(ConfigError) as err:
        strategy_factory("grid")
    message = str(err.value)
    assert message.startswith("search.strategy.name: unknown strategy 'grid'; registered: ")
    assert all(name in message for name in BUILT_IN)


def test_a_name_is_registered_once_unless_replaced(registered):
    with pytest.raises(ValueError, match="'smallest_first' is registered already"):
        register_strategy(registered, smallest_first)
    register_strategy(registered, smallest_first, replace=True)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_registered_strategy_drives_the_search(fast_tmp, registered):
    data = settings(**{"strategy.name": registered, "budget.max_trials": 4})
    job = surrogate_job(data, fast_tmp / "mine", prototype=PROTOTYPE)
    Worker(job, SurrogateEvaluator()).run()
    proposals = [r for r in read(fast_tmp / "mine") if r.is_proposal]
    assert len(proposals) == 4
    assert all(set(r.params.values()) == {0} for r in proposals)
    # The same genome every time: the first trains, the rest are its duplicates.
    assert [r.status for r in proposals] == ["trained"] + ["duplicate"] * 3


def test_the_strategy_travels_to_spawned_workers_with_the_job(fast_tmp, registered):
    job = surrogate_job(settings(), fast_tmp / "p", prototype=PROTOTYPE)
    job = dataclasses.replace(job, strategy=strategy_factory(registered))
    assert pickle.loads(pickle.dumps(job)).strategy is smallest_first


def _readme_block(containing: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_readme_strategy_example_runs_a_search(fast_tmp):
    namespace: dict = {}
    exec(compile(_readme_block("register_strategy"), "README.md", "exec"), namespace)
    try:
        data = settings(**{"strategy.name": "qmc", "budget.max_trials": 6})
        job = surrogate_job(data, fast_tmp / "qmc", prototype=PROTOTYPE)
        Worker(job, SurrogateEvaluator()).run()
        proposals = [r for r in read(fast_tmp / "qmc") if r.is_proposal]
        assert len(proposals) == 6
        assert len({tuple(sorted(r.params.items())) for r in proposals}) > 1
    finally:
        registry._STRATEGIES.pop("qmc", None)  # the block registers without replace=True
