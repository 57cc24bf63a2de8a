"""Search workers as Ray tasks: one search over the machines of a Ray cluster.

`covidnet search --ray ADDRESS` (or `search.run(..., ray=ADDRESS)`) connects to a running
Ray cluster and starts the search's workers as Ray tasks, one per GPU of the cluster (one per
requested CPU slot on a CPU-only cluster), each asking Ray for one GPU (Ray sets the task's
`CUDA_VISIBLE_DEVICES`) or one CPU. They run `search.execution.runner.run_worker` against the
shared trial store, exactly like local worker processes; the finish (confirmation, the best
design's training, the test split scored once) runs as one more task with the same resources,
under the study's finisher lease.

Ray schedules; it does not carry state: the trial store must be reachable from every node (a
PostgreSQL URL given with `--storage`; the workdir's journal only works on one machine or a
shared file system) and so must the artifact root (`search.artifact_root`) and the data. Ray
is an optional dependency (`pip install 'covidnet-jax[ray]'`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from covidnet_jax.errors import ConfigError
from search.execution.runner import SearchJob, run_worker
from search.ledger.records import TrialRecord


def connect(address: str) -> Any:
    """Connects this process to the Ray cluster at `address` (e.g. "10.0.0.5:6379").

    Returns:
        The `ray` module.

    Raises:
        ConfigError: Ray is not installed, or no cluster answers at `address`.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray: Ray is not installed; pip install 'covidnet-jax[ray]' (or ray>=2.40)"
        ) from None
    if not ray.is_initialized():
        # Ray itself retries an unreachable address for minutes before giving up.
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"--ray {address}: no Ray cluster answers there ({err}); start one with "
                "`ray start --head` and pass the address it prints (HOST:PORT)"
            ) from None
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    return ray


def worker_plan(resources: Mapping[str, float], requested: int | None) -> tuple[int, dict]:
    """How many worker tasks to start and what each asks Ray for.

    Args:
        resources: the cluster's total resources (`ray.cluster_resources()`).
        requested: the worker count asked for (None: one per GPU, or 1 without GPUs).

    Returns:
        (worker count, the task options: `num_gpus` 1 on a GPU cluster, else `num_cpus` 1).
    """
    gpus = int(resources.get("GPU", 0))
    count = requested if requested is not None else max(1, gpus)
    options = {"num_gpus": 1, "num_cpus": 1} if gpus > 0 else {"num_cpus": 1}
    return count, options


def run_on_ray(job: SearchJob, address: str, workers: int | None = None) -> list[str]:
    """Runs the search's workers as Ray tasks until its budget is spent.

    Args:
        job: the search (pickled to every task).
        address: the Ray cluster's address.
        workers: worker tasks (None: one per GPU of the cluster, or 1 without GPUs).

    Returns:
        Each worker's stop reason, prefixed with the node it ran on.
    """
    ray = connect(address)
    count, options = worker_plan(ray.cluster_resources(), workers)
    task = ray.remote(**options)(_worker_task)
    return list(ray.get([task.remote(job) for _ in range(count)]))


def conclude_on_ray(
    job: SearchJob, address: str, *, train_seed: int
) -> tuple[list[TrialRecord], Any, Path, Path]:
    """The finish (`search.execution.session.conclude`) as a Ray task on a worker's kind of
    node (it trains the confirmation runs): returns what `conclude` returns."""
    ray = connect(address)
    _, options = worker_plan(ray.cluster_resources(), None)
    task = ray.remote(**options)(_conclude_task)
    return ray.get(task.remote(job, train_seed))


def _worker_task(job: SearchJob) -> str:
    import socket

    summary = run_worker(job)
    return f"{socket.gethostname()}: {summary.stop_reason}"


def _conclude_task(job: SearchJob, train_seed: int):
    from search.execution.session import conclude

    return conclude(job, train_seed=train_seed, console=None)
