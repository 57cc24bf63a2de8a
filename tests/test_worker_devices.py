"""Which GPU each search worker sees, and its memory share where workers share one."""

from __future__ import annotations

from search.execution.runner import worker_environments


def test_a_cpu_host_sets_nothing():
    assert worker_environments(3, []) == [{}, {}, {}]


def test_one_worker_per_gpu_gets_the_whole_gpu():
    envs = worker_environments(2, ["0", "1"])
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]


def test_workers_sharing_a_gpu_split_its_memory_instead_of_preallocating_it():
    envs = worker_environments(2, ["0"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0"]
    assert [float(e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) for e in envs] == [0.45, 0.45]


def test_uneven_sharing_gives_each_device_its_own_split():
    envs = worker_environments(3, ["3", "5"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5", "3"]
    assert [e.get("XLA_PYTHON_CLIENT_MEM_FRACTION") for e in envs] == ["0.450", None, "0.450"]
