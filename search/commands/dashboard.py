"""`covidnet dashboard`: optuna-dashboard on a search's trial store, showing it as it is.

    covidnet dashboard --workdir runs/quickstart            # http://127.0.0.1:8080/
    covidnet dashboard --workdir runs/big --storage postgresql+psycopg2://user@host/db

Open the printed address in a browser; Ctrl-C stops the server. It binds to 127.0.0.1 only:
from another machine, forward the port (`ssh -L 8080:127.0.0.1:8080 HOST`). It reads the
store while a search runs (the page refreshes itself), so it can watch one live.

What it shows, beyond optuna-dashboard on the raw store:
- feasibility: each trial's requirement violations as the dashboard's constraints (Optuna 5
  stores them under names the dashboard does not read); the best trial of a single-objective
  search is its best feasible one, as `study.best_trial` says;
- the design: parameters as widths ("proj1/expand/proj2" channels per module, output
  channels per stage), kernel sizes, connectivity and head names, "unused" for modules
  beyond a stage's depth, instead of the choice indices the samplers work on;
- each rung's objective value as an intermediate value (single-objective searches), and the
  spec's one-line `summary` among the user attributes.
The view is read-only: the page cannot change the search (notes, deleting a study and
telling trials are refused), and the store's parameters stay the indices.

Needs the `dashboard` extra: pip install 'covidnet-jax[dashboard]'.
"""

from __future__ import annotations

import argparse
import copy
import socketserver
import typing
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.distributions import CategoricalDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from covidnet_jax.errors import UserError
from search.config import Objective
from search.execution.identity import resolve_study_name
from search.ledger import store
from search.ledger.objective import directions
from search.ledger.records import DESIGN_PREFIX, TrialRecord, gene_choices

HOST = "127.0.0.1"
INSTALL_HINT = "pip install 'covidnet-jax[dashboard]'"
READ_ONLY = "covidnet dashboard is read-only: the search's workers alone write its trial store"
# What optuna-dashboard reads (optuna_dashboard._serializer, _named_objectives).
_DASHBOARD_CONSTRAINTS = "constraints"
_OBJECTIVE_NAMES = "study:metric_names"
_OBJECTIVE_LABELS: dict[str, list[str]] = {
    "min_macs": ["MACs"],
    "max_netscore": ["NetScore"],
    "pareto": ["validation accuracy", "MACs"],
}


