"""The search objective, defined once: Optuna's directions, the trial values, the design order.

Three objectives rank designs that meet every requirement (`search.config.Objective`):

- `min_macs`: fewest MACs (ties: higher validation accuracy);
- `max_netscore`: highest NetScore (ties: fewer MACs);
- `pareto`: validation accuracy against MACs; ordered by accuracy, then MACs.

`directions` and `trial_values` are what the Optuna study holds (samplers learn from them);
`design_order` is the objective's part of the rank (`search.ledger.records.rank_key`, which puts
requirements first). Every consumer (runner, store, records, fidelity, strategies,
leaderboard, compare, finish) goes through these three functions.

Example:
    >>> design_order("min_macs", accuracy=0.9, macs=4e5, params=5e3)
    (400000.0, -0.9)
"""

from __future__ import annotations

import math

from optuna.study import StudyDirection

from covidnet_jax.metrics import netscore
from search.config import Objective

_UNTRAINED_NETSCORE = -1000.0
"""Trial value of a design whose NetScore is undefined (zero accuracy)."""


def directions(objective: Objective) -> list[StudyDirection]:
    """Optuna directions of the trial values."""
    if objective == "min_macs":
        return [StudyDirection.MINIMIZE]
    if objective == "max_netscore":
        return [StudyDirection.MAXIMIZE]
    return [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]


def _netscore(accuracy: float, macs: float, params: float) -> float:
    return netscore(accuracy, max(int(params), 1), max(int(macs), 1))


def trial_values(
    objective: Objective, *, accuracy: float, macs: float, params: float
) -> list[float]:
    """The values told to Optuna for one design (in `directions` order)."""
    if objective == "min_macs":
        return [float(macs)]
    if objective == "max_netscore":
        score = _netscore(accuracy, macs, params)
        return [score if math.isfinite(score) else _UNTRAINED_NETSCORE]
    return [float(accuracy), float(macs)]


def design_order(
    objective: Objective, *, accuracy: float, macs: float, params: float
) -> tuple[float, ...]:
    """The objective's sort key of a design (smaller is better)."""
    if objective == "min_macs":
        return (float(macs), -accuracy)
    if objective == "max_netscore":
        return (-_netscore(accuracy, macs, params), float(macs))
    return (-accuracy, float(macs))
