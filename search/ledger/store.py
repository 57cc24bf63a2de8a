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
import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.trial import TrialState

from covidnet_jax.errors import ConfigError, StoreError
from search.config import Objective
from search.ledger.objective import directions
from search.ledger.records import TrialRecord

JOURNAL_NAME = "study.journal"
HEARTBEAT_ATTR = "search:heartbeat"
LEASE_SUFFIX = ":finisher"
_LOCK_GRACE_S = 10


def worker_id() -> str:
    """`host:pid` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def journal_path(workdir: str | Path) -> Path:
    """Where the default journal storage of a search lives."""
    return Path(workdir) / JOURNAL_NAME


CONFIG_NAME = "config.yaml"
TRIALS_DIR = "trials"
"""Each trained trial's run is `<artifact root>/trials/<number>/`."""


def artifact_dir(workdir: str | Path) -> Path:
    """Where a search's artifacts are (trial runs, confirmation, `best/`, the leaderboard):
    `search.artifact_root` as the workdir's `config.yaml` recorded it (an absolute path),
    else the workdir itself.

    Raises:
        ConfigError: the config names an artifact root that does not exist (not mounted on
            this host?).
    """
    workdir = Path(workdir)
    try:
        config = yaml.safe_load((workdir / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return workdir
    root = str(
        ((config.get("search") or {}) if isinstance(config, dict) else {}).get("artifact_root", "")
        or ""
    )
    if not root:
        return workdir
    if not Path(root).is_dir():
        raise ConfigError(
            f"{workdir / CONFIG_NAME}: search.artifact_root {root!r} is not a directory on "
            "this host (is the shared file system mounted?)"
        )
    return Path(root)


def repair_journal(path: Path) -> bool:
    """Checks every line of a journal file and trims a damaged last line.

    A writer killed mid-append leaves a torn last line (no newline); damage from outside can
    leave a last line that is not a log entry. Either is cut off (under the journal's lock)
    and its bytes are appended to `<journal>.torn`, so nothing is thrown away unseen: one
    operation (the one being written) is lost, never a finished trial. Damage before the
    last line cannot be repaired safely (the entries after it may depend on it) and is
    reported instead.

    Args:
        path: the journal file.

    Returns:
        True when something was trimmed.

    Raises:
        StoreError: a line before the last is not a log entry (its number is named).
    """
    if not path.exists() or path.stat().st_size == 0:
        return False
    lock = JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE_S)
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            lines = f.readlines()
            bad = [i for i, line in enumerate(lines) if not _is_log_entry(line)]
            if not bad:
                return False
            if bad[0] < len(lines) - 1:
                raise StoreError(
                    f"{path} line {bad[0] + 1}: not an Optuna journal entry "
                    f"({_describe_line(lines[bad[0]])}); the trial store is damaged before its "
                    f"last line. Keep a copy, then cut the file before that line to resume "
                    f"the trials recorded above it"
                )
            keep = sum(len(line) for line in lines[:-1])
            with open(path.with_name(path.name + ".torn"), "ab") as torn:
                torn.write(lines[-1])
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            logging.getLogger(__name__).warning(
                "%s: cut a damaged last line (%d bytes, kept in %s.torn)",
                path,
                len(lines[-1]),
                path.name,
            )
            return True
    finally:
        lock.release()


def _is_log_entry(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(entry, dict) and "op_code" in entry


def _describe_line(line: bytes) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}"
    return f"{text.strip()[:40]!r} is not a JSON log entry"


def _rdb_storage(url: str) -> RDBStorage:
    """`RDBStorage(url)`, retried a few times: two processes creating Optuna's tables in an
    empty database at once race (one fails with a unique violation on a type or table the
    other just created); the loser finds them made on the next attempt."""
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as err:  # SQLAlchemy raises many types; all mean "cannot use it"
            if attempt < 4 and _is_creation_race(err):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StoreError(f"--storage {url}: cannot open the database ({err})") from None
    raise AssertionError("unreachable")


def _is_creation_race(err: BaseException) -> bool:
    text = str(err).lower()
    return "unique" in text or "already exists" in text or "duplicate" in text


def open_storage(workdir: str | Path, url: str | None = None) -> BaseStorage:
    """The search's storage: the workdir's journal file, or the database at `url`.

    Args:
        workdir: the search's working directory (created if missing).
        url: an SQLAlchemy URL (e.g. `postgresql+psycopg2://user@host:5432/db`), or None.

    Raises:
        StoreError: the database cannot be reached or the URL is malformed, or the journal
            is damaged (`repair_journal`).
    """
    if url:
        return _rdb_storage(url)
    path = journal_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_journal(path)
    lock = JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE_S)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def search_study_names(storage: BaseStorage) -> list[str]:
    """The searches' study names in `storage` (finisher leases excluded)."""
    return [
        s.study_name for s in storage.get_all_studies() if not s.study_name.endswith(LEASE_SUFFIX)
    ]


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
def _every(interval_s: float, tick: Callable[[], bool], *, name: str) -> Iterator[None]:
    """Calls `tick` on a daemon thread at once and then every `interval_s` seconds while the
    block runs; `tick` returning False ends the thread early. The block's end waits for a
    tick in progress, so nothing is written after it."""
    stop = threading.Event()

    def loop() -> None:
        while tick() and not stop.wait(interval_s):
            pass

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def heartbeat(
    storage: BaseStorage,
    trial_id: int,
    interval_s: float,
    attrs: Callable[[], Mapping[str, Any]] | None = None,
) -> Iterator[None]:
    """Records a heartbeat for `trial_id` every `interval_s` seconds while the block runs,
    with the system attributes `attrs()` returns then (the trial's progress: written at the
    heartbeat's pace, however often the trial reports it)."""

    def beat() -> bool:
        try:
            for key, value in (attrs() if attrs is not None else {}).items():
                storage.set_trial_system_attr(trial_id, key, value)
            storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (UpdateFinishedTrialError, RuntimeError):
            return False  # the trial ended (or was declared lost by another worker)
        return True

    with _every(interval_s, beat, name=f"heartbeat-{trial_id}"):
        yield


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


