"""covidnet_jax.hostmem: the malloc setting (tcmalloc, else huge pages) and the one re-exec
that applies it."""

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
TCMALLOC = "libtcmalloc_minimal.so.4"


def _found() -> str:
    return TCMALLOC


def _absent() -> None:
    return None


def _tuned(environ: dict[str, str], find=_found) -> dict[str, str] | None:
    return hostmem.tuned_environ(environ, find=find)


@pytest.fixture(autouse=True)
def _on_linux(monkeypatch):
    # The choice logic is the same everywhere; only its default is off outside Linux.
    monkeypatch.setattr(sys, "platform", "linux")


def test_tcmalloc_is_preloaded_once_before_other_preloads():
    env = _tuned({"PATH": "/bin"})
    assert env is not None and env["LD_PRELOAD"] == TCMALLOC and env["PATH"] == "/bin"
    assert "GLIBC_TUNABLES" not in env
    assert _tuned(env) is None  # already preloaded: no second re-exec
    other = _tuned({"LD_PRELOAD": "/opt/libprofiler.so"})
    assert other is not None and other["LD_PRELOAD"] == f"{TCMALLOC}:/opt/libprofiler.so"


def test_without_tcmalloc_the_huge_page_tunable_is_added_beside_others():
    env = _tuned({"PATH": "/bin"}, find=_absent)
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "LD_PRELOAD" not in env
    assert _tuned(env, find=_absent) is None
    other = _tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, find=_absent)
    assert other is not None
    assert other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_covidnet_malloc_chooses():
    assert _tuned({"COVIDNET_MALLOC": "hugepages"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert _tuned({"COVIDNET_MALLOC": "TCMalloc"})["LD_PRELOAD"] == TCMALLOC
    assert _tuned({"COVIDNET_MALLOC": "off"}) is None
    with pytest.raises(ValueError, match=r"COVIDNET_MALLOC='fast'.*auto.*tcmalloc"):
        _tuned({"COVIDNET_MALLOC": "fast"})


def test_asking_for_tcmalloc_without_it_warns_and_falls_back(capsys):
    env = _tuned({"COVIDNET_MALLOC": "tcmalloc"}, find=_absent)
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "libtcmalloc-minimal4" in capsys.readouterr().err


def test_user_choices_win():
    assert _tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for allocator in ("/usr/lib/libjemalloc.so.2", "libtcmalloc.so.4", "libmimalloc.so"):
        assert _tuned({"LD_PRELOAD": allocator}) is None
    for off in ("0", "false", "off", "No"):
        assert _tuned({"COVIDNET_MALLOC_TUNING": off}) is None


def test_nothing_changes_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _tuned({"PATH": "/bin"}) is None


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    ours = ("GLIBC_TUNABLES", "LD_PRELOAD", "COVIDNET_MALLOC", "COVIDNET_MALLOC_TUNING")
    environ = {k: v for k, v in os.environ.items() if k not in ours}
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


def _require_tcmalloc() -> str:
    """tcmalloc's library here; CI installs it and sets COVIDNET_TEST_TCMALLOC=1, so there its
    absence fails instead of skipping."""
    library = hostmem.find_tcmalloc()
    if library is None:
        if os.environ.get("COVIDNET_TEST_TCMALLOC"):
            pytest.fail("COVIDNET_TEST_TCMALLOC is set but no tcmalloc library was found")
        pytest.skip("no tcmalloc on this machine (apt install libtcmalloc-minimal4)")
    return library


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is Linux-only")
def test_reexec_restarts_the_program_once_under_the_setting():
    code = """
        import os, sys
        from covidnet_jax import hostmem
        print("start", os.environ.get("LD_PRELOAD"), os.environ.get("GLIBC_TUNABLES"), flush=True)
        hostmem.reexec_tuned(["-c", "import os; print('child', os.environ.get('LD_PRELOAD'), os.environ.get('GLIBC_TUNABLES'))"])
        print("not re-executed")
    """
    library = hostmem.find_tcmalloc()
    out = _run(code).stdout.split("\n")
    expected = f"child {library} None" if library else "child None glibc.malloc.hugetlb=1"
    assert out[:2] == ["start None None", expected]
    out = _run(code, COVIDNET_MALLOC="hugepages").stdout.split("\n")
    assert out[:2] == ["start None None", "child None glibc.malloc.hugetlb=1"]
    out = _run(code, COVIDNET_MALLOC_TUNING="0").stdout.split("\n")
    assert out[:2] == ["start None None", "not re-executed"]


# What XLA does every step: malloc a large buffer on a worker thread, write it, free it; the
# fewest minor page faults of three such steps. `CDLL(None)` resolves malloc as the program
# does, so a preloaded allocator is the one measured.
_STEP_FAULTS = """
    import ctypes, resource, threading
    libc = ctypes.CDLL(None)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
def test_under_tcmalloc_a_large_buffer_freed_and_mallocd_again_does_not_fault():
    library = _require_tcmalloc()
    plain = int(_run(_STEP_FAULTS).stdout)
    tuned = int(_run(_STEP_FAULTS, LD_PRELOAD=library).stdout)
    assert plain > 60_000  # 256 MiB in 4 KiB pages, every time
    assert tuned < 1_000, (plain, tuned)


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
    plain = int(_run(_STEP_FAULTS).stdout)
    tuned = int(_run(_STEP_FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1").stdout)
    assert plain > 60_000  # 256 MiB in 4 KiB pages, every time
    assert tuned < plain / 20, (plain, tuned)


def test_the_covidnet_command_names_a_bad_setting_and_exits_2():
    environ = {k: v for k, v in os.environ.items() if k != "COVIDNET_MALLOC_TUNING"}
    environ.update(COVIDNET_MALLOC="fast", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", "from search.cli import entry; raise SystemExit(entry())", "--help"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "covidnet: error: COVIDNET_MALLOC='fast': expected one of" in done.stderr
