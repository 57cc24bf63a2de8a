"""Kill the real quickstart search again and again; count what it loses.

    python bench/fault_injection.py                    # 20 kills, 12 proposals
    python bench/fault_injection.py --kills 30 --seed 1 --out bench/results/faults.json

The quickstart experiment (real JAX training on the bundled synthetic data), cut to
`--max-trials` proposals with short rungs, runs as `covidnet search` with two workers. At
seeded random moments (uniform in `--window` seconds after each start: start-up, compiling,
training, Orbax saves and deletions, between trials, the finish) the bench SIGKILLs either
the whole process group (a pre-empted job, a rebooted machine) or only the parent (a `kill`
of the command: its workers must end too). It resumes with the same command each time, then
lets the last run finish, and reports:

- proposals made, and how many are unsettled (lost for good) or trained more than once;
- how often workers were lost and trials retried;
- orphan worker processes left after a parent-only kill;
- whether every finished checkpoint of every trial restores (Orbax, the arrays' shapes);
- whether the finish ran (leaderboard written; the declared design and its verdict).

The note in bench/README.md, "Kills", records a run. Expect ~1 minute per kill on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from covidnet_jax.checkpointing import Checkpoints, finished_steps  # noqa: E402
from search.ledger import store  # noqa: E402
from search.ledger.records import proposal_outcomes  # noqa: E402


def command(workdir: Path, max_trials: int) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "covidnet"),
        "search",
        "--config",
        str(ROOT / "experiments" / "quickstart.yaml"),
        "--workdir",
        str(workdir),
        "--no-live",
        "--set",
        f"search.budget.max_trials={max_trials}",
        "--set",
        "search.budget.rungs=[40,120]",
        "--set",
        "search.budget.final_steps=150",
        "--set",
        "search.budget.max_wall_time_s=3600",
        "--set",
        "search.confirm.seeds=1",
        "--set",
        "search.heartbeat.grace_s=30",
        # Requirements short runs meet, so that a design is declared and the finish
        # (confirmation, full-fidelity training, test scoring) is killed too.
        "--set",
        "search.requirements.min_accuracy=0.6",
        "--set",
        "search.requirements.classes.COVID-19.min_sensitivity=0.3",
    ]


def run_once(cmd: list[str], log, kill_after: float | None, mode: str) -> tuple[int, bool]:
    """Runs the command, SIGKILLing it (`mode`: its process group, or the parent only)
    after `kill_after` seconds. Returns (exit code, whether processes of the group outlived
    a parent-only kill by 30 s: orphaned workers, which are then killed)."""
    process = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            if mode == "group":
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(signal.SIGKILL)
    code = process.wait()
    orphaned = False
    if mode == "parent" and kill_after is not None:
        # Workers notice their parent is gone (search.execution.runner._end_with_parent) and end.
        deadline = time.monotonic() + 30
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if group_alive(process.pid):
            orphaned = True
            os.killpg(process.pid, signal.SIGKILL)
    return code, orphaned


def run_killed_in_finish(cmd: list[str], log, workdir: Path, after: float) -> int:
    """Runs the command and SIGKILLs its process group `after` seconds after it printed that
    it is confirming the best design (so the kill lands in the confirmation runs, the
    full-fidelity training or the test scoring); returns its exit code."""
    marker = "confirming the best design"
    before = log_text(workdir).count(marker)
    process = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    while process.poll() is None and log_text(workdir).count(marker) == before:
        time.sleep(0.5)
    try:
        process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def log_text(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_text(errors="replace")


def check_checkpoints(workdir: Path) -> tuple[int, list[str]]:
    restored, broken = 0, []
    for directory in sorted(workdir.glob("**/checkpoints")):
        steps = finished_steps(directory)
        if not steps:
            continue
        with Checkpoints(directory, read_only=True) as ckpts:
            for step in steps:
                try:
                    ckpts.restore_arrays(step)
                    restored += 1
                except Exception as err:  # a report, not a crash: count and name it
                    broken.append(f"{directory}/{step}: {type(err).__name__}: {err}")
    return restored, broken


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kills", type=int, default=20, help="SIGKILLs during the search (default: 20)"
    )
    parser.add_argument(
        "--max-trials",
        type=int,
        default=12,
        help="the search's proposal budget (search.budget.max_trials; default: 12)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the kill moments and targets (default: 0)"
    )
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(8.0, 60.0),
        metavar=("LOW", "HIGH"),
        help="a kill lands uniformly LOW..HIGH seconds after each start (default: 8 60)",
    )
    parser.add_argument(
        "--parent-share",
        type=float,
        default=0.3,
        help="share of kills that hit the parent only, not its workers (default: 0.3)",
    )
    parser.add_argument(
        "--finish-kills",
        type=int,
        default=4,
        help="kills during the finish: after the run says it is confirming the best design "
        "(confirmation runs, full-fidelity training, test scoring)",
    )
    parser.add_argument(
        "--finish-window",
        type=float,
        nargs=2,
        default=(3.0, 60.0),
        help="seconds after the finish starts at which a finish kill lands",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "runs" / "bench-faults",
        help="the search's run directory; must not exist yet (default: runs/bench-faults)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the report as JSON to this file"
    )
    args = parser.parse_args()

    if args.workdir.exists():
        raise SystemExit(f"{args.workdir}: exists; remove it or pass another --workdir")
    rng = random.Random(args.seed)
    cmd = command(args.workdir.resolve(), args.max_trials)
    args.workdir.mkdir(parents=True)
    log = open(args.workdir.parent / f"{args.workdir.name}.log", "w")  # noqa: SIM115
    kills, ended_early, orphans = [], 0, 0
    started = time.monotonic()
    while len(kills) < args.kills:
        after = rng.uniform(*args.window)
        mode = "parent" if rng.random() < args.parent_share else "group"
        code, orphaned = run_once(cmd, log, after, mode)
        orphans += orphaned
        if code == 0:
            ended_early += 1  # the search finished before the kill: start a larger one
            cmd = command(args.workdir.resolve(), args.max_trials + 4 * ended_early)
            continue
        kills.append({"after_s": round(after, 1), "mode": mode, "exit": code})
        print(f"kill {len(kills):2d}/{args.kills}: {mode:6s} after {after:5.1f}s", flush=True)
    finish_kills = 0
    while finish_kills < args.finish_kills:
        after = rng.uniform(*args.finish_window)
        code = run_killed_in_finish(cmd, log, args.workdir, after)
        if code == 0:
            break  # the finish completed before the kill: nothing left to kill
        finish_kills += 1
        kills.append({"after_s": round(after, 1), "mode": "finish", "exit": code})
        print(f"finish kill {finish_kills}/{args.finish_kills} after {after:5.1f}s", flush=True)
    code, _ = run_once(cmd, log, None, "group")
    elapsed = time.monotonic() - started

    records = store.read_records(
        store.load_study(store.open_storage(args.workdir), args.workdir.name)
    )
    outcomes = proposal_outcomes(records)
    restored, broken = check_checkpoints(args.workdir)
    best = args.workdir / "best" / "metrics.json"
    board = args.workdir / "leaderboard.json"
    result = {
        "kills": len(kills),
        "confirmations started": log_text(args.workdir).count("confirming the best design"),
        "kill_modes": {
            m: sum(1 for k in kills if k["mode"] == m) for m in ("group", "parent", "finish")
        },
        "final_exit": code,
        "proposals": len(outcomes),
        "unsettled (lost for good)": sum(1 for o in outcomes if not o.settled),
        "trained more than once": sum(1 for o in outcomes if o.trained > 1),
        "worker losses": sum(o.losses for o in outcomes),
        "retries": sum(1 for r in records if r.retry_of is not None),
        "abandoned asks": sum(1 for r in records if r.attrs.get("abandoned")),
        "statuses": {
            s: sum(1 for o in outcomes if o.final.status == s)
            for s in sorted({o.final.status for o in outcomes})
        },
        "orphan workers": orphans,
        "checkpoints restored": restored,
        "checkpoints broken": broken,
        "finished (leaderboard written)": board.exists(),
        "declared (best/metrics.json)": best.exists(),
        "verdict": json.loads(best.read_text())["verdict"] if best.exists() else None,
        "elapsed_s": round(elapsed),
        "seed": args.seed,
        "command": " ".join(cmd[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = (
        code == 0
        and not result["unsettled (lost for good)"]
        and not result["trained more than once"]
        and not broken
        and result["finished (leaderboard written)"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