class DashboardError(UserError):
    """The dashboard cannot start (no optuna-dashboard, no search, port in use)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `dashboard` subcommand."""
    parser = subparsers.add_parser(
        "dashboard",
        help="optuna-dashboard on a search (feasibility, readable designs); Ctrl-C stops it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, metavar="DIR", help="a search workdir")
    parser.add_argument(
        "--port",
        type=int,
        default=8080,
        metavar="N",
        help="port on 127.0.0.1 (default 8080; 0 picks a free one)",
    )
    parser.add_argument(
        "--storage", metavar="URL", help="trial store URL of a search that did not use a journal"
    )
    parser.set_defaults(func=_run_dashboard)


def _run_dashboard(args: argparse.Namespace) -> int:
    server, url = serve(args.workdir, port=args.port, storage_url=args.storage)
    print(f"optuna-dashboard on {url} (serving {args.workdir}; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a browser page polls the API every few seconds."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    # A page loads several API routes at once; a slow one (importances) must not block them.
    daemon_threads = True


def serve(
    workdir: str | Path, *, port: int = 8080, storage_url: str | None = None
) -> tuple[WSGIServer, str]:
    """A WSGI server of optuna-dashboard on the search in `workdir`, bound to 127.0.0.1.

    The caller runs it (`serve_forever`, in a thread for tests) and closes it
    (`shutdown`, `server_close`).

    Args:
        workdir: the search's working directory.
        port: the port (0: a free one).
        storage_url: the search's database URL when it did not use the workdir's journal.

    Returns:
        The server, and the address of the workdir's search's page.

    Raises:
        DashboardError: optuna-dashboard is missing, the folder holds no search, or the port
            cannot be bound.
    """
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError(f"optuna-dashboard is not installed: {INSTALL_HINT}") from None
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise DashboardError(f"--workdir {workdir}: no such folder")
    if storage_url is None and not store.journal_path(workdir).is_file():
        raise DashboardError(
            f"--workdir {workdir}: not a search workdir (no {store.JOURNAL_NAME}); run "
            f"`covidnet search --config FILE --workdir {workdir}` first, or pass --storage URL"
        )
    inner = store.open_storage(workdir, storage_url)
    view = DashboardStorage(inner)
    # The workdir's own study (a shared database holds other searches' too).
    name = resolve_study_name(workdir, "", None if storage_url else inner)
    names = [s.study_name for s in view.get_all_studies()]
    if name not in names:
        held = ", ".join(sorted(names)) or "none"
        raise DashboardError(
            f"--workdir {workdir}: its search {name!r} is not in the trial store (it holds: "
            f"{held}); run the search first, or pass the --storage URL it used"
        )
    app = optuna_dashboard.wsgi(view)
    try:
        server = make_server(
            HOST, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as err:
        raise DashboardError(
            f"--port {port}: cannot listen on {HOST} ({err.strerror}); choose another port"
        ) from None
    bound = server.server_address[1]
    return server, f"http://{HOST}:{bound}/dashboard/studies/{inner.get_study_id_from_name(name)}"


class DashboardStorage(BaseStorage):
    """A search's storage as optuna-dashboard should show it, read-only.

    Reads of trials add the dashboard's form of the constraints (a list under the system
    attribute "constraints", which optuna-dashboard 0.21 reads) beside Optuna 5's named form,
    and replace each gene's index by its readable value (`design.<gene>` user attributes)
    with a categorical distribution over the study's readable choices
    (`search.ledger.records.gene_choices`). Storing the list form itself is no option: Optuna
    reads both forms into `trial.constraints`, so every violation would count twice for
    TPE's and NSGA-II's ranking of infeasible trials. Finisher leases are hidden; writes
    (notes, deleting a study, telling a trial from the page) are refused.

    Args:
        inner: the search's storage (`store.open_storage`).
    """

    def __init__(self, inner: BaseStorage) -> None:
        self._inner = inner

    # Reads shown differently ---------------------------------------------------------------

    def get_all_studies(self) -> list:
        shown = []
        for study in self._inner.get_all_studies():
            if study.study_name.endswith(store.LEASE_SUFFIX):
                continue
            study = copy.copy(study)
            study.system_attrs = _named(study.system_attrs, study.directions)
            shown.append(study)
        return shown

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        attrs = self._inner.get_study_system_attrs(study_id)
        return _named(attrs, self._inner.get_study_directions(study_id))

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        readable = _readable(self._inner.get_study_system_attrs(study_id))
        trials = self._inner.get_all_trials(study_id, deepcopy=False, states=states)
        return [_shown(trial, readable) for trial in trials]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        # No study id here to find the readable choices: constraints only.
        return _shown(self._inner.get_trial(trial_id), {})

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        best = self._inner.get_best_trial(study_id)
        if all(v <= 0.0 for v in best.constraints.values()):
            return _shown(best, _readable(self._inner.get_study_system_attrs(study_id)))
        feasible = [
            t
            for t in self.get_all_trials(study_id, states=(TrialState.COMPLETE,))
            if all(v <= 0.0 for v in t.constraints.values())
        ]
        if not feasible:
            # No feasible design yet: the best infeasible one.
            return _shown(best, _readable(self._inner.get_study_system_attrs(study_id)))
        (direction,) = self._inner.get_study_directions(study_id)
        pick = max if direction == StudyDirection.MAXIMIZE else min
        return pick(feasible, key=lambda t: t.value)

    # Reads that pass through ---------------------------------------------------------------

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(study_id)

    def remove_session(self) -> None:
        self._inner.remove_session()

    # Writes are refused --------------------------------------------------------------------

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        """The trial store is the search's ledger, written by its workers only: a study
        deleted, a trial told or an attribute set from the page would break its records."""
        from bottle import HTTPError  # optuna-dashboard's web framework: the page shows why

        raise HTTPError(403, READ_ONLY)

    create_new_study = delete_study = set_study_user_attr = set_study_system_attr = _refuse
    create_new_trial = set_trial_param = set_trial_state_values = _refuse
    set_trial_intermediate_value = set_trial_user_attr = set_trial_system_attr = _refuse


def _named(system_attrs: dict[str, Any], study_directions: Sequence[StudyDirection]) -> dict:
    """A study's system attributes with the names of its objective values (known from its
    directions: each objective has its own, `search.ledger.objective.directions`)."""
    if _OBJECTIVE_NAMES in system_attrs:
        return system_attrs
    for objective in typing.get_args(Objective):
        if directions(objective) == list(study_directions):
            return {**system_attrs, _OBJECTIVE_NAMES: list(_OBJECTIVE_LABELS[objective])}
    return system_attrs


def _readable(study_system_attrs: dict[str, Any]) -> dict[str, CategoricalDistribution]:
    """Gene -> the categorical distribution of its readable choices (empty for a study
    recorded before they were stored: its parameters then show as indices)."""
    return {
        gene: CategoricalDistribution(values)
        for gene, values in gene_choices(study_system_attrs).items()
    }


def _shown(trial: FrozenTrial, readable: dict[str, CategoricalDistribution]) -> FrozenTrial:
    """`trial` with the dashboard's constraints and, for genes in `readable`, readable
    parameters (a copy; the storage's own objects are never changed)."""
    shown = copy.copy(trial)
    system_attrs = dict(trial.system_attrs)
    named = trial.constraints
    if named and _DASHBOARD_CONSTRAINTS not in system_attrs:
        system_attrs[_DASHBOARD_CONSTRAINTS] = list(named.values())
    shown.system_attrs = system_attrs
    design = TrialRecord.from_trial(trial).design
    params = dict(trial.params)
    distributions = dict(trial.distributions)
    user_attrs = dict(trial.user_attrs)
    for gene, value in design.items():
        distribution = readable.get(gene)
        if gene in params and distribution is not None and value in distribution.choices:
            params[gene] = value
            distributions[gene] = distribution
            user_attrs.pop(f"{DESIGN_PREFIX}{gene}", None)  # it is the parameter now
    shown.params, shown.distributions, shown.user_attrs = params, distributions, user_attrs
    return shown
