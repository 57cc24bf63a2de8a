"""A search whose workers and finish run as tasks on a Ray cluster (a local head on
127.0.0.1 only, two CPU slots)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from search_support import PROTOTYPE, settings

from covidnet_jax.errors import ConfigError
from search.execution.ray_workers import conclude_on_ray, run_on_ray, worker_plan
from search.execution.surrogate import surrogate_job
from search.ledger import store

RAY = shutil.which("ray", path=str(Path(sys.executable).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with 2 CPUs; its address."""
    assert RAY is not None, "ray is a dev dependency (pip install -e '.[dev]')"
    port = _free_port()
    # Unix socket paths are limited to 107 bytes: a short temp dir of its own.
    temp_dir = Path("/tmp") / f"ray-{uuid.uuid4().hex[:8]}"
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
        "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_one_worker_per_gpu_or_one_cpu_slot():
    assert worker_plan({"CPU": 16.0, "GPU": 4.0}, None) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert worker_plan({"CPU": 16.0, "GPU": 4.0}, 2) == (2, {"num_gpus": 1, "num_cpus": 1})
    assert worker_plan({"CPU": 16.0}, None) == (1, {"num_cpus": 1})
    assert worker_plan({"CPU": 16.0}, 3) == (3, {"num_cpus": 1})


def test_a_missing_cluster_is_one_line():
    with pytest.raises(ConfigError, match=r"--ray 127.0.0.1:9: no Ray cluster answers there"):
        run_on_ray(surrogate_job(settings(), "/tmp/x", prototype=PROTOTYPE), "127.0.0.1:9")


@pytest.mark.slow
def test_ray_workers_run_the_search_and_one_finishes(ray_head, tmp_path):
    data = settings(
        **{
            "strategy.name": "random",
            "budget.max_trials": 8,
            "budget.rungs": [20],
            "requirements.max_macs": 1.0e7,
            "requirements.min_accuracy": 0.5,
            "requirements.classes": {},
            "confirm": {"seeds": 0},
        }
    )
    job = surrogate_job(
        data,
        tmp_path / "work",
        prototype=PROTOTYPE,
        tau=10.0,
        seconds_per_step=0.02,
        test_log=str(tmp_path / "test.log"),
    )
    job = dataclasses.replace(job, artifacts=str(tmp_path / "shared"))
    (tmp_path / "work").mkdir()
    study = store.open_study(store.open_storage(job.workdir, None), job.study_name, "min_macs")

    reasons = run_on_ray(job, ray_head, workers=2)
    records, best, _csv_path, json_path = conclude_on_ray(job, ray_head, train_seed=0)

    assert len(reasons) == 2 and all("budget spent" in r for r in reasons), reasons
    trained = [r for r in store.read_records(study) if r.status == "trained"]
    workers = {r.worker for r in trained}
    assert len(workers) == 2, workers  # both Ray tasks trained candidates
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert (tmp_path / "shared" / "trials").is_dir()
    assert best.summary is not None and json_path == tmp_path / "shared" / "leaderboard.json"
    assert len((tmp_path / "test.log").read_text().splitlines()) == 1
    assert len(records) == 8


@pytest.mark.slow
def test_covidnet_search_on_ray_trains_for_real_and_finishes(ray_head, tmp_path, capsys):
    from test_search_cli import write_experiment

    from search.cli import main

    path = write_experiment(tmp_path)
    workdir = tmp_path / "run"
    args = ["search", "--config", str(path), "--workdir", str(workdir), "--no-live"]
    overrides = ["--set", "search.budget.max_trials=3", "--set", "search.confirm.seeds=0"]
    assert main([*args, *overrides, "--ray", ray_head, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "starting the workers on the Ray cluster" in out and "best design: trial" in out
    records = store.read_records(store.load_study(store.open_storage(workdir), "run"))
    assert len([r for r in records if r.is_proposal]) == 3
    assert all(not r.worker.endswith(f":{os.getpid()}") for r in records if r.worker)
    assert (workdir / "best" / "metrics.json").is_file()
