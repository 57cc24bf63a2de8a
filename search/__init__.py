"""The design-exploration loop: space, requirements, strategies, fidelity, trial store.

The Python entry point is `search.run(experiment_file, workdir)` (`search.execution.session`), which
returns a `SearchResult`; `covidnet search` prints what it returns. They are imported on
first use, so that `import search.<module>` (every worker process does) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.execution.session import SearchResult, run
    from search.execution.training import load_experiment

__all__ = ["SearchResult", "load_experiment", "run"]


def __getattr__(name: str) -> Any:
    if name in ("SearchResult", "run"):
        from search.execution import session

        return getattr(session, name)
    if name == "load_experiment":
        from search.execution.training import load_experiment

        return load_experiment
    raise AttributeError(f"module 'search' has no attribute {name!r}")
