"""The shipped search experiments load, and the quickstart is the task its comments describe.

`make search` and bench/search_efficiency.py run experiments/quickstart.yaml; a typo in it or a
budget that no longer traps the cheap designs would otherwise show only there.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from covidnet_jax.cost import count_cost
from search.execution.training import load_experiment, load_prototype
from search.strategies.space import SearchSpace

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SEARCHES = ("quickstart.yaml", "covidx_cxr3b.yaml", "covidx_cxr4c.yaml")


def _space(name: str) -> tuple[SearchSpace, float]:
    """The experiment's search space around its prototype, and its MAC budget."""
    experiment = load_experiment(str(EXPERIMENTS / name))
    space = SearchSpace(experiment.search.space, load_prototype(experiment))
    return space, experiment.search.requirements.max_macs


@pytest.mark.parametrize("name", SEARCHES)
def test_shipped_search_experiment_loads_and_its_prototype_is_over_budget(name):
    """As in COVID-Net's exploration, every shipped search starts from a prototype that is
    too expensive, so the search has to find a cheaper design."""
    space, max_macs = _space(name)
    assert count_cost(space.decode(space.prototype_genome())).macs > max_macs


def test_quickstart_budget_traps_the_cheap_designs():
    """The quickstart's budget admits nearly every 32 px design and few 64 px ones (the
    prototype's resolution), as its comments and bench/README.md say: random designs that fit
    are mostly at lower resolutions, which miss the accuracy requirement."""
    space, max_macs = _space("quickstart.yaml")
    assert space.decode(space.prototype_genome()).input_size == 64
    rng = np.random.default_rng(0)
    drawn, fit = collections.Counter(), collections.Counter()
    for _ in range(1500):
        spec = space.decode(space.random_genome(rng))
        drawn[spec.input_size] += 1
        fit[spec.input_size] += count_cost(spec).macs <= max_macs
    assert sorted(drawn) == [32, 48, 64]
    share = {size: fit[size] / drawn[size] for size in drawn}
    assert share[32] > 0.95
    assert 0.7 < share[48] < 0.95
    assert 0.05 < share[64] < 0.25
    assert 0.55 < sum(fit.values()) / sum(drawn.values()) < 0.75
