"""`covidnet dashboard`: optuna-dashboard on a search shows feasibility and readable designs.

A tiny surrogate search is served on a free port of 127.0.0.1 and read through the
dashboard's own HTTP API (the routes its web page calls), without any network beyond loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from search import cli
from search.commands.dashboard import INSTALL_HINT, DashboardError, DashboardStorage, serve
from search.execution.runner import run_worker
from search.execution.surrogate import SurrogateEvaluator, surrogate_job
from search.ledger import store
from tests.search_support import PROTOTYPE, run, settings

POSTGRES_URL = os.environ.get("COVIDNET_TEST_POSTGRES_URL")

SEARCH = settings(
    **{
        "budget.max_trials": 8,
        "objective": "min_macs",
        # Loose enough that some designs meet every requirement, tight enough that others
        # exceed the MACs limit.
        "requirements.max_macs": 5e6,
        "requirements.min_accuracy": 0.5,
        "requirements.classes": {},
    }
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dashboard")
    records, _ = run(root, "dash", SEARCH)
    statuses = {(r.status, r.feasible) for r in records}
    assert ("trained", True) in statuses and ("infeasible", False) in statuses, statuses
    return root / "dash"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def served(workdir: Path, storage_url: str | None = None) -> Iterator[tuple[str, str]]:
    """`covidnet dashboard`'s server on a free port, in a thread: (base URL, study id)."""
    server, url = serve(workdir, port=0, storage_url=storage_url)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base, study_id = url.split("/dashboard/studies/")
        yield base, study_id
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def study_detail(workdir: Path) -> dict:
    with served(workdir) as (base, study_id):
        studies = _get(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]  # no finisher lease
        assert study_id == str(studies[0]["study_id"])
        return _get(f"{base}/api/studies/{study_id}")


