"""Runs (or resumes) a small surrogate search that SIGKILLs itself at a chosen moment.

Used by test_fault_injection.py and bench/fault_injection.py; not a test module.

    python tests/fault_driver.py WORKDIR SITE N [MAX_TRIALS]

SITE is where the process kills itself, on the N-th time it gets there:
  suggest   a gene is drawn (between `study.ask` and the end of `space.suggest`)
  tell      a trial is about to be told its final state (its record is written)
  enqueue   a lost or failed trial's retry is about to be enqueued
  unlink    a file inside a `checkpoints` directory is being deleted (Orbax retention)
  save      an Orbax checkpoint is being finalized (its temporary directory renamed)
  none      never (the parent may kill it from outside at a random moment)
The search trains with real (tiny) Orbax checkpoints, one step kept, so deletions happen.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import optuna
from search_support import PROTOTYPE, settings

from search.execution.runner import run_search, settle
from search.execution.surrogate import surrogate_job

SITES = ("suggest", "tell", "enqueue", "unlink", "save", "none")


def die_on(n: int):
    """A counter that SIGKILLs this process on its n-th call."""
    calls = [0]

    def hit() -> None:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def wrap(owner, name: str, before) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def arm(site: str, n: int) -> None:
    hit = die_on(n)
    if site == "suggest":
        wrap(optuna.trial.Trial, "suggest_int", lambda *a, **k: hit())
        wrap(optuna.trial.Trial, "suggest_categorical", lambda *a, **k: hit())
    elif site == "tell":
        wrap(optuna.Study, "tell", lambda *a, **k: hit())
    elif site == "enqueue":
        wrap(optuna.Study, "enqueue_trial", lambda *a, **k: hit())
    elif site == "unlink":

        def in_checkpoints(path, *args, dir_fd=None, **kwargs) -> None:
            where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
            if "checkpoints" in os.path.join(where, os.fsdecode(path)):
                hit()

        wrap(os, "unlink", in_checkpoints)
    elif site == "save":

        def finalizing(src, dst, *args, **kwargs) -> None:
            if "checkpoints" in os.fsdecode(dst):
                hit()

        wrap(os, "rename", finalizing)
        wrap(os, "replace", finalizing)


def job_for(workdir: Path, max_trials: int):
    data = settings(
        **{
            "strategy.name": "evolution",
            "budget.max_trials": max_trials,
            "budget.rungs": [4, 12],
            "budget.reduction_factor": 2,
            "requirements.max_macs": 8.0e6,
            "heartbeat": {"interval_s": 0.5, "grace_s": 30},
        }
    )
    return surrogate_job(data, workdir, prototype=PROTOTYPE, seconds_per_step=0.02, orbax_every=2)


def main(argv: list[str]) -> int:
    workdir, site, n = Path(argv[0]), argv[1], int(argv[2])
    max_trials = int(argv[3]) if len(argv) > 3 else 6
    assert site in SITES, site
    job = job_for(workdir, max_trials)
    if site != "none":
        arm(site, n)
    run_search(job, workers=1)
    settle(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
