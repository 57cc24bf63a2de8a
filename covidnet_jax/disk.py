"""Folders a command writes to: an up-front writability check, and one-line messages for a
write that the disk refused (permissions, read-only file system, full disk, quota).

Commands call `ensure_writable` on their output folder before any work, so a read-only
workdir fails in a second, naming the folder, not after minutes of training. A disk that
fills up during a run cannot be checked ahead; `disk_failure` recognises such an error
(an `OSError`, anywhere in the exception chain, or a TensorStore error from an Orbax
background thread, which carries the OS error code only in its text) so that the command
line prints one line instead of a traceback.

Example:
    >>> ensure_writable("runs/smoke", "--workdir")
    PosixPath('runs/smoke')
    >>> disk_failure(OSError(errno.ENOSPC, "No space left on device", "runs/x/a.json"))
    'runs/x/a.json: no space left on device; free some space or use another location'
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from covidnet_jax.errors import UserError

# The OS errors that mean "the disk refused the write", as the user should read them.
_REASONS: dict[int, str] = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}
# TensorStore (Orbax's array writer) reports OS errors as text: `... "PATH" ... [os_error_code='28']`.
_TS_CODE = re.compile(r"os_error_code='?(\d+)'?")
_TS_PATH = re.compile(r'"(/[^"]+)"')
# Orbax writes a step into `<checkpoint dir>/<step>.orbax-checkpoint-tmp...`: name the folder.
_ORBAX_TMP = re.compile(r"/[^/]*\.orbax-checkpoint-tmp.*$")
# Python's own text of an OSError wrapped into another exception: `[Errno 28] ...: 'PATH'`.
_PY_CODE = re.compile(r"\[Errno (\d+)\][^'\n]*(?:'([^'\n]+)')?")


class DiskError(UserError):
    """A folder a command must write to cannot be written (permissions, read-only, full)."""


def ensure_writable(path: str | Path, what: str, *, create: bool = True) -> Path:
    """Checks that files can be created in the folder `path`, by creating and removing one.

    Args:
        path: the folder.
        what: how the user named it, for the message (e.g. "--workdir").
        create: create the folder (and its parents) if missing; with False nothing is
            created and the deepest existing folder on the way is probed instead.

    Returns:
        `path`.

    Raises:
        DiskError: "<path>: <what> is not writable (<reason>); <fix>", one line (naming
            the existing folder that refuses, when `path` itself does not exist yet).
    """
    path = Path(path)
    probe_dir = path
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _not_writable(err, Path(err.filename or path), what) from None
    else:
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise DiskError(f"{probe_dir}: {what} is not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".covidnet-write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _not_writable(err, path, what, refusing=probe_dir) from None
    return path


def _not_writable(
    err: OSError, where: Path, what: str, *, refusing: Path | None = None
) -> DiskError:
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return DiskError(f"{where}: {what} is not a folder; choose another {what}")
    reason = _REASONS.get(err.errno or 0) or err.strerror or str(err)
    if refusing is not None and refusing != where:
        reason = f"{refusing}: {reason}"  # `where` does not exist yet; its parent refuses
    fix = _fix(err.errno or 0, f"choose another {what}")
    return DiskError(f"{where}: {what} is not writable ({reason}); {fix}")


def _fix(code: int, elsewhere: str) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free some space or {elsewhere}"
    if code in (errno.EACCES, errno.EPERM):
        return f"check its permissions or {elsewhere}"
    return elsewhere


def disk_failure(err: BaseException) -> str | None:
    """A one-line message if `err` is, or was caused by, a write the disk refused.

    Looks through the exception chain (`__cause__`, `__context__`, exception groups) for
    an `OSError` whose errno is EACCES, EPERM, EROFS, ENOSPC or EDQUOT, and through the
    text of other exceptions for such an OS error code (TensorStore's
    `[os_error_code='28']`, Python's `[Errno 28]`).

    Args:
        err: the exception a command raised.

    Returns:
        "<path>: <reason>; <fix>" (the path when known), or None when `err` is something
        else (a bug, which keeps its traceback).
    """
    found = [
        match
        for link in _chain(err)
        if (match := _from_os_error(link) if isinstance(link, OSError) else _from_text(str(link)))
    ]
    if not found:
        return None
    # The nearest report that names a path (an OSError re-raised bare may not).
    code, path = next((m for m in found if m[1]), found[0])
    where = f"{path}: " if path else ""
    return f"{where}{_REASONS[code]}; {_fix(code, 'use another location')}"


# Loggers through which Orbax's background threads (absl) and unretrieved futures (asyncio)
# report each failed write of a checkpoint, with its traceback: hundreds of lines for one
# full disk.
_NOISY_LOGGERS = ("absl", "asyncio")
# After a failed write, TensorStore may still call back into the asyncio loop Orbax has
# closed; each such call is reported as an unraisable "Event loop is closed" (sometimes
# before the failure itself is logged), and the abandoned writes as coroutines never awaited.
_LOOP_CLOSED = "Event loop is closed"


class _DropDiskFailures(logging.Filter):
    """Drops log records about a write the disk refused (the command reports it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and disk_failure(error) is not None:
            return False
        return _from_text(record.getMessage()) is None


_FILTER = _DropDiskFailures()


def _unraisable_filter(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """`sys.unraisablehook` less the reports of a refused write and of their aftermath."""

    def filtered(unraisable: Any) -> object:
        error = unraisable.exc_value
        if error is not None and (
            disk_failure(error) is not None
            or (isinstance(error, RuntimeError) and str(error) == _LOOP_CLOSED)
        ):
            return None
        return hook(unraisable)

    filtered.wrapped = hook  # type: ignore[attr-defined]
    return filtered


@contextlib.contextmanager
def quiet_disk_failures(*, restore: bool = True) -> Iterator[None]:
    """Within the block, libraries' reports of a write the disk refused are dropped.

    The command line reports such a failure itself, in one line (`disk_failure`); Orbax
    would otherwise log every failed write of a checkpoint from its background threads
    (absl and asyncio log records with tracebacks, and unraisable "Event loop is closed"
    errors from TensorStore callbacks, which are never actionable). Everything else passes.

    Args:
        restore: undo on leaving the block; False keeps the filters for the rest of the
            process (for the console script: unretrieved futures are reported while the
            interpreter shuts down).
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    added = [lg for lg in loggers if _FILTER not in lg.filters]
    for lg in added:
        lg.addFilter(_FILTER)
    previous = sys.unraisablehook
    if not hasattr(previous, "wrapped"):
        sys.unraisablehook = _unraisable_filter(previous)
    try:
        yield
    finally:
        if restore:
            for lg in added:
                lg.removeFilter(_FILTER)
            if getattr(sys.unraisablehook, "wrapped", None) is previous:
                sys.unraisablehook = previous


def silence_abandoned_writes() -> None:
    """Hides, for the rest of the process, Python's warnings about the coroutines of writes
    abandoned after a refused write (printed at exit). Call it once the failure is reported."""
    warnings.filterwarnings(
        "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
    )


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and every exception it was raised from or during, each once, nearest first."""
    seen: set[int] = set()
    order: list[BaseException] = []
    pending: list[BaseException | None] = [err]
    while pending:
        link = pending.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        order.append(link)
        if isinstance(link, BaseExceptionGroup):
            pending.extend(link.exceptions)
        pending.extend((link.__cause__, link.__context__))
    return order


def _from_os_error(err: OSError) -> tuple[int, str] | None:
    if err.errno not in _REASONS:
        return None
    path = err.filename if err.filename is not None else ""
    return err.errno, _shorten(os.fsdecode(path) if isinstance(path, bytes) else str(path))


def _from_text(text: str) -> tuple[int, str] | None:
    match = _TS_CODE.search(text)
    if match and int(match.group(1)) in _REASONS:
        paths = _TS_PATH.findall(text)
        return int(match.group(1)), _shorten(paths[-1]) if paths else ""
    match = _PY_CODE.search(text)
    if match and int(match.group(1)) in _REASONS:
        return int(match.group(1)), _shorten(match.group(2) or "")
    return None


def _shorten(path: str) -> str:
    """A path inside an unfinished Orbax checkpoint step, as its checkpoint folder."""
    return _ORBAX_TMP.sub("", path)
