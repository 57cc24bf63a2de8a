"""Host memory: back XLA:CPU's per-step buffers with transparent huge pages.

XLA:CPU mallocs an executable's temporary buffer each time it runs and frees it when the
run ends. A training step's buffer is large (355 MB for `covidnet-c` at 64 px, batch 32;
about 1 GB at 224 px, batch 8), so glibc maps it afresh with `mmap` on every step (always
from XLA's threads, whose arenas map anything that large) and unmaps it on `free`. The
kernel then faults the buffer in again, one zero-filled 4 KiB page at a time: 88,000 minor
faults and 0.28 s of system time per step at 64 px, 268,000 and 0.84 s at 224 px.

glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 and later) makes malloc ask for
transparent huge pages on the memory it maps (`madvise(MADV_HUGEPAGE)`), so the same buffer
costs 2 MiB faults: about 500 per step. Measured on 2 cores, JAX only, same script
alternating: 58 -> 76 images/s at 64 px, 4.8 -> 6.0 at 224 px (bench/README.md, "Page
faults").

glibc reads tunables once, when the process starts, so the `covidnet` command re-executes
itself once with the tunable added to `GLIBC_TUNABLES` (child processes such as search
workers inherit it). `COVIDNET_MALLOC_TUNING=0` turns this off. It matters where the
kernel's transparent huge pages are in `madvise` mode (as on this machine); with `always`
large mappings are huge already, and with `never`, or off Linux, it changes nothing.

Tried and not kept: `mallopt` to keep freed memory in the heap (one arena, no mmap, no
trim) removes the faults altogether, but the single arena's lock made XLA's compiles and
steps slower than the faults it saved.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

ENV_SWITCH = "COVIDNET_MALLOC_TUNING"
TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def tuning_enabled(environ: Mapping[str, str]) -> bool:
    """False when `COVIDNET_MALLOC_TUNING` is 0/false/no/off, or off Linux."""
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.platform.startswith("linux")


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when `environ` needs no change.

    The huge-page tunable is appended to any tunables already set; one the user set for
    `glibc.malloc.hugetlb` (any value) is left as it is.
    """
    if not tuning_enabled(environ):
        return None
    current = environ.get(TUNABLES, "")
    names = {item.partition("=")[0] for item in current.split(":") if item}
    if "glibc.malloc.hugetlb" in names:
        return None
    tuned = dict(environ)
    tuned[TUNABLES] = f"{current}:{HUGE_PAGES}" if current else HUGE_PAGES
    return tuned


def reexec_with_huge_pages(argv: Sequence[str]) -> None:
    """Replaces this process by `python ARGV...` with the huge-page tunable set.

    Returns (without re-executing) when the tunable is already set, tuning is disabled,
    or the exec fails; call it first thing in a program's entry point, before any work
    that a restart would repeat.
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
