"""Proposal strategies, all Optuna samplers: random, evolution, shrink, TPE, NSGA-II, and
whatever a user registers (`register_strategy`, see `search.strategies.registry`).

`StrategySampler` is what a study runs with. Before each trial it builds the strategy's
sampler afresh, seeded by (search seed, trial number), so the only state a strategy has is
the trial store: any worker proposes the next candidate, a resumed search continues the same
strategy (Optuna's own samplers keep nothing else that matters: TPE and NSGA-II rebuild their
models and generations from the stored trials), and one worker's proposals are reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from covidnet_jax.arch import AnySpec
from search.config import Objective, StrategyConfig
from search.ledger.records import Proposal
from search.strategies.context import StrategyContext
from search.strategies.evolution import EvolutionSampler
from search.strategies.genome import GenomeSampler, trial_rng
from search.strategies.registry import (
    StrategyFactory,
    register_strategy,
    registered_strategies,
    strategy_factory,
)
from search.strategies.shrink import ShrinkSampler
from search.strategies.space import SearchSpace

__all__ = [
    "EvolutionSampler",
    "GenomeSampler",
    "Proposal",
    "ShrinkSampler",
    "StrategyContext",
    "StrategyFactory",
    "StrategySampler",
    "register_strategy",
    "registered_strategies",
    "strategy_factory",
]


class StrategySampler(BaseSampler):
    """Builds the configured strategy's sampler per trial and delegates to it.

    Args:
        space: the search space.
        strategy: the `strategy:` section.
        objective: the search objective.
        seed: the search's root seed.
        within_cost: whether a spec meets the hard cost limits (for evolution and shrink).
        factory: builds each trial's sampler (default: the one registered as
            `strategy.name`, see `search.strategies.registry`).
        on_proposal: called with (trial number, `Proposal`) when evolution or shrink decides
            a genome (inside `study.ask()`); Optuna's own samplers propose parameter by
            parameter and have no parent or operator to report.
        on_ask: called with the trial number first thing inside `study.ask()`, once the trial
            exists in the storage (the runner records its owner there).
    """

    def __init__(
        self,
        space: SearchSpace,
        strategy: StrategyConfig,
        objective: Objective,
        seed: int,
        within_cost: Callable[[AnySpec], bool] | None = None,
        on_proposal: Callable[[int, Proposal], None] | None = None,
        factory: StrategyFactory | None = None,
        on_ask: Callable[[int], None] | None = None,
    ) -> None:
        self.on_ask = on_ask
        self.context = StrategyContext(
            space=space,
            strategy=strategy,
            objective=objective,
            seed=seed,
            trial_seed=0,
            within_cost=within_cost,
            on_proposal=on_proposal,
        )
        self.factory = factory if factory is not None else strategy_factory(strategy.name)
        self._inner: BaseSampler = self._build(0)

    def _build(self, number: int) -> BaseSampler:
        trial_seed = int(trial_rng(self.context.seed, number).integers(2**31 - 1))
        return self.factory(dataclasses.replace(self.context, trial_seed=trial_seed))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Builds this trial's sampler, then lets it prepare."""
        if self.on_ask is not None:
            self.on_ask(trial.number)
        self._inner = self._build(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Delegated to the strategy's sampler."""
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        """Delegated to the strategy's sampler."""
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Delegated to the strategy's sampler."""
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Any,
    ) -> None:
        """Delegated to the strategy's sampler."""
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial's sampler is seeded from the trial number."""
