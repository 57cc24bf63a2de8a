"""Prototype-guided shrinking in the spirit of GenSynth, as an Optuna sampler.

Start from the prototype; then repeatedly take the best design that meets every requirement
(the anchor) and propose a child with the widths of a few of its modules or stages lowered by
one step (or one module fewer). A shrink of the anchor that broke a requirement (or failed) is
not tried again from that anchor; the other genes are. When no untried shrink of the best
design is left, the next best design becomes the anchor. The result is the heterogeneous
per-module widths GenSynth produced: modules that matter keep their width, the rest shrink.

Before any design meets the requirements: when no candidate was trained yet because the
designs so far exceed the cost limits, the cheapest of them shrinks in every width gene at
once (cost-driven descent; with several workers, a step another worker is still training is
not proposed again: a random part of the widths is lowered instead); when designs were
trained but none meets the requirements, the
closest one grows by one step (a wider module or stage, or one more module) within the cost
limits, the way a designer would give a too-weak prototype more capacity; when all its
growths are known or over budget, the next closest grows instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.ledger.records import Proposal, TrialRecord, rank_key
from search.ledger.requirements import COST_NAMES
from search.strategies.genome import GenomeSampler, seen_hashes, trained_records


class ShrinkSampler(GenomeSampler):
    """GenSynth-style shrinking; see the module docstring."""

    def propose(self, records: Sequence[TrialRecord], rng: np.random.Generator) -> Proposal:
        """The next shrink step from the current anchor."""
        proposed = [r for r in records if r.params and r.retry_of is None]
        if not proposed:
            return Proposal(self.space.prototype_genome(), None, "prototype")
        # Designs over a cost limit are trained only when the pre-filter is off (ablations);
        # for shrinking they are over budget like the untrained ones.
        trained = [r for r in trained_records(records) if not _over_cost(r)]
        feasible = [r for r in trained if r.feasible]
        if feasible:
            # The best design first; when every shrink of it was tried, the next best.
            anchors = sorted(feasible, key=lambda r: rank_key(r, self.objective))
            for anchor in anchors:
                proposal = self._shrink_anchor(anchor, records, rng)
                if proposal is not None:
                    return proposal
            return self._mutate_or_fresh(anchors[0], records, rng)
        if trained:
            return self._grow(trained, records, rng)
        over_budget = [
            r
            for r in proposed
            if r.macs is not None and (r.status == "infeasible" or _over_cost(r))
        ]
        if not over_budget:
            return Proposal(self.fresh_genome(records, rng), None, "random")
        cheapest = min(over_budget, key=lambda r: (r.macs, r.number))
        seen = seen_hashes(records)
        child = dict(cheapest.params)
        for name, _ in self.space.shrink_options(child):
            if name.endswith("width"):
                child[name] -= 1
        if child != cheapest.params and self.space.decode(child).content_hash() not in seen:
            return Proposal(child, cheapest.number, "narrow every width")
        # That step is taken already (another worker may still be training it): descend
        # beside it, narrowing a random part of the widths, rather than propose it twice.
        widths = [name for name, _ in self.space.shrink_options(cheapest.params)]
        widths = [name for name in widths if name.endswith("width")]
        for _ in range(self.strategy.max_resample if widths else 0):
            count = int(rng.integers(1, len(widths) + 1))
            picks = sorted(str(n) for n in rng.choice(widths, size=count, replace=False))
            child = dict(cheapest.params)
            for name in picks:
                child[name] -= 1
            if self.space.decode(child).content_hash() not in seen:
                return Proposal(child, cheapest.number, "narrow " + "+".join(picks))
        return Proposal(self.fresh_genome(records, rng), None, "random")

    def _grow(
        self,
        trained: Sequence[TrialRecord],
        records: Sequence[TrialRecord],
        rng: np.random.Generator,
    ) -> Proposal:
        """No design meets the requirements yet: grow the closest one by one step.

        A design whose every growth is known or over a cost limit hands over to the next
        closest (re-proposing known or over-budget growths stalled a search: 90 proposals in
        a row, all duplicates or rejected for MACs); when none can grow, the closest changes
        in any direction, and failing that a random design is proposed.
        """
        seen = seen_hashes(records)
        ranked = sorted(trained, key=lambda r: rank_key(r, self.objective))
        for record in ranked:
            child, note = self.mutate(record.params, records, rng, count=1, growing=True)
            if self.acceptable(child, seen):
                return Proposal(child, record.number, note)
        return self._mutate_or_fresh(ranked[0], records, rng)

    def _mutate_or_fresh(
        self, record: TrialRecord, records: Sequence[TrialRecord], rng: np.random.Generator
    ) -> Proposal:
        """The last resort: `record` changed in any direction, else a random design."""
        child, note = self.mutate(record.params, records, rng, count=1)
        if self.acceptable(child, seen_hashes(records)):
            return Proposal(child, record.number, note)
        return Proposal(self.fresh_genome(records, rng), None, "random")

    def _shrink_anchor(
        self, anchor: TrialRecord, records: Sequence[TrialRecord], rng: np.random.Generator
    ) -> Proposal | None:
        """A new shrink of `anchor` not yet known to break a requirement (None: none left)."""
        blocked: set[str] = set()
        for r in records:
            if r.parent != anchor.number:
                continue
            broke = r.status in ("failed", "infeasible", "invalid") or (
                r.is_trained and not r.feasible
            )
            if broke:
                blocked.update(r.operator.removeprefix("shrink ").split("+"))
        options = [(n, g) for n, g in self.space.shrink_options(anchor.params) if n not in blocked]
        seen = seen_hashes(records)
        for _ in range(self.strategy.max_resample):
            if not options:
                break
            count = int(rng.integers(1, min(self.strategy.shrink_modules, len(options)) + 1))
            picks = sorted(int(i) for i in rng.choice(len(options), size=count, replace=False))
            child = dict(anchor.params)
            for i in picks:
                child[options[i][0]] -= 1
            if self.acceptable(child, seen):
                note = "shrink " + "+".join(options[i][0] for i in picks)
                return Proposal(child, anchor.number, note)
        return None


def _over_cost(record: TrialRecord) -> bool:
    return any(record.violations.get(k, 0.0) > 0 for k in COST_NAMES)
