"""One "host" of a search shared by several: its own workdir, a shared PostgreSQL study and a
shared artifact root. Used by test_many_hosts.py; not a test module.

    python tests/host_driver.py WORKDIR ARTIFACTS STORAGE_URL LOGDIR MODE

MODE: `worker` (train until the budget is spent, no finish) or `full` (then finish: settle,
take the finisher lease, confirm and score the test split once). Training is the surrogate
with real (tiny) Orbax checkpoints, slow enough to be killed mid-run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from search_support import PROTOTYPE, settings

from search.execution.runner import run_search
from search.execution.session import conclude
from search.execution.surrogate import surrogate_job

STUDY = "shared"
MAX_TRIALS = 8


def job_for(workdir: Path, artifacts: Path, storage_url: str, logdir: Path):
    data = settings(
        **{
            "strategy.name": "evolution",
            "strategy.startup_trials": 2,
            "budget.max_trials": MAX_TRIALS,
            "budget.rungs": [8],
            "requirements.max_macs": 1.0e7,
            "requirements.min_accuracy": 0.5,
            "requirements.classes": {},
            "confirm": {"seeds": 0},
            "heartbeat": {"interval_s": 0.5, "grace_s": 5},
        }
    )
    job = surrogate_job(
        data,
        workdir,
        prototype=PROTOTYPE,
        storage_url=storage_url,
        tau=10.0,
        seconds_per_step=0.15,
        orbax_every=2,
        test_log=str(logdir / "test.log"),
        train_log=str(logdir / "train.log"),
    )
    return dataclasses.replace(job, study_name=STUDY, artifacts=str(artifacts))


def main(argv: list[str]) -> int:
    workdir, artifacts, storage_url, logdir, mode = argv
    job = job_for(Path(workdir), Path(artifacts), storage_url, Path(logdir))
    Path(workdir).mkdir(parents=True, exist_ok=True)
    run_search(job, workers=1)
    if mode == "full":
        conclude(job, train_seed=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
