"""covidnet_jax.hostmem: the huge-page malloc tunable and the one re-exec that sets it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from covidnet_jax import hostmem

ROOT = Path(__file__).resolve().parents[1]


def test_tunable_is_added_once_and_kept_beside_others():
    env = hostmem.tuned_environ({"PATH": "/bin"})
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin"
    assert hostmem.tuned_environ(env) is None  # already set: no second re-exec
    other = hostmem.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other is not None
    assert other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_user_choices_win():
    assert hostmem.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for off in ("0", "false", "off", "No"):
        assert hostmem.tuned_environ({"COVIDNET_MALLOC_TUNING": off}) is None


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ.update(env)
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=True,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_reexec_restarts_the_program_once_with_the_tunable():
    code = """
        import os, sys
        from covidnet_jax import hostmem
        print("start", os.environ.get("GLIBC_TUNABLES"), flush=True)
        hostmem.reexec_with_huge_pages(["-c", "import os; print('child', os.environ['GLIBC_TUNABLES'])"])
        print("not re-executed")
    """
    out = _run(code).stdout.split("\n")
    assert out[:2] == ["start None", "child glibc.malloc.hugetlb=1"]
    out = _run(code, COVIDNET_MALLOC_TUNING="0").stdout.split("\n")
    assert out[:2] == ["start None", "not re-executed"]


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else "absent"


@pytest.mark.skipif(
    _thp_mode() != "madvise",
    reason=f"transparent huge pages are '{_thp_mode()}' on this kernel, not 'madvise': the "
    "tunable changes nothing there (with 'always' every large mapping is huge already)",
)
def test_a_large_buffer_freed_and_mallocd_again_faults_in_huge_pages():
    # What XLA does every step: malloc a large buffer on a worker thread, write it, free it.
    code = """
        import ctypes, resource, threading
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size = 256 << 20
        faults = []
        def step():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        for _ in range(3):
            t = threading.Thread(target=step); t.start(); t.join()
        print(min(faults))
    """
    plain = int(_run(code).stdout)
    tuned = int(_run(code, GLIBC_TUNABLES="glibc.malloc.hugetlb=1").stdout)
    assert plain > 60_000  # 256 MiB in 4 KiB pages, every time
    assert tuned < plain / 20, (plain, tuned)