RETRYABLE_FAILURES = ("oom", "error")
"""Failure kinds worth another attempt (`budget.max_retries`): out of memory and unexpected
errors can be transient (another process's memory, a full disk); NaN and compile errors repeat
exactly with the same seed and spec."""


def genome_of(trial: optuna.trial.FrozenTrial, genes: Collection[str]) -> dict[str, int] | None:
    """The trial's whole genome, or None while (or when, if it was killed) `suggest` had not
    drawn every gene. An enqueued retry holds its genome as Optuna's fixed parameters from the
    moment it exists."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    if not set(genes) <= set(params):
        return None
    return {name: int(params[name]) for name in genes}


def _retry_attrs(trial: optuna.trial.FrozenTrial, max_retries: int) -> dict[str, Any] | None:
    """The user attributes of `trial`'s retry, or None when it gets none.

    A lost trial (its worker died) is always retried: being killed says nothing about the
    candidate. A trial that failed on its own is retried while its chain has failed fewer than
    `max_retries` times, and only for `RETRYABLE_FAILURES`.
    """
    record = TrialRecord.from_trial(trial)
    losses, failures = record.losses, record.failures
    if record.status == "lost":
        losses += 1
    elif record.status == "failed" and record.failure_kind in RETRYABLE_FAILURES:
        failures += 1
        if failures > max_retries:
            return None
    else:
        return None
    return record.retry_attrs(losses=losses, failures=failures)


def recover_lost_trials(
    study: optuna.Study,
    storage: BaseStorage,
    *,
    grace_s: float,
    max_retries: int,
    genes: Collection[str],
) -> list[int]:
    """Marks running trials whose worker died as lost and makes sure every trial that deserves
    a retry has one.

    A running trial is lost when its last heartbeat (or, before the first, its start) is
    older than `grace_s`, or its worker process on this host is gone. The mark is the user
    attribute `lost` (the reason) followed by the state change to FAIL, which only one of
    several workers noticing the same trial wins; `TrialRecord` reads a FAIL trial with the
    mark as status "lost" (writing `status` itself could overwrite a result its worker, alive
    after all, recorded in the meantime). A trial lost before its genome was complete (killed
    between `study.ask` and the end of `space.suggest`) is marked `abandoned`: it never became
    a proposal, so it gets no retry and the budget asks for a new one.

    Then every FAIL trial without a retry gets one when `_retry_attrs` says so, with its whole
    genome and its completed rungs. This second pass also repairs a recovery killed between
    the mark and the enqueue; two workers repairing the same trial at once can enqueue two
    retries, of which the runner trains the first (`Worker.run_trial`).

    Args:
        study: the search's study.
        storage: the storage it lives in.
        grace_s: heartbeat age after which a worker is presumed dead.
        max_retries: attempts after a trial's own failure (lost trials do not count).
        genes: the search space's gene names (a complete genome has them all).

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
        worker = TrialRecord.from_trial(trial).worker or None
        gone = _worker_is_dead(worker)
        if not (stale or gone):
            continue
        why = "its process is gone" if gone else f"no heartbeat for {now - float(beat):.0f} s"
        reason = f"worker {worker or '?'} stopped ({why})"
        try:
            tid = trial_id(storage, study, trial.number)
            mark = TrialRecord.lost_attrs(reason, abandoned=genome_of(trial, genes) is None)
            for key, value in mark.items():  # "lost" last: it makes the trial read as lost
                storage.set_trial_user_attr(tid, key, value)
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker got there first, or the trial just ended
        lost.append(trial.number)
    trials = study.get_trials(deepcopy=False)
    retried = {TrialRecord.from_trial(t).retry_of for t in trials}
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried:
            continue
        genome = genome_of(trial, genes)
        attrs = _retry_attrs(trial, max_retries) if genome is not None else None
        if attrs is not None:
            study.enqueue_trial(genome, user_attrs=attrs, skip_if_exists=False)
    return lost