def test_the_page_cannot_change_the_search(workdir: Path) -> None:
    before = store.journal_path(workdir).read_bytes()
    with served(workdir) as (base, study_id):
        for method, route, body in (
            ("DELETE", f"/api/studies/{study_id}", None),
            ("POST", "/api/trials/0/user-attrs", {"user_attrs": {"status": "trained"}}),
        ):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(
                base + route, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 403, route
            assert "read-only" in json.loads(refused.value.read())["reason"]
    assert store.journal_path(workdir).read_bytes() == before


def _attrs(trial: dict) -> dict:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


def test_feasible_and_infeasible_trials_are_told_apart(study_detail: dict) -> None:
    finished = [t for t in study_detail["trials"] if t["state"] in ("Complete", "Pruned")]
    feasible = [t for t in finished if _attrs(t)["feasible"] == "True"]
    infeasible = [t for t in finished if _attrs(t)["feasible"] == "False"]
    assert feasible and infeasible
    for trial in finished:
        assert trial["constraints"], trial["number"]  # optuna-dashboard reads this list
    assert all(all(v <= 0 for v in t["constraints"]) for t in feasible)
    assert all(any(v > 0 for v in t["constraints"]) for t in infeasible)
    # The single best trial the dashboard shows is a feasible one.
    assert [_attrs(t)["feasible"] for t in study_detail["best_trials"]] == ["True"]
    assert study_detail["objective_names"] == ["MACs"]


def test_parameters_are_the_designs_values(study_detail: dict) -> None:
    trial = next(t for t in study_detail["trials"] if t["state"] == "Complete")
    params = {p["name"]: p for p in trial["params"]}
    assert params["connectivity"]["param_external_value"] in ("dense", "residual")
    assert params["s0.kernel"]["param_external_value"] in ("3", "5")
    assert params["s0.depth"]["param_external_value"] in ("1", "2", "3")
    assert int(params["s1.width"]["param_external_value"]) >= 8  # channels, not an index
    width = params["s0.m0.width"]
    assert re.fullmatch(r"\d+/\d+/\d+", width["param_external_value"])
    assert width["distribution"]["type"] == "CategoricalDistribution"
    choices = [c["value"] for c in width["distribution"]["choices"]]
    assert all(re.fullmatch(r"\d+/\d+/\d+", c) for c in choices)
    # A module beyond its stage's depth says so, and every trial's module genes are shown.
    values = {
        p["param_external_value"]
        for t in study_detail["trials"]
        for p in t["params"]
        if p["name"] == "s0.m2.width"
    }
    assert "unused" in values
    # The readable design is the parameters; the spec's summary is an attribute.
    attrs = _attrs(trial)
    assert not any(key.startswith("design.") for key in attrs)
    assert attrs["summary"].startswith("pepx 64px")
    names = {s["name"] for s in study_detail["union_search_space"]}
    assert {"connectivity", "s0.m0.width", "s1.kernel"} <= names


def test_each_rung_is_an_intermediate_value(study_detail: dict) -> None:
    assert study_detail["has_intermediate_values"]
    trained = [t for t in study_detail["trials"] if _attrs(t)["status"] == "trained"]
    assert trained
    for trial in trained:
        steps = [v["step"] for v in trial["intermediate_values"]]
        assert steps and set(steps) <= {100, 300}, steps


def test_the_store_keeps_the_indices(workdir: Path) -> None:
    storage = store.open_storage(workdir)
    (trial, *_) = store.load_study(storage, "dash").get_trials()
    assert all(isinstance(v, int) for v in trial.params.values())
    assert "constraints" not in trial.system_attrs  # only Optuna's named form is stored
    assert trial.constraints and all(not k.isdigit() for k in trial.constraints)


def test_raw_optuna_dashboard_loses_feasibility_and_designs(workdir: Path) -> None:
    """What the view is for: optuna-dashboard on the raw store (measured on 0.21)."""
    from optuna_dashboard._serializer import serialize_frozen_trial

    storage = store.open_storage(workdir)
    trial = store.load_study(storage, "dash").get_trials()[0]
    raw = serialize_frozen_trial(0, trial, {})
    assert raw["constraints"] == []
    assert all(re.fullmatch(r"\d+", p["param_external_value"]) for p in raw["params"])


def test_best_trial_is_the_best_feasible_one() -> None:
    study = optuna.create_study(direction="minimize")
    for value, violation in ((1.0, 0.5), (2.0, 0.0), (3.0, 0.0)):
        trial = study.ask()
        trial.set_constraint("macs", violation)
        study.tell(trial, value)
    view = DashboardStorage(study._storage)
    assert study._storage.get_best_trial(study._study_id).value == 1.0
    assert view.get_best_trial(study._study_id).value == 2.0
    assert view.get_best_trial(study._study_id).system_attrs["constraints"] == [0.0]


def test_help_says_what_it_shows_and_how_to_stop(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--help"])
    text = capsys.readouterr().out
    for needle in ("127.0.0.1", "Ctrl-C", "feasib", "--port", "--workdir", INSTALL_HINT):
        assert needle in text, needle


def test_bad_workdir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["dashboard", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a search workdir" in err
    assert not store.journal_path(tmp_path).exists()  # nothing created


def test_missing_optuna_dashboard_names_the_extra(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails
    with pytest.raises(DashboardError, match=re.escape(INSTALL_HINT)):
        serve(workdir, port=0)


def test_port_in_use_is_one_line(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DashboardError, match=f"--port {port}: cannot listen"):
            serve(workdir, port=port)


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="COVIDNET_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)",
)
def test_a_search_in_postgresql_is_served_from_its_workdir(tmp_path: Path) -> None:
    # The database holds other tests' searches too: the page is the workdir's own study.
    workdir = tmp_path / f"pg-{uuid.uuid4().hex[:8]}"
    job = surrogate_job(
        {**SEARCH, "budget": {**SEARCH["budget"], "max_trials": 3}},
        workdir,
        prototype=PROTOTYPE,
        storage_url=POSTGRES_URL,
    )
    run_worker(job, SurrogateEvaluator())
    with served(workdir, POSTGRES_URL) as (base, study_id):
        detail = _get(f"{base}/api/studies/{study_id}")
    assert detail["name"] == workdir.name
    assert len(detail["trials"]) == 3 and all(t["constraints"] for t in detail["trials"])
    other = tmp_path / "not-searched"
    other.mkdir()
    with pytest.raises(DashboardError, match="its search 'not-searched' is not in the trial"):
        serve(other, port=0, storage_url=POSTGRES_URL)
