"""The trial store: one Optuna study per search, in a journal file or a PostgreSQL database.

Default storage is Optuna's `JournalStorage` with a `JournalFileBackend` at
`<workdir>/study.journal`: an append-only log of operations, one JSON line each, written under
a lock and fsynced, so several local worker processes share it safely. A process killed while
appending can leave a torn last line; `repair_journal` trims it (under the lock) before the
journal is opened, so a kill never corrupts the store. `--storage postgresql+psycopg2://...`
uses `RDBStorage` instead, so workers on several machines share one search.

Dead workers: every running trial records a heartbeat (system attribute `search:heartbeat`,
epoch seconds) from a background thread. `recover_lost_trials` marks a running trial whose
heartbeat is older than the grace period, or whose worker process on this host no longer
exists, as lost (state FAIL, status "lost") and enqueues a retry with the same parameters that
continues from the completed rungs. Optuna's own heartbeat (RDB only in Optuna 5) is not used,
so the journal and the database behave the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.trial import TrialState

from covidnet_jax.errors import ConfigError
from search.config import Objective
from search.objective import directions
from search.records import TrialRecord

JOURNAL_NAME = "study.journal"
HEARTBEAT_ATTR = "search:heartbeat"
_LOCK_GRACE_S = 10


def worker_id() -> str:
    """`host:pid` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def journal_path(workdir: str | Path) -> Path:
    """Where the default journal storage of a search lives."""
    return Path(workdir) / JOURNAL_NAME


def repair_journal(path: Path) -> bool:
    """Trims a torn last line (a writer killed mid-append) from a journal file.

    Args:
        path: the journal file.

    Returns:
        True when something was trimmed.
    """
    if not path.exists() or path.stat().st_size == 0:
        return False
    lock = JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE_S)
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return False
            # Find the end of the last complete line.
            block, end = 1 << 16, size
            keep = 0
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start)
                index = chunk.rfind(b"\n")
                if index >= 0:
                    keep = start + index + 1
                    break
                end = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return True
    finally:
        lock.release()


def open_storage(workdir: str | Path, url: str | None = None) -> BaseStorage:
    """The search's storage: the workdir's journal file, or the database at `url`.

    Args:
        workdir: the search's working directory (created if missing).
        url: an SQLAlchemy URL (e.g. `postgresql+psycopg2://user@host:5432/db`), or None.

    Raises:
        ConfigError: if the database cannot be reached or the URL is malformed.
    """
    if url:
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as err:  # SQLAlchemy raises many types; all mean "cannot use it"
            raise ConfigError(f"--storage {url}: cannot open the database ({err})") from None
    path = journal_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_journal(path)
    lock = JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE_S)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def open_study(
    storage: BaseStorage,
    name: str,
    objective: Objective,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Creates or loads the search's study.

    Raises:
        ConfigError: if a study of that name exists with other directions (another
            objective).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions(objective),
        sampler=sampler,
        load_if_exists=True,
    )
    if study.directions != directions(objective):
        raise ConfigError(
            f"study {name!r} exists with directions {[d.name for d in study.directions]}; "
            f"objective {objective!r} needs {[d.name for d in directions(objective)]}"
            " (use another workdir or study name)"
        )
    return study


def load_study(storage: BaseStorage, name: str) -> optuna.Study:
    """An existing study, for reading (any objective).

    Raises:
        ConfigError: if there is no study of that name.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"no search named {name!r} in this trial store") from None


def read_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial's record, in trial-number order."""
    return [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False)]


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial_id: int, interval_s: float) -> Iterator[None]:
    """Records a heartbeat for `trial_id` every `interval_s` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except (UpdateFinishedTrialError, RuntimeError):
                return  # the trial ended (or was declared lost by another worker)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _worker_is_dead(worker: str | None) -> bool:
    """True when `worker` ran on this host and its process no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def trial_id(storage: BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of trial `number` of `study` (through Optuna's public storage API;
    `optuna.Trial` keeps its id private)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def recover_lost_trials(
    study: optuna.Study, storage: BaseStorage, *, grace_s: float, max_retries: int
) -> list[int]:
    """Marks running trials whose worker died as lost and enqueues their retries.

    A running trial is lost when its last heartbeat (or, before the first, its start) is
    older than `grace_s`, or its worker process on this host is gone. Of several workers
    that notice the same lost trial, only the one whose state change lands first enqueues
    the retry.

    Args:
        study: the search's study.
        storage: the storage it lives in.
        grace_s: heartbeat age after which a worker is presumed dead.
        max_retries: retries per original trial (counting along the retry chain).

    Returns:
        Numbers of the trials marked lost by this call.
    """
    now = time.time()
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT_ATTR)
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        stale = beat is not None and now - float(beat) > grace_s
        if not (stale or _worker_is_dead(trial.user_attrs.get("worker"))):
            continue
        record = TrialRecord.from_trial(trial)
        reason = f"worker {trial.user_attrs.get('worker', '?')} stopped (no heartbeat)"
        try:
            tid = trial_id(storage, study, trial.number)
            storage.set_trial_user_attr(tid, "status", "lost")
            storage.set_trial_user_attr(tid, "reason", reason)
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker got there first, or the trial just ended
        lost.append(trial.number)
        chain = int(record.attrs.get("retries", 0)) + 1
        if chain > max_retries or not trial.params:
            continue
        carried = {
            k: v
            for k, v in record.attrs.items()
            if k.startswith("rung.") or k in ("parent", "operator", "proposal")
        }
        study.enqueue_trial(
            dict(trial.params),
            user_attrs={**carried, "retry_of": trial.number, "retries": chain},
            skip_if_exists=False,
        )
    return lost