@dataclasses.dataclass(frozen=True)
class LeaseHolder:
    """Who holds a study's finisher lease.

    Attributes:
        worker: `host:pid` of the holder.
        since: epoch seconds it took the lease.
        heartbeat: epoch seconds of its last heartbeat (None before the first).
    """

    worker: str
    since: float
    heartbeat: float | None


class FinisherLease:
    """The right to finish a search (confirm, train the best design, score the test split):
    held by one process per study at a time, through the trial store itself, so it works
    for the journal and for a database shared by several hosts.

    The lease is a second Optuna study named `<study>:finisher`. Creating a study is atomic in
    both storages (a second creator gets `DuplicatedStudyError`), so whoever creates it holds
    the lease; its user attributes say who and carry a heartbeat; deleting it releases it. A
    lease whose heartbeat is older than `grace_s`, or whose holder's process on this host is
    gone, is expired: it is deleted by its id (so of two processes expiring it, only one
    succeeds, and neither can delete a lease taken again in the meantime), and taken anew.

    Args:
        storage: the trial store.
        study_name: the search's study.
        grace_s: heartbeat age after which the holder is presumed dead.
        interval_s: heartbeat period while held.
    """

    def __init__(
        self, storage: BaseStorage, study_name: str, *, grace_s: float, interval_s: float
    ) -> None:
        self.storage = storage
        self.name = study_name + LEASE_SUFFIX
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._held_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen_without_beat: dict[int, float] = {}

    def holder(self) -> LeaseHolder | None:
        """The current holder (None when the lease is free)."""
        found = self._find()
        if found is None:
            return None
        attrs = found[1]
        return LeaseHolder(
            worker=str(attrs.get("worker", "?")),
            since=float(attrs.get("since", 0.0)),
            heartbeat=attrs.get("heartbeat"),
        )

    def try_acquire(self) -> bool:
        """Takes the lease if it is free or expired; True when this process holds it."""
        if self._held_id is not None:
            return True
        found = self._find()
        if found is not None:
            lease_id, attrs = found
            if not self._expired(lease_id, attrs):
                return False
            with contextlib.suppress(KeyError):
                self.storage.delete_study(lease_id)
        try:
            lease_id = self.storage.create_new_study(
                directions=[optuna.study.StudyDirection.MINIMIZE], study_name=self.name
            )
        except optuna.exceptions.DuplicatedStudyError:
            return False
        now = time.time()
        self.storage.set_study_user_attr(lease_id, "worker", worker_id())
        self.storage.set_study_user_attr(lease_id, "since", now)
        self.storage.set_study_user_attr(lease_id, "heartbeat", now)
        self._held_id = lease_id
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="finisher-lease", daemon=True)
        self._thread.start()
        return True

    def release(self) -> None:
        """Gives the lease back (nothing when not held)."""
        if self._held_id is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(KeyError):  # expired and taken over meanwhile
            self.storage.delete_study(self._held_id)
        self._held_id = None

    def __enter__(self) -> FinisherLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _find(self) -> tuple[int, dict] | None:
        try:
            lease_id = self.storage.get_study_id_from_name(self.name)
            return lease_id, dict(self.storage.get_study_user_attrs(lease_id))
        except KeyError:
            return None

    def _expired(self, lease_id: int, attrs: dict) -> bool:
        if _worker_is_dead(attrs.get("worker")):
            return True
        beat = attrs.get("heartbeat")
        if beat is None:
            # Created a moment ago and not yet stamped, or its creator died right away:
            # count from when this process first saw it so.
            beat = self._seen_without_beat.setdefault(lease_id, time.time())
        return time.time() - float(beat) > self.grace_s

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            held = self._held_id
            if held is None:
                return
            try:
                self.storage.set_study_user_attr(held, "heartbeat", time.time())
            except KeyError:
                return  # expired (this process stalled past the grace period) and deleted


WALL_ATTR_PREFIX = "wall:"


def wall_time_spent(study: optuna.Study) -> float:
    """Seconds the search has spent proposing, over all its invocations: the length of the
    union of the intervals `wall_clock` recorded (overlapping invocations, e.g. two commands
    on one workdir, count once)."""
    intervals = sorted(
        (float(v[0]), float(v[1]))
        for k, v in study.user_attrs.items()
        if k.startswith(WALL_ATTR_PREFIX) and isinstance(v, list) and len(v) == 2
    )
    total, end = 0.0, -math.inf
    for start, stop in intervals:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


@contextlib.contextmanager
def wall_clock(study: optuna.Study, interval_s: float) -> Iterator[None]:
    """Records this invocation's proposal phase as study user attr
    `wall:<host:pid>:<start>` = [start, last seen], refreshed every `interval_s` while the
    block runs, so a killed invocation still counts up to its last refresh."""
    start = time.time()
    key = f"{WALL_ATTR_PREFIX}{worker_id()}:{start:.3f}"

    def record() -> None:
        study.set_user_attr(key, [start, time.time()])

    def refresh() -> bool:
        with contextlib.suppress(Exception):  # a store hiccup must not end the search
            record()
        return True

    record()  # before the block: a kill in its first interval still counts
    try:
        with _every(interval_s, refresh, name="wall-clock"):
            yield
    finally:
        record()
