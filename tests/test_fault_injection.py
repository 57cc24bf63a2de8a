"""A small search SIGKILLed again and again, resumed each time, loses and repeats nothing."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from search_support import fast_tmp, read

from covidnet_jax.checkpointing import Checkpoints, finished_steps
from search.ledger.records import proposal_outcomes

__all__ = ["fast_tmp"]  # a fixture

DRIVER = Path(__file__).with_name("fault_driver.py")
MAX_TRIALS = 6
# Where the driver kills itself, each with the call count that triggers it. Every site of
# the list is used at least once; the rest of the kills come from outside at random times.
SITES = {
    "suggest": (1, 12),  # between ask and the last gene drawn
    "tell": (1, 4),  # the trial's record written, its state not yet told
    "enqueue": (1, 1),  # a lost trial marked, its retry not yet enqueued
    "unlink": (1, 20),  # Orbax deleting an old step
    "save": (1, 6),  # Orbax finalizing a step
}


def _run(
    workdir: Path, site: str, n: int, kill_after_s: float | None, max_trials: int = MAX_TRIALS
) -> int:
    process = subprocess.Popen(
        [sys.executable, str(DRIVER), str(workdir), site, str(n), str(max_trials)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after_s is not None:
        try:
            process.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL), err[-3000:]
    return process.returncode


def _schedule(rng: random.Random, timed: int) -> list[tuple[str, int, float | None]]:
    kills: list[tuple[str, int, float | None]] = [
        (site, rng.randint(*counts), None) for site, counts in SITES.items()
    ]
    kills += [("none", 0, rng.uniform(2.5, 7.0)) for _ in range(timed)]
    rng.shuffle(kills)
    return kills


def test_repeated_sigkills_lose_and_repeat_no_proposal(fast_tmp):
    workdir = fast_tmp / "faults"
    rng = random.Random(20261201)
    killed: Counter[str] = Counter()
    max_trials = MAX_TRIALS
    for site, n, after in _schedule(rng, timed=7):
        for _ in range(3):
            if _run(workdir, site, n, after, max_trials) == -signal.SIGKILL:
                killed[site] += 1
                break
            # The search ended before this kill landed: resume it with a larger budget
            # (a resume may raise it) so that there is work left to kill.
            max_trials += 3
    # A timed kill that came after its run had ended did not land: draw more until ten have
    # (bounded), so the count below does not depend on how fast this machine is today.
    for _ in range(10):
        if sum(killed.values()) >= 10:
            break
        if _run(workdir, "none", 0, rng.uniform(2.0, 5.0), max_trials) == -signal.SIGKILL:
            killed["none"] += 1
        else:
            max_trials += 3
    runs = 0
    while _run(workdir, "none", 0, None, max_trials) != 0:  # resume until it ends by itself
        runs += 1
        assert runs < 3
    assert sum(killed.values()) >= 10, killed
    for site in ("suggest", "tell", "unlink"):
        assert killed[site], f"no kill landed at {site}: {killed}"

    records = read(workdir)
    assert not [r.number for r in records if r.state in ("RUNNING", "WAITING")]
    outcomes = proposal_outcomes(records)
    # Said in full when it fails. It once found one outcome too few (a kill right after
    # `study.ask` left an ownerless trial counted in the budget until settle abandoned it);
    # the runner now records the owner inside the ask and settle proposes the freed budget
    # (tests/test_search_store.py covers both deterministically).
    without_outcome = sorted(
        {r.number for r in records if r.is_proposal} - {o.origin for o in outcomes}
    )
    assert len(outcomes) == max_trials, (
        f"every proposal of the budget was made once: {len(outcomes)} outcomes, budget "
        f"{max_trials}; proposals without an outcome {without_outcome}; abandoned "
        f"{[r.number for r in records if r.abandoned]}; statuses "
        f"{dict(Counter(r.status for r in records))}; retries "
        f"{[(r.number, r.retry_of, r.origin) for r in records if r.retry_of is not None]}"
    )
    assert [o.final.status for o in outcomes if not o.settled] == [], "0 lost"
    assert all(o.trained <= 1 for o in outcomes), "0 trained twice"
    assert sum(o.losses for o in outcomes) >= 1, "the kills did cost trials their workers"
    trained = Counter(r.spec_hash for r in records if r.status == "trained")
    assert set(trained.values()) == {1}, "no spec trained twice"
    # Every finished checkpoint restores, with the arrays its step wrote.
    restored = 0
    for directory in sorted(workdir.glob("trials/*/checkpoints")):
        with Checkpoints(directory, read_only=True) as ckpts:
            assert ckpts.steps() == finished_steps(directory)
            for step in ckpts.steps():
                state = ckpts.restore_arrays(step)
                np.testing.assert_array_equal(state["w"], np.full((64, 64), step, np.float32))
                restored += 1
    assert restored >= 1


def test_a_kill_between_the_mark_and_the_enqueue_is_repaired(fast_tmp):
    # A worker marks a trial lost, then dies before enqueueing its retry: the next recovery
    # pass sees a lost trial without a retry and enqueues it.
    workdir = fast_tmp / "repair"
    assert _run(workdir, "tell", 1, None) == -signal.SIGKILL  # leaves a running trial behind
    assert _run(workdir, "enqueue", 1, None) == -signal.SIGKILL
    lost = [r for r in read(workdir) if r.status == "lost"]
    assert lost and not [r for r in read(workdir) if r.retry_of is not None]
    start = time.monotonic()
    assert _run(workdir, "none", 0, None) == 0
    assert time.monotonic() - start < 120
    outcomes = proposal_outcomes(read(workdir))
    assert len(outcomes) == MAX_TRIALS and all(o.settled for o in outcomes)
    retried = {r.retry_of for r in read(workdir)}
    assert {r.number for r in lost} <= retried
