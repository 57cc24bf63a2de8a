"""Resuming and sharing a search: workdir identity, one finisher, a damaged trial store."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
import uuid

import optuna
import pytest
import yaml
from search_support import PROTOTYPE, fast_tmp, read, settings
from test_search_cli import write_experiment

from covidnet_jax.errors import ConfigError, StoreError
from search.cli import main
from search.execution import identity
from search.execution.runner import run_search
from search.execution.session import conclude
from search.execution.surrogate import surrogate_job
from search.ledger import store
from search.ledger.records import proposal_outcomes

__all__ = ["fast_tmp"]  # a fixture

SPAWN = multiprocessing.get_context("spawn")
POSTGRES_URL = os.environ.get("COVIDNET_TEST_POSTGRES_URL")


# One finisher ---------------------------------------------------------------------------------


def test_the_finisher_lease_is_held_once_and_expires_with_its_holder(fast_tmp):
    storage = store.open_storage(fast_tmp / "lease")
    first = store.FinisherLease(storage, "s", grace_s=30, interval_s=0.1)
    second = store.FinisherLease(storage, "s", grace_s=30, interval_s=0.1)
    assert first.try_acquire() and not second.try_acquire()
    holder = second.holder()
    assert holder is not None and holder.worker == store.worker_id()
    time.sleep(0.3)
    assert second.holder().heartbeat > holder.heartbeat, "the holder beats"
    assert store.search_study_names(storage) == [], "a lease is not a search"
    first.release()
    assert second.holder() is None and second.try_acquire()
    second.release()

    # A holder whose process is gone (killed while finishing) loses the lease at once.
    dead = SPAWN.Process(target=_take_lease_and_hang, args=(str(fast_tmp / "lease"),))
    dead.start()
    deadline = time.monotonic() + 60
    while first.holder() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    dead.kill()
    dead.join()
    assert first.try_acquire(), "the dead holder's lease expired"
    first.release()


def _take_lease_and_hang(workdir: str) -> None:
    lease = store.FinisherLease(store.open_storage(workdir), "s", grace_s=30, interval_s=0.1)
    assert lease.try_acquire()
    time.sleep(600)


def _search_and_conclude(workdir: str, test_log: str) -> None:
    data = settings(
        **{
            "strategy.name": "random",
            "budget.max_trials": 8,
            "budget.rungs": [300],
            "requirements": {"min_accuracy": 0.3, "decision": "point"},
            "confirm": {"seeds": 1, "max_candidates": 2},
            "heartbeat": {"interval_s": 0.3, "grace_s": 30},
        }
    )
    job = surrogate_job(
        data, workdir, prototype=PROTOTYPE, seconds_per_step=0.001, test_log=test_log
    )
    run_search(job, workers=1)
    records, best, _, _ = conclude(job, train_seed=0)
    assert best.summary is not None, best.message
    assert not [r for r in records if r.state in ("RUNNING", "WAITING")]


def test_two_searches_on_one_workdir_end_with_one_finisher(fast_tmp):
    workdir, test_log = fast_tmp / "two", fast_tmp / "tests.log"
    # Created first, as `covidnet search` does before its workers start.
    store.open_study(store.open_storage(workdir), "two", "min_macs")
    processes = [
        SPAWN.Process(target=_search_and_conclude, args=(str(workdir), str(test_log)))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    assert [p.exitcode for p in processes] == [0, 0]
    # Both trained trials; one confirmed and scored the test split, the other waited for it
    # and reused its runs.
    assert len(test_log.read_text().splitlines()) == 1
    records = read(workdir)
    assert len({r.attrs["worker"] for r in records if "worker" in r.attrs}) == 2
    assert all(o.settled and o.trained <= 1 for o in proposal_outcomes(records))
    assert (workdir / "best" / "metrics.json").exists()


# Workdir identity -----------------------------------------------------------------------------


def _one_trial(workdir, name):
    study = store.open_study(store.open_storage(workdir), name, "min_macs")
    trial = study.ask()
    trial.set_user_attr("status", "failed")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def test_a_resume_with_a_changed_space_is_refused_before_anything_is_written(tmp_path, capsys):
    path = write_experiment(tmp_path)
    workdir = tmp_path / "run"
    quick = ["--set", "search.budget.max_wall_time_s=0.001", "--no-live"]
    args = ["search", "--config", str(path), "--workdir", str(workdir), *quick]
    assert main(args) == 0  # a search that proposed nothing (no time): study and config
    _one_trial(workdir, "run")
    before = (workdir / "config.yaml").read_bytes()
    journal = store.journal_path(workdir).read_bytes()
    capsys.readouterr()

    changed = [*args, "--set", "search.space.kernel_sizes=[3]", "--set", "data.resolution=48"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "search.space.kernel_sizes: [] -> [3]" in err and "data.resolution: 32 -> 48" in err
    assert "--set data.resolution=32" in err and "another --workdir" in err
    assert (workdir / "config.yaml").read_bytes() == before
    assert store.journal_path(workdir).read_bytes() == journal

    # The budget may change on resume.
    assert main([*args, "--set", "search.budget.max_trials=9"]) == 0
    recorded = yaml.safe_load((workdir / "config.yaml").read_text())
    assert recorded["search"]["budget"]["max_trials"] == 9
    assert recorded["search"]["study_name"] == "run"


def test_a_renamed_workdir_resumes_its_own_study(fast_tmp):
    old = fast_tmp / "old"
    _one_trial(old, "old")
    new = fast_tmp / "renamed"
    shutil.move(old, new)
    journal = store.open_storage(new)
    assert identity.resolve_study_name(new, "", journal) == "old"
    assert identity.resolve_study_name(new, "explicit", journal) == "explicit"
    (new / "config.yaml").write_text(yaml.safe_dump({"search": {"study_name": "recorded"}}))
    assert identity.resolve_study_name(new, "", journal) == "recorded"
    # A shared database holds other searches' studies: the workdir's name, not a guess.
    (new / "config.yaml").unlink()
    assert identity.resolve_study_name(new, "", None) == "renamed"


def test_an_edited_prototype_file_is_a_changed_search(fast_tmp):
    workdir = fast_tmp / "proto"
    _one_trial(workdir, "proto")
    storage = store.open_storage(workdir)
    study = store.load_study(storage, "proto")
    resolved = {"search": {"space": {"prototype": "p.json"}}}
    study.set_user_attr(identity.IDENTITY_ATTR, identity.identity_of(resolved, "aaaa"))
    identity.check_resume(workdir, storage, "proto", identity.identity_of(resolved, "aaaa"))
    with pytest.raises(ConfigError, match=r"prototype \(content hash\): aaaa -> bbbb"):
        identity.check_resume(workdir, storage, "proto", identity.identity_of(resolved, "bbbb"))
    # A setting added by a newer version (only one side has it) is not a change.
    newer = identity.identity_of({**resolved, "data": {"new_key": 1}}, "aaaa")
    identity.check_resume(workdir, storage, "proto", newer)


def test_identity_compares_only_what_defines_the_trials():
    base = {"data": {"resolution": 32}, "search": {"budget": {"max_trials": 5}, "seed": 0}}
    assert identity.identity_of(base) == {"data.resolution": 32, "search.seed": 0}
    assert "search.confirm.seeds" not in identity.identity_of({"search": {"confirm": {"seeds": 2}}})


def test_the_wall_time_budget_is_the_searchs_over_all_invocations(fast_tmp):
    study = store.open_study(store.open_storage(fast_tmp / "wall"), "wall", "min_macs")
    with store.wall_clock(study, interval_s=0.05):
        time.sleep(0.3)
    first = store.wall_time_spent(study)
    assert 0.25 < first < 1.0
    # A killed invocation counts up to its last refresh; overlapping ones count once.
    study.set_user_attr("wall:other:1", [100.0, 110.0])
    study.set_user_attr("wall:other:2", [105.0, 120.0])
    study.set_user_attr("wall:other:3", [130.0, 131.0])
    assert store.wall_time_spent(study) == pytest.approx(first + 21.0)


# A damaged trial store ------------------------------------------------------------------------


def test_a_damaged_journal_line_is_named_and_a_damaged_last_line_is_cut(fast_tmp):
    workdir = fast_tmp / "damaged"
    _one_trial(workdir, "damaged")
    path = store.journal_path(workdir)
    good = path.read_bytes()
    lines = good.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1]) + b"\xff\xfe garbage\n" + b"".join(lines[1:]))
    with pytest.raises(StoreError, match=r"study\.journal line 2: not an Optuna journal entry"):
        store.open_storage(workdir)
    assert path.read_bytes() != good, "damage before the last line is reported, not cut"

    path.write_bytes(good + b"not json at all\n")
    store.open_storage(workdir)
    assert path.read_bytes() == good
    assert path.with_name("study.journal.torn").read_bytes() == b"not json at all\n"
    assert len(read(workdir, name="damaged")) == 1


def test_a_damaged_journal_is_a_one_line_error_of_the_search_command(tmp_path, capsys):
    path = write_experiment(tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    store.journal_path(workdir).write_bytes(b'{"op_code": 0}\n\x00\x01\x02\n{"op_code": 1}\n')
    assert main(["search", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "study.journal line 2" in err, err


# PostgreSQL first start -------------------------------------------------------------------------


def _create_at(url: str, name: str, at: float) -> None:
    time.sleep(max(0.0, at - time.time()))
    storage = store.open_storage("/nonexistent-unused", url)
    store.open_study(storage, name, "min_macs")


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="COVIDNET_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)",
)
def test_processes_creating_one_study_in_an_empty_database_at_once_all_succeed():
    import sqlalchemy

    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    for _ in range(3):
        database = f"race_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
        url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{database}"
        at = time.time() + 4.0
        processes = [SPAWN.Process(target=_create_at, args=(url, "raced", at)) for _ in range(3)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [p.exitcode for p in processes] == [0, 0, 0]
        assert store.search_study_names(store.open_storage("/unused", url)) == ["raced"]
