"""Multi-fidelity: asynchronous successive halving (ASHA) over training-step rungs.

A trained candidate starts at rung 0 (the fewest steps). When it finishes a rung, it is
compared with every candidate that finished the same rung so far, by the search's rank (see
`search.ledger.records.rung_rank_key`: requirements met first, then the objective). It continues to
the next rung, resuming from its own checkpoint, when it ranks in the top
`max(1, n // reduction_factor)` of those n candidates; otherwise it stops there. The decision
uses only what the trial store holds at that moment, so it needs no synchronization between
workers (ASHA, Li et al. 2020). Like Optuna's `SuccessiveHalvingPruner`, a stopped candidate is
never resumed later, and while fewer than `reduction_factor` candidates finished a rung, only
the best so far is promoted.
"""

from __future__ import annotations

from collections.abc import Sequence

from search.config import Objective
from search.ledger.records import TrialRecord, rung_rank_key


def should_promote(
    candidate: TrialRecord,
    rung: int,
    records: Sequence[TrialRecord],
    *,
    reduction_factor: int,
    objective: Objective,
) -> bool:
    """Whether `candidate`, having finished `rung`, continues to the next rung.

    Args:
        candidate: the candidate's record, including its result at `rung`.
        rung: the rung just finished.
        records: every record in the store (the candidate's own is replaced by `candidate`).
        reduction_factor: keep the top 1/reduction_factor.
        objective: the search objective.

    Returns:
        True to promote.
    """
    # One entry per proposal: a retry carries its original's rungs and stands for it.
    competitors = {
        r.origin: r
        for r in records
        if len(r.rungs) > rung and r.status not in ("lost", "duplicate") and not r.second_retry
    }
    competitors[candidate.origin] = candidate
    ranked = sorted(
        competitors.values(), key=lambda r: (rung_rank_key(r, rung, objective), r.number)
    )
    keep = max(1, len(ranked) // reduction_factor)
    return any(r.number == candidate.number for r in ranked[:keep])
