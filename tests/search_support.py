"""Shared pieces of the search tests: a small space around `tiny`, runs with the surrogate."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from covidnet_jax import presets
from search.execution.runner import run_worker
from search.execution.surrogate import SurrogateEvaluator, surrogate_job
from search.ledger import store
from search.ledger.records import TrialRecord

PROTOTYPE = presets.get_preset("tiny").with_input_size(64)

BASE = {
    "space": {
        "prototype": "tiny",
        "stage_depths": [[1, 3], [1, 2]],
        "stage_width": {"min": 0.5, "max": 2.0, "step": 0.25},
        "module_width": {"min": 0.25, "max": 2.0, "step": 0.25},
        "kernel_sizes": [3, 5],
        "connectivity": ["dense", "residual"],
    },
    "requirements": {
        "max_macs": 3.0e6,
        "min_accuracy": 0.8,
        "classes": {"COVID-19": {"min_sensitivity": 0.7}},
        # The surrogate's metrics are exact functions of the spec, not samples: judge them
        # as they are (the lower-bound rule is tested in test_requirements.py).
        "decision": "point",
    },
    "strategy": {"name": "evolution"},
    "budget": {"max_trials": 20, "rungs": [100, 300]},
}


def settings(**changes: object) -> dict:
    """BASE with dotted-key changes, e.g. `settings(**{"budget.max_trials": 5})`."""
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def read(workdir: Path, storage_url: str | None = None, name: str | None = None):
    """Every record of the search in `workdir`."""
    storage = store.open_storage(workdir, storage_url)
    return store.read_records(store.load_study(storage, name or workdir.name))


def run(
    root: Path, name: str, data: dict, evaluator: SurrogateEvaluator | None = None
) -> tuple[list[TrialRecord], str]:
    """Runs one in-process worker of a surrogate search in `root/name`."""
    workdir = root / name
    job = surrogate_job(data, workdir, prototype=PROTOTYPE)
    summary = run_worker(job, evaluator if evaluator is not None else SurrogateEvaluator())
    return read(workdir), summary.stop_reason


@contextlib.contextmanager
def tmpfs_dir(fallback: Path) -> Iterator[Path]:
    """A temporary directory on tmpfs when there is one (else `fallback`).

    The journal fsyncs every write (a few ms each on a disk); on tmpfs the same code runs
    without waiting for the disk, which keeps the many small searches of the tests fast.
    """
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="covidnet-search-", dir="/dev/shm"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield fallback


@pytest.fixture
def fast_tmp(tmp_path):
    """`tmpfs_dir` for one test."""
    with tmpfs_dir(tmp_path) as root:
        yield root
