"""Regularized (aging) evolution over specs (Real et al., 2019), as an Optuna sampler.

The population is the `population_size` most recently trained candidates (older ones age
out, whatever their fitness). A child is a copy of the best of `tournament_size` members drawn
at random, with `mutations` single-step mutations (widen/narrow a module or stage, add/remove
a module, change a kernel size, the connectivity, the head or the resolution). Until
`startup_trials` candidates are trained, proposals are random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.ledger.records import Proposal, TrialRecord, rung_rank_key
from search.strategies.genome import GenomeSampler, trained_records


class EvolutionSampler(GenomeSampler):
    """Aging evolution; see the module docstring."""

    def propose(self, records: Sequence[TrialRecord], rng: np.random.Generator) -> Proposal:
        """A mutated tournament winner of the recent population (random while too few)."""
        trained = trained_records(records)
        if len(trained) < max(1, self.strategy.startup_trials):
            return Proposal(self.fresh_genome(records, rng), None, "random")
        population = trained[-self.strategy.population_size :]
        size = min(self.strategy.tournament_size, len(population))
        picks = rng.choice(len(population), size=size, replace=False)
        # Every member has a rung-0 result; comparing there keeps the tournament fair when
        # successive halving trained some members longer than others.
        parent = min(
            (population[int(i)] for i in picks),
            key=lambda r: rung_rank_key(r, 0, self.objective),
        )
        child, note = self.mutate(parent.params, records, rng, count=self.strategy.mutations)
        return Proposal(child, parent.number, note)
