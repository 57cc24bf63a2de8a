"""Host memory: the malloc that XLA:CPU's per-step buffers get.

XLA:CPU mallocs an executable's temporary buffer each time it runs and frees it when the
run ends. A training step's buffer is large (355 MB for `covidnet-c` at 64 px, batch 32;
about 1 GB at 224 px, batch 8), so glibc maps it afresh with `mmap` on every step (always
from XLA's threads, whose arenas map anything that large) and unmaps it on `free`. The
kernel then faults the buffer in again, one zero-filled 4 KiB page at a time: 88,000 minor
faults and 0.28 s of system time per step at 64 px, 268,000 and 0.84 s at 224 px.

The `covidnet` command therefore re-executes itself once, before any work, in one of two
settings (child processes such as search workers inherit it):

1. **tcmalloc**, when the system has it (`libtcmalloc_minimal.so.4`, Debian/Ubuntu package
   `libtcmalloc-minimal4`; or gperftools' full `libtcmalloc.so.4`), preloaded with
   `LD_PRELOAD`. It keeps freed spans for reuse, so the buffer is mapped once: no faults and
   almost no system time after the first step. Against setting 2 on 2 cores (alternating
   runs of bench/train_throughput.py): 1.09-1.20x more training images/s at 64 and 224 px,
   and 8-28% shorter compiles (bench/README.md, "Host memory: tcmalloc").
2. Otherwise glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 and later): malloc asks
   for transparent huge pages on the memory it maps, so the same buffer costs about 500
   2 MiB faults per step instead of 88,000 (58 -> 76 images/s at 64 px against plain glibc).
   It matters where the kernel's transparent huge pages are in `madvise` mode; with
   `always` large mappings are huge already, and with `never` it changes nothing.

`COVIDNET_MALLOC` chooses: `auto` (the default: 1, else 2), `tcmalloc` (1, else 2 with a
warning), `hugepages` (2) or `off` (`COVIDNET_MALLOC_TUNING=0` also means off). A process
that already preloads an allocator (`LD_PRELOAD` naming tcmalloc, jemalloc or mimalloc) or
sets `glibc.malloc.hugetlb` itself is left as it is. Off Linux nothing changes.

Tried and not kept: `mallopt` to keep freed memory in glibc's heap (one arena, no mmap, no
trim) removes the faults too, but the single arena's lock made XLA's compiles and steps
slower than the faults it saved; jemalloc with its default decay unmaps freed memory and
made the step slower than setting 2 (with decay off it matched tcmalloc).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence

ENV_CHOICE = "COVIDNET_MALLOC"
ENV_SWITCH = "COVIDNET_MALLOC_TUNING"
CHOICES = ("auto", "tcmalloc", "hugepages", "off")
TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
PRELOAD = "LD_PRELOAD"
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def find_tcmalloc() -> str | None:
    """tcmalloc's shared library as the dynamic loader finds it (a soname such as
    `libtcmalloc_minimal.so.4`), or None when the system has none."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def choice(environ: Mapping[str, str]) -> str:
    """The malloc setting `environ` asks for: one of `CHOICES`.

    Raises:
        ValueError: `COVIDNET_MALLOC` is not one of `CHOICES`.
    """
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return "off"
    value = environ.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_CHOICE}={environ[ENV_CHOICE]!r}: expected one of {CHOICES}")
    return value if sys.platform.startswith("linux") else "off"


def tuned_environ(
    environ: Mapping[str, str], find: Callable[[], str | None] = find_tcmalloc
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when `environ` needs no change.

    Args:
        environ: the current environment.
        find: locates tcmalloc (injected by tests).

    Returns:
        A copy of `environ` with tcmalloc added to `LD_PRELOAD` (before any preloads already
        there), or with the huge-page tunable appended to `GLIBC_TUNABLES`; None when the
        setting is off or the environment already has an allocator or the tunable.
    """
    wanted = choice(environ)
    if wanted == "off":
        return None
    preload = environ.get(PRELOAD, "")
    if any(name in preload for name in _ALLOCATORS):
        return None
    tunables = environ.get(TUNABLES, "")
    if "glibc.malloc.hugetlb" in {item.partition("=")[0] for item in tunables.split(":")}:
        return None
    tuned = dict(environ)
    library = find() if wanted in ("auto", "tcmalloc") else None
    if library:
        tuned[PRELOAD] = f"{library}:{preload}" if preload else library
        return tuned
    if wanted == "tcmalloc":
        print(
            f"covidnet: {ENV_CHOICE}=tcmalloc but no tcmalloc library was found (Debian/Ubuntu: "
            "apt install libtcmalloc-minimal4); using glibc with huge pages",
            file=sys.stderr,
        )
    tuned[TUNABLES] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    return tuned


def reexec_tuned(argv: Sequence[str]) -> None:
    """Replaces this process by `python ARGV...` under the malloc setting (see the module).

    Returns (without re-executing) when nothing needs to change or the exec fails; call it
    first thing in a program's entry point, before any work that a restart would repeat.

    Raises:
        ValueError: `COVIDNET_MALLOC` has a value outside `CHOICES`.
    """
    environ = tuned_environ(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv], environ)
    except OSError:
        return
