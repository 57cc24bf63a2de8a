"""What a strategy gets to build the sampler of one trial (`StrategyContext`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from covidnet_jax.arch import AnySpec
from search.config import Objective, StrategyConfig
from search.ledger.records import Proposal
from search.strategies.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class StrategyContext:
    """What a strategy factory may use to build the sampler of one trial.

    Attributes:
        space: the search space (genes, decoding, mutation operators).
        strategy: the `search.strategy` section (its knobs).
        objective: the search objective.
        seed: the search's root seed.
        trial_seed: this trial's seed, derived from (seed, trial number): a sampler seeded with
            it proposes the same trial again on a resumed search or another worker.
        within_cost: whether a spec meets the hard cost limits (None: no pre-filter).
        on_proposal: for genome strategies: called with (trial number, `Proposal`) when a
            genome is decided, so the trial records its parent and operator.
    """

    space: SearchSpace
    strategy: StrategyConfig
    objective: Objective
    seed: int
    trial_seed: int
    within_cost: Callable[[AnySpec], bool] | None = None
    on_proposal: Callable[[int, Proposal], None] | None = None
