"""The design-exploration loop: space, requirements, strategies, fidelity, trial store.

The Python API, in one namespace:

- `search.run(experiment, workdir)` runs or resumes a search and returns a `SearchResult`
  (`covidnet search` prints what it returns);
- `search.load_experiment(path, overrides)` reads an experiment file into a
  `search.SearchExperiment`, which can also be built from the dataclasses of
  `covidnet_jax.config` and `search.config` without any file;
- `search.register_strategy(name, factory)` adds a strategy the experiment can name.

They are imported on first use, so that `import search.<module>` (every worker process does)
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.execution.session import SearchResult, run
    from search.execution.training import SearchExperiment, load_experiment
    from search.strategies.context import StrategyContext
    from search.strategies.registry import register_strategy

__all__ = [
    "SearchExperiment",
    "SearchResult",
    "StrategyContext",
    "load_experiment",
    "register_strategy",
    "run",
]

_HOMES = {
    "SearchResult": "search.execution.session",
    "run": "search.execution.session",
    "SearchExperiment": "search.execution.training",
    "load_experiment": "search.execution.training",
    "StrategyContext": "search.strategies.context",
    "register_strategy": "search.strategies.registry",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
