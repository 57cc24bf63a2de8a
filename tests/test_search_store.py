"""The trial store: crash safety, dead workers, several worker processes, PostgreSQL."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from search_support import PROTOTYPE, fast_tmp, read, run, settings

from covidnet_jax.cost import count_cost
from search.execution.runner import Worker, run_search, run_worker, settle
from search.execution.surrogate import SurrogateEvaluator, surrogate_job
from search.ledger import store
from search.ledger.records import proposal_outcomes

__all__ = ["fast_tmp"]

POSTGRES_URL = os.environ.get("COVIDNET_TEST_POSTGRES_URL")
SPAWN = multiprocessing.get_context("spawn")


def check_accounting(records, max_trials: int) -> None:
    """Every proposal index has exactly one final outcome; nothing is left running."""
    assert not [r.number for r in records if r.state in ("RUNNING", "WAITING")]
    final = [r for r in records if r.status not in ("lost", "cancelled")]
    indices = Counter(int(r.attrs["proposal"]) for r in final)
    assert sorted(indices) == list(range(max_trials))
    assert set(indices.values()) == {1}
    for r in records:
        if r.status == "lost":
            retries = [x for x in records if x.retry_of == r.number]
            assert len(retries) <= 1
    trained = Counter(r.spec_hash for r in records if r.status == "trained")
    assert set(trained.values()) <= {1}, "a spec was trained twice"


def test_repair_journal_trims_a_torn_last_line(fast_tmp):
    workdir = fast_tmp / "torn"
    job = surrogate_job(settings(**{"budget.max_trials": 3}), workdir, prototype=PROTOTYPE)
    run_worker(job, SurrogateEvaluator())
    path = store.journal_path(workdir)
    with open(path, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "user_')  # killed mid-write
    assert store.repair_journal(path)
    assert path.read_bytes().endswith(b"\n")
    assert not store.repair_journal(path)
    records = read(workdir)
    assert len(records) == 3
    # The repaired journal takes new writes: the search resumes.
    job = surrogate_job(settings(**{"budget.max_trials": 5}), workdir, prototype=PROTOTYPE)
    run_worker(job, SurrogateEvaluator())
    assert len(read(workdir)) == 5


GENES = ("s0.depth",)
DEPTH = {"s0.depth": optuna.distributions.IntDistribution(0, 2)}


def _stale(storage, study, trial, worker="another-host:1"):
    trial.set_user_attr("worker", worker)
    storage.set_trial_system_attr(
        store.trial_id(storage, study, trial.number), store.HEARTBEAT_ATTR, time.time() - 100
    )


def test_a_stale_heartbeat_marks_the_trial_lost_and_retries_it(fast_tmp):
    storage = store.open_storage(fast_tmp / "stale")
    study = store.open_study(storage, "stale", "min_macs")
    trial = study.ask(DEPTH)
    trial.set_user_attr("proposal", 0)
    _stale(storage, study, trial)
    fresh = study.ask(DEPTH)
    fresh.set_user_attr("worker", "another-host:2")
    storage.set_trial_system_attr(
        store.trial_id(storage, study, fresh.number), store.HEARTBEAT_ATTR, time.time()
    )

    assert store.recover_lost_trials(study, storage, grace_s=30, max_retries=0, genes=GENES) == [0]
    records = store.read_records(study)
    assert records[0].status == "lost" and records[0].state == "FAIL"
    assert records[1].state == "RUNNING"  # its heartbeat is fresh
    retry = records[2]
    assert retry.state == "WAITING" and retry.retry_of == 0 and retry.origin == 0
    assert retry.attrs["proposal"] == 0 and retry.attrs["losses"] == 1
    assert study.get_trials()[2].system_attrs["fixed_params"] == trial.params
    # A second look finds nothing new.
    assert store.recover_lost_trials(study, storage, grace_s=30, max_retries=0, genes=GENES) == []
    assert len(store.read_records(study)) == 3
    # A lost trial is retried however often it is lost (max_retries counts only its own
    # failures): the retry, asked and lost before drawing a single gene, gets a retry too,
    # complete with the genome Optuna holds as its fixed parameters.
    asked = study.ask()
    assert asked.number == 2
    _stale(storage, study, asked)
    assert store.recover_lost_trials(study, storage, grace_s=30, max_retries=0, genes=GENES) == [2]
    third = store.read_records(study)[-1]
    assert third.retry_of == 2 and third.origin == 0 and third.attrs["losses"] == 2
    assert study.get_trials()[-1].system_attrs["fixed_params"] == trial.params


def test_a_trial_lost_before_its_genome_was_drawn_is_abandoned_not_retried(fast_tmp):
    storage = store.open_storage(fast_tmp / "abandoned")
    study = store.open_study(storage, "abandoned", "min_macs")
    trial = study.ask()  # killed between ask and the end of space.suggest: no genes drawn
    _stale(storage, study, trial)
    assert store.recover_lost_trials(
        study, storage, grace_s=30, max_retries=1, genes=("s0.depth", "s1.depth")
    ) == [0]
    (record,) = store.read_records(study)
    assert record.status == "lost" and record.attrs["abandoned"] and not record.is_proposal


def test_settle_proposes_again_when_an_ask_counted_in_the_budget_is_abandoned(fast_tmp):
    # A worker killed inside `study.ask` leaves a running trial without a genome. Until a
    # recovery finds it abandoned it counts against the budget, so the last worker may stop
    # with "trial budget spent"; the settle after it must then propose the missing one.
    workdir = fast_tmp / "orphan"
    job = surrogate_job(settings(**{"budget.max_trials": 2}), workdir, prototype=PROTOTYPE)
    run_worker(job, SurrogateEvaluator())
    storage = store.open_storage(workdir)
    study = store.load_study(storage, job.study_name)
    orphan = study.ask()  # its worker's heartbeat is fresh: not yet seen as lost
    job = surrogate_job(settings(**{"budget.max_trials": 3}), workdir, prototype=PROTOTYPE)
    assert run_worker(job, SurrogateEvaluator()).stop_reason == "trial budget spent"
    _stale(storage, study, orphan)
    records = settle(job, SurrogateEvaluator())
    assert next(r for r in records if r.number == orphan.number).abandoned
    outcomes = proposal_outcomes(records)
    assert len(outcomes) == 3 and all(o.settled for o in outcomes)
    assert not [r for r in records if r.state in ("RUNNING", "WAITING")]


def test_a_worker_killed_inside_ask_is_known_dead_at_once(fast_tmp):
    # The runner records the trial's worker first thing inside `study.ask`: a kill before the
    # genome is drawn leaves a trial the next recovery marks at once (its process is gone),
    # not one that waits out the heartbeat grace.
    workdir = fast_tmp / "ask"
    child = SPAWN.Process(target=_killed_inside_ask, args=(workdir,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    (record,) = read(workdir)
    assert record.state == "RUNNING" and record.worker == f"{socket.gethostname()}:{child.pid}"
    records, _ = run(fast_tmp, "ask", settings(**{"budget.max_trials": 2}))
    first = next(r for r in records if r.number == 0)
    assert first.abandoned and "its process is gone" in first.attrs["lost"]
    assert len(proposal_outcomes(records)) == 2


def _killed_inside_ask(workdir: Path) -> None:
    job = surrogate_job(settings(**{"budget.max_trials": 2}), workdir, prototype=PROTOTYPE)
    worker = Worker(job, SurrogateEvaluator())
    # what `before_trial` does right after `on_ask`: build the trial's sampler
    worker.sampler._build = lambda number: os.kill(os.getpid(), signal.SIGKILL)
    worker.run()


def test_only_retryable_failures_are_retried_and_only_max_retries_times(fast_tmp):
    storage = store.open_storage(fast_tmp / "failures")
    study = store.open_study(storage, "failures", "min_macs")

    def fail(kind: str, trial=None) -> None:
        trial = trial or study.ask(DEPTH)
        trial.suggest_int("s0.depth", 0, 2)
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("failure_kind", kind)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def recover() -> None:
        store.recover_lost_trials(study, storage, grace_s=30, max_retries=1, genes=GENES)

    fail("nan")  # 0: repeats exactly with the same seed: no retry
    fail("oom")  # 1: may be transient: one retry
    recover()
    records = store.read_records(study)
    assert [r.retry_of for r in records] == [None, None, 1]
    assert records[2].attrs["failures"] == 1 and records[2].attrs["losses"] == 0
    fail("oom", study.ask())  # the retry fails again: max_retries=1 is spent
    recover()
    assert len(store.read_records(study)) == 3


def _start_worker(job):
    process = SPAWN.Process(target=run_worker, args=(job,))
    process.start()
    return process


def _two_workers(
    workdir: Path,
    storage_url: str | None,
    study_name: str,
    max_trials: int,
    **changes: object,
):
    data = settings(
        **{
            "strategy.name": "random",
            "budget.max_trials": max_trials,
            "budget.rungs": [60],
            "heartbeat": {"interval_s": 0.5, "grace_s": 30},
            **changes,
        }
    )
    job = surrogate_job(
        data, workdir, prototype=PROTOTYPE, storage_url=storage_url, seconds_per_step=0.004
    )
    job = type(job)(**{**job.__dict__, "study_name": study_name})
    store.open_study(store.open_storage(workdir, storage_url), study_name, "min_macs")
    processes = [_start_worker(job), _start_worker(job)]
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0
    return read(workdir, storage_url, study_name)


def test_two_worker_processes_share_one_journal(fast_tmp):
    records = _two_workers(fast_tmp / "two", None, "two", 24)
    check_accounting(records, 24)
    workers = {r.attrs["worker"] for r in records if "worker" in r.attrs}
    assert len(workers) == 2, "both workers ran trials"
    assert len({r.number for r in records}) == len(records)


def test_two_shrink_workers_descend_side_by_side_instead_of_duplicating(fast_tmp):
    # The prototype is over the MAC budget, so both workers start with the cost-driven
    # descent; while one trains its step, the other must propose a different one.
    budget = 0.6 * count_cost(PROTOTYPE).macs
    records = _two_workers(
        fast_tmp / "shrink2",
        None,
        "shrink2",
        16,
        **{"strategy.name": "shrink", "requirements.max_macs": budget},
    )
    check_accounting(records, 16)
    duplicates = [r.number for r in records if r.status == "duplicate"]
    assert len(duplicates) <= 2, f"duplicate proposals: {duplicates}"
    assert sum(1 for r in records if r.is_trained) >= 3


def test_a_spec_proposed_while_an_earlier_trial_is_still_unmarked_waits_for_it(fast_tmp):
    # Worker A has asked trial 0 but not yet written its status or spec; worker B proposes
    # the same spec as trial 1. B must wait for trial 0's spec and record a duplicate rather
    # than train the spec a second time (this window once let two workers train one spec).
    job = surrogate_job(settings(), fast_tmp / "unmarked", prototype=PROTOTYPE)
    worker = Worker(job, SurrogateEvaluator())
    first, second = worker.study.ask(), worker.study.ask()

    def mark_first() -> None:
        time.sleep(0.5)
        first.set_user_attr("status", "running")
        first.set_user_attr("spec_hash", "abc")

    marker = threading.Thread(target=mark_first)
    marker.start()
    original = worker._find_original(second.number, "abc", origin=second.number)
    marker.join()
    assert original is not None and original.number == first.number


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="COVIDNET_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)",
)
def test_two_worker_processes_share_one_postgresql_study(fast_tmp):
    name = f"two-{uuid.uuid4().hex[:8]}"
    records = _two_workers(fast_tmp / "pg", POSTGRES_URL, name, 16)
    check_accounting(records, 16)
    assert len({r.attrs["worker"] for r in records if "worker" in r.attrs}) == 2
    assert not store.journal_path(fast_tmp / "pg").exists()


def test_a_search_killed_mid_training_resumes_with_every_trial_accounted_once(fast_tmp):
    workdir = fast_tmp / "killed"
    data = settings(
        **{
            "strategy.name": "evolution",
            "strategy.startup_trials": 2,
            "budget.max_trials": 8,
            "budget.rungs": [100],
            "requirements.max_macs": 1.0e7,
            "heartbeat": {"interval_s": 0.2, "grace_s": 60},
        }
    )
    slow = surrogate_job(data, workdir, prototype=PROTOTYPE, seconds_per_step=0.02)
    process = _start_worker(slow)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if not store.journal_path(workdir).exists():
            continue
        for r in read(workdir):
            marker = workdir / "trials" / str(r.number) / "checkpoint" / "step"
            running = r.number >= 2 and r.state == "RUNNING" and marker.exists()
            if running and int(marker.read_text()) >= 20:
                victim = r
    assert victim is not None, "the worker never got to a third trial"
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    assert read(workdir)[victim.number].state == "RUNNING"

    # The same command again: the dead worker's pid is gone, so its trial is lost at once.
    evaluator = SurrogateEvaluator()
    run_worker(surrogate_job(data, workdir, prototype=PROTOTYPE), evaluator)
    records = read(workdir)
    check_accounting(records, 8)
    lost = [r for r in records if r.status == "lost"]
    assert [r.number for r in lost] == [victim.number]
    assert socket.gethostname() in lost[0].attrs["reason"]
    (retry,) = [r for r in records if r.retry_of == victim.number]
    assert retry.status == "trained" and retry.spec_hash == victim.spec_hash
    # The retry continued from the killed trial's last checkpoint, not from step 0.
    starts = [start for spec_hash, start, _, _ in evaluator.jobs if spec_hash == victim.spec_hash]
    assert starts and starts[0] >= 20


def _search_with_two_workers(job) -> None:
    run_search(job, workers=2)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states in /proc")
def test_worker_processes_end_when_the_search_process_is_killed(fast_tmp):
    """`kill -9` of the search command ends its workers too; they would otherwise go on
    training (holding cores or a GPU) beside the workers of the resumed search."""
    workdir = fast_tmp / "orphans"
    data = settings(
        **{
            "strategy.name": "random",
            "budget.max_trials": 400,
            "budget.rungs": [100],
            "requirements.max_macs": 1.0e7,
        }
    )
    job = surrogate_job(data, workdir, prototype=PROTOTYPE, seconds_per_step=0.02)
    parent = SPAWN.Process(target=_search_with_two_workers, args=(job,))
    parent.start()
    workers: set[str] = set()
    deadline = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        if store.journal_path(workdir).exists():
            workers = {r.attrs["worker"] for r in read(workdir) if "worker" in r.attrs}
    pids = [int(worker.rsplit(":", 1)[1]) for worker in workers]
    try:
        assert len(pids) == 2, "the search never had two workers training"
        assert parent.pid not in pids
        os.kill(parent.pid, signal.SIGKILL)
        parent.join()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _running(pid)], "workers outlived the search"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
