"""What the search gets done in a fixed wall time with each `search.executables` setting.

Runs the quickstart design exploration (`experiments/quickstart.yaml`: two worker processes,
as `make search` runs it) as workers only (`--worker`: no finish), with
`search.budget.max_wall_time_s` = `--seconds` and no trial cap, once per setting of
`search.executables` (exact, shared, auto) and `--repeats` times over, the settings' order
rotated each repeat so that a change of machine load hits every setting alike. The data of
every resolution is prepared beforehand, outside the budget.

For each run it reports, from the trials' `metrics.jsonl` files and the trial store:
- candidate-rungs: rung trainings finished (a design trained to 100 then 300 steps is 2);
- designs trained; compiles (a candidate's train and eval steps compiled by XLA) and cache
  reads (all of them read from the persistent compilation cache, written by the other worker
  or an earlier trial: cheaper, not free);
- compile share: compile seconds (cache reads included) / (compile + train + eval seconds)
  over all candidates;
- feasible designs, and the best design by the search's own rank (`rank_key`): its MACs and
  whether it met the requirements (lower confidence bounds on the validation split).

Then per setting the median over repeats (and the range), each run's candidate-rungs as a
ratio to `exact`'s in the same repeat, and the issue's targets: `auto` trains >= 2.5x
`exact`'s candidate-rungs, compiles take <= 25% of candidate compute, and the best design is
as good (no more MACs, feasible) or better.

    python bench/search_throughput.py                       # 360 s x 3 settings x 2 repeats
    python bench/search_throughput.py --seconds 150 --repeats 1 --modes exact,auto
    python bench/search_throughput.py --json bench/results/search_throughput.json

Results are recorded in bench/README.md ("Search throughput").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERIMENT = "experiments/quickstart.yaml"
MODES = ("exact", "shared", "auto")


def prepare_data() -> None:
    """Writes and caches the quickstart data at every resolution the space searches."""
    from covidnet_jax.data import load_data
    from search.execution.training import load_experiment

    experiment = load_experiment(EXPERIMENT)
    for resolution in experiment.search.space.resolutions:
        config = dataclasses.replace(experiment.training.data, resolution=resolution)
        load_data(config, seed=experiment.training.seed)


def run_search(mode: str, seconds: float, workdir: Path, workers: int) -> dict:
    """One worker-only quickstart search with `search.executables = mode`; its summary."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [
        sys.executable, "-m", "search.cli", "search", "--config", EXPERIMENT,
        "--workdir", str(workdir), "--worker", "--workers", str(workers), "--no-live",
        "--set", f"search.budget.max_wall_time_s={seconds}",
        "--set", "search.budget.max_trials=100000",
        "--set", f"search.executables={mode}",
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"search ({mode}) exited {done.returncode}:\n{done.stderr[-3000:]}")
    return {
        "executables": mode,
        "wall_s": round(wall, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        **summarize(workdir),
    }


def summarize(workdir: Path) -> dict:
    """Counts over every trial run's metrics.jsonl, and the best design by `rank_key`."""
    from search.execution.training import load_experiment
    from search.ledger import store
    from search.ledger.records import rank_key

    rungs = designs = compiles = cache_reads = 0
    compile_s = train_eval_s = 0.0
    for log in sorted(workdir.glob("trials/*/metrics.jsonl")):
        events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ends = [e for e in events if e["event"] == "end"]
        designs += bool(ends)
        rungs += len(ends)
        for e in events:
            if e["event"] == "compile":
                seconds = e["train_step_s"] + e["eval_step_s"]
                compile_s += seconds
                if e.get("cache_misses", 1):  # XLA compiled (logs before the counts: yes)
                    compiles += seconds > 0
                else:  # every program read from the persistent cache
                    cache_reads += e.get("cache_hits", 0) > 0
        train_eval_s += sum(e["train_s"] + e["eval_s"] for e in ends)
    objective = load_experiment(EXPERIMENT).search.objective
    study = store.load_study(store.open_storage(workdir), workdir.name)
    trained = [r for r in store.read_records(study) if r.is_trained]
    best = min(trained, key=lambda r: rank_key(r, objective), default=None)
    return {
        "rungs": rungs,
        "designs": designs,
        "compiles": compiles,
        "cache_reads": cache_reads,
        "compile_s": round(compile_s, 1),
        "train_eval_s": round(train_eval_s, 1),
        "compile_share": round(compile_s / max(compile_s + train_eval_s, 1e-9), 3),
        "feasible": sum(r.feasible for r in trained),
        "best_trial": None if best is None else best.number,
        "best_macs": None if best is None else best.macs,
        "best_feasible": bool(best is not None and best.feasible),
        "best_accuracy": None if best is None else best.last.metrics.accuracy,
    }


def report(runs: list[dict], modes: list[str]) -> dict:
    """Per setting: medians and ranges over repeats, rung ratios to `exact`, the targets."""
    by_mode = {m: [r for r in runs if r["executables"] == m] for m in modes}
    print(f"\n{'executables':12s} {'runs':>5s} {'rungs':>14s} {'designs':>8s} {'compiles+reads':>9s} "
          f"{'compile share':>18s} {'feasible':>9s} {'best MACs (feasible)':>34s}")  # fmt: skip
    summary = {}
    for mode, rows in by_mode.items():
        if not rows:
            continue

        def med(key: str, rows: list[dict] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        def span(key: str, rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{min(values):g}-{max(values):g}" if len(values) > 1 else f"{values[0]:g}"

        best = [r["best_macs"] if r["best_feasible"] else None for r in rows]
        summary[mode] = {
            "rungs_median": med("rungs"),
            "compiles_median": med("compiles"),
            "compile_share_median": med("compile_share"),
            "best_feasible_macs": best,
        }
        compiled = f"{med('compiles'):g}+{med('cache_reads'):g}"
        bests = ", ".join("none" if b is None else f"{b:,}" for b in best)
        print(
            f"{mode:12s} {len(rows):5d} {med('rungs'):6g} ({span('rungs'):>5s}) "
            f"{med('designs'):8g} {compiled:>9s} "
            f"{med('compile_share'):6.2f} ({span('compile_share'):>9s}) "
            f"{med('feasible'):9g} {bests:>34s}"
        )
    if by_mode.get("exact"):
        exact = by_mode["exact"]
        for mode in modes:
            if mode == "exact" or not by_mode[mode]:
                continue
            ratios = [
                r["rungs"] / max(e["rungs"], 1) for r, e in zip(by_mode[mode], exact, strict=True)
            ]
            summary[mode]["rung_ratio_to_exact"] = [round(x, 2) for x in ratios]
            share = summary[mode]["compile_share_median"]
            better = [
                r["best_feasible"] and (not e["best_feasible"] or r["best_macs"] <= e["best_macs"])
                for r, e in zip(by_mode[mode], exact, strict=True)
            ]
            print(
                f"{mode}: candidate-rungs / exact's per repeat "
                f"{', '.join(f'{x:.2f}' for x in ratios)} (target >= 2.5: "
                f"{'met' if min(ratios) >= 2.5 else 'not met'}); compile share {share:.2f} "
                f"(target <= 0.25: {'met' if share <= 0.25 else 'not met'}); best design as "
                f"good or better in {sum(better)} of {len(better)} repeats"
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Each run takes about --seconds plus 40-60 s (start-up, trials in flight).",
    )
    parser.add_argument("--seconds", type=float, default=360, help="proposing wall time per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--modes", default=",".join(MODES), help="settings, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per search")
    parser.add_argument("--dir", type=Path, default=Path("runs/search_throughput_bench"))
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summary")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; expected some of {list(MODES)}")

    prepare_data()
    import jax

    print(
        f"jax {jax.__version__}, {os.cpu_count()} CPUs, quickstart search, {args.workers} "
        f"workers, {args.seconds:g} s of proposing per run, {args.repeats} repeats"
    )
    runs = []
    for repeat in range(args.repeats):
        order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
        for mode in order:
            row = run_search(mode, args.seconds, args.dir / f"{mode}-{repeat}", args.workers)
            row["repeat"] = repeat
            runs.append(row)
            print(
                f"repeat {repeat} {mode:7s} rungs {row['rungs']:3d} designs {row['designs']:3d} "
                f"compiles {row['compiles']:3d} (+{row['cache_reads']} cache reads) share {row['compile_share']:.2f} feasible "
                f"{row['feasible']:3d} best {row['best_macs'] or 0:>9,} "
                f"({'feasible' if row['best_feasible'] else 'infeasible'}) wall "
                f"{row['wall_s']:.0f} s load {row['load_before']:.1f}->{row['load_after']:.1f}",
                flush=True,
            )
    runs.sort(key=lambda r: (r["repeat"], modes.index(r["executables"])))
    summary = report(runs, modes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": plain, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
