"""Each strategy improves over random search on cheap synthetic objectives (surrogate evaluator)."""

from __future__ import annotations

import collections
import statistics

import pytest
from search_support import fast_tmp, run, settings, tmpfs_dir

__all__ = ["fast_tmp"]

SEEDS = (0, 1, 2)


def best_netscores(root, strategy: str) -> list[float]:
    """Best NetScore in 30 proposals per seed, no requirements, one rung."""
    found = []
    for seed in SEEDS:
        data = settings(
            **{
                "strategy.name": strategy,
                "seed": seed,
                "objective": "max_netscore",
                "requirements": {},
                "budget.max_trials": 30,
                "budget.rungs": [300],
            }
        )
        records, _ = run(root, f"{strategy}-{seed}", data)
        found.append(max(r.netscore() for r in records if r.is_trained))
    return found


@pytest.fixture(scope="module")
def random_netscore(tmp_path_factory) -> float:
    with tmpfs_dir(tmp_path_factory.mktemp("random")) as root:
        return statistics.median(best_netscores(root, "random"))


@pytest.mark.parametrize("strategy", ["evolution", "shrink", "tpe", "nsga2"])
def test_each_strategy_finds_a_better_netscore_than_random(fast_tmp, strategy, random_netscore):
    assert statistics.median(best_netscores(fast_tmp, strategy)) > random_netscore


def feasible_designs(root, strategy: str) -> int:
    """Designs meeting tight requirements (MACs <= 2e6, accuracy >= 0.8, COVID-19 sensitivity
    >= 0.7; about 2% of the space) found in 30 proposals, summed over the seeds."""
    total = 0
    for seed in SEEDS:
        data = settings(
            **{
                "strategy.name": strategy,
                "seed": seed,
                "requirements.max_macs": 2.0e6,
                "budget.max_trials": 30,
            }
        )
        records, _ = run(root, f"{strategy}-{seed}", data)
        total += sum(1 for r in records if r.is_trained and r.feasible)
    return total


def test_evolution_and_shrink_meet_tight_requirements_more_often_than_random(fast_tmp):
    random = feasible_designs(fast_tmp / "random", "random")
    assert feasible_designs(fast_tmp / "evolution", "evolution") > 2 * random
    assert feasible_designs(fast_tmp / "shrink", "shrink") > 2 * random


def test_shrink_keeps_proposing_new_designs_while_none_meets_the_requirements(fast_tmp):
    # Unreachable accuracy: shrink grows the closest design. Once every growth of it is known
    # or over the MAC budget, it must move on instead of proposing those again (it once
    # stalled: 90 proposals in a row, each a duplicate or rejected for MACs).
    data = settings(
        **{
            "strategy.name": "shrink",
            "requirements.min_accuracy": 0.999,
            "requirements.max_macs": 1.5e6,
            "budget.max_trials": 30,
            "budget.rungs": [100],
        }
    )
    records, _ = run(fast_tmp, "shrink-unreachable", data)
    assert not any(r.feasible for r in records)
    statuses = collections.Counter(r.status for r in records)
    assert statuses["duplicate"] == 0, statuses
    assert statuses["trained"] >= 24, statuses
