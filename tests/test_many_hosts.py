"""One search on several hosts: separate workdirs, one PostgreSQL study, one shared artifact
root; a host killed mid-training loses nothing, and exactly one host scores the test split.

The hosts are processes of `tests/host_driver.py` (surrogate training with real Orbax
checkpoints). PostgreSQL is the shared store, as on real clusters: `.ci/run` starts one and
sets COVIDNET_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from search_support import BASE

from covidnet_jax.errors import ConfigError
from covidnet_jax.typed_yaml import from_dict
from search.config import SearchSettings
from search.ledger import store
from search.ledger.records import proposal_outcomes
from search.reporting.compare import load_run

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("COVIDNET_TEST_POSTGRES_URL")


def test_an_artifact_root_url_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"search.artifact_root: expected a mounted directory"):
        from_dict(SearchSettings, {"space": BASE["space"], "artifact_root": "gs://bucket/run"})


def test_a_workdir_without_an_artifact_root_keeps_its_artifacts(tmp_path):
    assert store.artifact_dir(tmp_path) == tmp_path
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"search": {"artifact_root": ""}}))
    assert store.artifact_dir(tmp_path) == tmp_path


def test_an_artifact_root_that_is_not_mounted_is_named(tmp_path):
    config = {"search": {"artifact_root": str(tmp_path / "nfs" / "run")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"is not a directory on this host \(is the shared"):
        store.artifact_dir(tmp_path)


def _fresh_database(url: str) -> str:
    """A new database on the test server, so hosts start from an empty study."""
    name = f"hosts_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def _host(tmp_path: Path, name: str, artifacts: Path, url: str, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    args = [str(tmp_path / name), str(artifacts), url, str(tmp_path), mode]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "host_driver.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.{mode}.err", "w"),
    )


def _jobs(tmp_path: Path) -> list[tuple[int, str, int, int, str]]:
    log = tmp_path / "train.log"
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        pid, workdir, start, steps, init_from = line.split(" ")
        rows.append((int(pid), workdir, int(start), int(steps), init_from))
    return rows


def _wait_for(condition, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(
    POSTGRES is None,
    reason="COVIDNET_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)",
)
def test_two_hosts_share_one_search_and_a_killed_host_loses_nothing(tmp_path):
    url = _fresh_database(POSTGRES)
    artifacts = tmp_path / "shared"
    artifacts.mkdir()

    a = _host(tmp_path, "host_a", artifacts, url, "full")
    _wait_for(lambda: sum(j[0] == a.pid for j in _jobs(tmp_path)) >= 2, 120, "host A's 2nd job")
    b = _host(tmp_path, "host_b", artifacts, url, "full")
    _wait_for(lambda: any(j[0] == b.pid for j in _jobs(tmp_path)), 120, "host B's first job")
    seen = sum(j[0] == a.pid for j in _jobs(tmp_path))
    _wait_for(lambda: sum(j[0] == a.pid for j in _jobs(tmp_path)) > seen, 60, "a new job on A")
    time.sleep(0.7)  # A is inside that job: 8 steps at 0.15 s, a checkpoint every 2 steps
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    killed_pid = a.pid
    again = _host(tmp_path, "host_a", artifacts, url, "full")  # the host comes back
    for process in (b, again):
        assert process.wait(timeout=240) == 0, (tmp_path / "host_b.full.err").read_text()[-3000:]

    study = store.load_study(store.open_storage(tmp_path, url), "shared")
    records = store.read_records(study)
    outcomes = proposal_outcomes(records)
    # Nothing lost, nothing trained twice.
    assert len(outcomes) == 8 and all(o.settled for o in outcomes)
    assert all(o.trained <= 1 for o in outcomes)
    assert sum(o.trained for o in outcomes) == sum(1 for r in records if r.status == "trained")

    jobs = _jobs(tmp_path)
    by_dir = {
        Path(workdir).name: (pid, start, init_from) for pid, workdir, start, _, init_from in jobs
    }
    # The trial killed with host A was retried on a live host from its last checkpoint.
    lost = [r for r in records if r.status == "lost" and r.worker.endswith(f":{killed_pid}")]
    assert lost, [(r.number, r.status, r.worker) for r in records]
    retries = [r for r in records if r.retry_of in {x.number for x in lost}]
    assert retries and all(r.status == "trained" for r in retries)
    assert any(by_dir[str(r.number)][1] > 0 for r in retries), by_dir
    # A child trained on one host inherited the weights of a parent trained on the other.
    pid_of = {r.number: r.worker.rsplit(":", 1)[-1] for r in records}
    crossed = [
        r
        for r in records
        if r.parent is not None
        and str(r.number) in by_dir
        and by_dir[str(r.number)][2] != "None"
        and pid_of[r.parent] != pid_of[r.number]
    ]
    assert crossed, [
        (r.number, r.parent, pid_of[r.number], by_dir.get(str(r.number))) for r in records
    ]
    # Exactly one finisher scored the test split, once, and wrote the shared results.
    assert len((tmp_path / "test.log").read_text().splitlines()) == 1
    assert (artifacts / "best" / "metrics.json").is_file()
    assert (artifacts / "leaderboard.json").is_file()
    assert not (tmp_path / "host_a" / "trials").exists()
    # Either host's workdir reads the same search through its config's artifact root.
    rows = []
    for host in ("host_a", "host_b"):
        config = {"search": {"artifact_root": str(artifacts), "study_name": "shared"}}
        (tmp_path / host / "config.yaml").write_text(yaml.safe_dump(config))
        run = load_run(tmp_path / host, storage_url=url, study_name="shared")
        assert run.artifacts == artifacts and run.best is not None
        rows.append([(c.trial, c.status) for c in run.candidates])
    assert rows[0] == rows[1]
