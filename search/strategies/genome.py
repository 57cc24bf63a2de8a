"""The base of the strategies Optuna lacks: a sampler that proposes a whole genome at once.

Optuna asks a sampler for one parameter at a time. A `GenomeSampler` decides the whole genome
in `before_trial`, from the trial store alone (every earlier trial's record) and a random
generator seeded by (seed, trial number), then answers each `suggest_int` from it. So the
strategy keeps no state outside the storage: any worker can propose, a resumed search
continues the same strategy, and one worker's proposals are deterministic for a seed.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from search.ledger.records import Genome, Proposal, TrialRecord
from search.strategies.context import StrategyContext


def trial_rng(seed: int, number: int) -> np.random.Generator:
    """The random generator of trial `number` in a search seeded with `seed`."""
    return np.random.default_rng([seed, number])


class GenomeSampler(BaseSampler, abc.ABC):
    """An Optuna sampler that proposes genomes from the records of earlier trials.

    Args:
        context: the search space, the `strategy:` section, the objective (ranks parents),
            the root seed, `within_cost` (whether a spec meets the hard cost limits, None: no
            check; children are resampled to meet them, so a strategy spends few proposals
            on designs the cost pre-filter would reject anyway) and `on_proposal` (called
            with (trial number, proposal) as soon as a genome is decided, inside
            `study.ask()`: the runner records the proposal's origin in the trial itself, so
            it survives a worker killed right after the ask).
    """

    def __init__(self, context: StrategyContext) -> None:
        self.context = context
        self.space, self.strategy, self.objective = (
            context.space,
            context.strategy,
            context.objective,
        )
        self._genomes: dict[int, Genome] = {}

    @abc.abstractmethod
    def propose(self, records: Sequence[TrialRecord], rng: np.random.Generator) -> Proposal:
        """The next genome, given every earlier trial's record (ordered by number)."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Decides the genome of `trial` unless its parameters are fixed (enqueued)."""
        if "fixed_params" in trial.system_attrs:
            return
        records = [
            TrialRecord.from_trial(t)
            for t in study.get_trials(deepcopy=False)
            if t.number < trial.number
        ]
        proposal = self.propose(records, trial_rng(self.context.seed, trial.number))
        self._genomes[trial.number] = proposal.genome
        if self.context.on_proposal is not None:
            self.context.on_proposal(trial.number, proposal)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """No relative sampling: the genome is decided in `before_trial`."""
        return {}

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        """No relative sampling: the genome is decided in `before_trial`."""
        return {}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """The proposed value of one gene."""
        return self._genomes[trial.number][param_name]

    def fresh_genome(self, records: Sequence[TrialRecord], rng: np.random.Generator) -> Genome:
        """A random genome whose spec has not been proposed before (if one is found)."""
        seen = seen_hashes(records)
        genome = self.space.random_genome(rng)
        for _ in range(self.strategy.max_resample):
            if self.space.decode(genome).content_hash() not in seen:
                break
            genome = self.space.random_genome(rng)
        return genome

    def acceptable(self, genome: Genome, seen: set[str]) -> bool:
        """Whether a child is new and within the cost limits."""
        spec = self.space.decode(genome)
        if spec.content_hash() in seen:
            return False
        return self.context.within_cost is None or self.context.within_cost(spec)

    def mutate(
        self,
        genome: Genome,
        records: Sequence[TrialRecord],
        rng: np.random.Generator,
        *,
        count: int,
        growing: bool = False,
    ) -> tuple[Genome, str]:
        """`count` random single-step mutations, resampled until the child is acceptable.

        Args:
            genome: the parent.
            records: every earlier record (to avoid specs seen before).
            rng: the trial's random generator.
            count: mutations per child.
            growing: only mutations that add capacity (widen, add a module).

        Returns:
            The child genome and a description of the applied mutations (the last attempt's
            when no acceptable child was found).
        """
        seen = seen_hashes(records)
        child, notes = dict(genome), []
        for _ in range(self.strategy.max_resample):
            child, notes = dict(genome), []
            for _ in range(count):
                options = self.space.mutation_options(child)
                if growing:
                    options = [o for o in options if _grows(o[0])] or options
                if not options:
                    break
                note, child = options[int(rng.integers(len(options)))]
                notes.append(note)
            if self.acceptable(child, seen):
                break
        return child, ", ".join(notes) or "unchanged"


def _grows(note: str) -> bool:
    return note.startswith(("widen", "add module"))


def seen_hashes(records: Sequence[TrialRecord]) -> set[str]:
    """Spec hashes of every recorded proposal."""
    return {r.spec_hash for r in records if r.spec_hash}


def trained_records(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Records of trained candidates with their genome, in trial order."""
    return [r for r in records if r.is_trained and r.params]
