"""Search efficiency: how fast each strategy finds the first design that meets the requirements.

For every strategy and seed, a search runs in a fresh workdir with `stop_on_feasible` and one
worker, and we record, up to and including the first trial that meets every requirement:
the number of training jobs (a candidate trained at one rung is one job), the training steps
spent, and the wall time from the first trial's start. Seeds that find nothing within the
trial budget count as "not found" (their medians are taken over the seeds that did, and the
count is reported).

Two modes:

- `--mode train` (the real thing): the quickstart experiment (`--config`), trained with JAX.
- `--mode surrogate`: the same loop with `search.execution.surrogate.SurrogateEvaluator` on a fixed
  task around the `tiny` prototype at 64 px, so many seeds and ablations take seconds. Its
  "steps" are the surrogate's simulated training steps; its wall times mean nothing.

Ablations (`--ablations STRATEGY`): that strategy without the cost pre-filter (over-budget
designs are trained too, and the strategy gets no cost check), without successive halving
(every candidate trains straight to the last rung), without weight inheritance (children
start from scratch; real training only, the surrogate ignores inherited weights).

Examples:
    python bench/search_efficiency.py --mode surrogate --seeds 10 --ablations evolution
    python bench/search_efficiency.py --mode train --config experiments/quickstart.yaml \\
        --strategies random,shrink --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from covidnet_jax import presets
from search.ledger import store
from search.ledger.records import TrialRecord

SURROGATE_TASK = {
    "space": {
        "prototype": "tiny",
        "stage_depths": [[1, 3], [1, 2]],
        "stage_width": {"min": 0.5, "max": 2.0, "step": 0.25},
        "module_width": {"min": 0.25, "max": 2.0, "step": 0.25},
        "kernel_sizes": [3, 5],
        "connectivity": ["dense", "residual"],
    },
    "requirements": {
        "max_macs": 2.0e6,
        "min_accuracy": 0.8,
        "classes": {"COVID-19": {"min_sensitivity": 0.7}},
        "decision": "point",  # the surrogate's metrics are exact functions of the spec
    },
    "objective": "min_macs",
    "strategy": {"name": "random"},
    "budget": {"max_trials": 60, "rungs": [100, 300], "reduction_factor": 3},
}

ABLATIONS = {
    "no cost pre-filter": {"budget.cost_prefilter": False},
    "no successive halving": {"budget.rungs": "last"},
    "no weight inheritance": {"strategy.inherit_weights": False},
}


def first_feasible(records: list[TrialRecord]) -> dict | None:
    """Jobs, steps and seconds spent until the first design that met the requirements."""
    jobs = steps = 0
    start = min((r.started for r in records if r.started is not None), default=None)
    for r in sorted(records, key=lambda r: (r.completed or float("inf"), r.number)):
        previous = 0
        for rung in r.rungs:
            jobs += 1
            steps += rung.steps - previous
            previous = rung.steps
        if r.is_trained and r.feasible:
            return {
                "trial": r.number,
                "jobs": jobs,
                "steps": steps,
                "seconds": (r.completed or 0.0) - (start or 0.0),
                "proposals": sum(1 for x in records if x.number <= r.number),
            }
    return None


def _set(data: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    if value == "last":
        value = [data[leaf][-1]]
    data[leaf] = value


def run_surrogate(strategy: str, seed: int, changes: dict, root: Path) -> dict | None:
    """One surrogate search; its first-feasible figures."""
    from search.execution.runner import run_worker
    from search.execution.surrogate import SurrogateEvaluator, surrogate_job

    data = copy.deepcopy(SURROGATE_TASK)
    data["strategy"]["name"] = strategy
    data["seed"] = seed
    data["budget"]["stop_on_feasible"] = True
    for key, value in changes.items():
        _set(data, key, value)
    workdir = Path(tempfile.mkdtemp(dir=root))
    prototype = presets.get_preset("tiny").with_input_size(64)
    run_worker(surrogate_job(data, workdir, prototype=prototype), SurrogateEvaluator())
    study = store.load_study(store.open_storage(workdir), workdir.name)
    return first_feasible(store.read_records(study))


def run_training(config: str, strategy: str, seed: int, changes: dict, root: Path) -> dict | None:
    """One real search in a fresh process; its first-feasible figures.

    A fresh process per search, so that no search starts with another's compiled steps:
    the in-process step cache and JAX's process-wide persistent compilation cache would
    otherwise hand a strategy that proposes the same design for every seed (shrink) its
    compiles for free after the first seed.
    """
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_training, config, strategy, seed, changes, root).result()


def _run_training(config: str, strategy: str, seed: int, changes: dict, root: Path) -> dict | None:
    from search.execution.runner import run_search
    from search.execution.session import prepare_job
    from search.execution.training import load_experiment

    overrides = [
        f"search.strategy.name={strategy}",
        f"search.seed={seed}",
        "search.budget.stop_on_feasible=true",
    ]
    experiment = load_experiment(config, tuple(overrides))
    for key, value in changes.items():
        if value == "last":
            value = [experiment.search.budget.rungs[-1]]
        overrides.append(f"search.{key}={json.dumps(value)}")
    experiment = load_experiment(config, tuple(overrides))
    workdir = Path(tempfile.mkdtemp(dir=root))
    job = prepare_job(experiment, workdir, None, time.time())
    outcome = run_search(job, workers=1, console=None)
    return first_feasible(outcome.records)


def inheritance_check(config: str, workdir: str, children: int, root: Path) -> list[dict]:
    """Trains children of a finished search's best trained design for one rung, from scratch
    and from the parent's checkpoint (weight inheritance), and compares validation metrics."""
    import dataclasses

    from covidnet_jax.arch import spec_from_json
    from covidnet_jax.train import train_and_evaluate
    from search.execution.training import candidate_config, load_experiment
    from search.reporting.leaderboard import ranked
    from search.strategies.space import SearchSpace

    experiment = load_experiment(config)
    storage = store.open_storage(workdir)
    study = store.load_study(storage, Path(workdir).resolve().name)
    records = store.read_records(study)
    parent = ranked(records, experiment.search.objective)[0]
    prototype = spec_from_json(study.user_attrs["prototype"])
    space = SearchSpace(experiment.search.space, prototype, prototype.class_names)
    steps = experiment.search.budget.rungs[0]
    results = []
    for note, genome in space.mutation_options(parent.params)[:children]:
        spec = space.decode(genome)
        row = {"parent": parent.number, "mutation": note, "steps": steps}
        for label, init_from in (
            ("scratch", None),
            ("inherited", Path(workdir) / "trials" / str(parent.number)),
        ):
            run_dir = Path(tempfile.mkdtemp(dir=root))
            cfg = candidate_config(experiment.training, spec, steps, run_dir / "trials" / "x")
            cfg = dataclasses.replace(cfg, compile_cache_dir=str(root / "compile_cache"))
            result = train_and_evaluate(
                cfg, run_dir, spec=spec, init_from=init_from, show_progress=False
            )
            row[label] = {
                "val_accuracy": result.metrics.accuracy,
                "inherited": f"{result.inherited}/{result.inheritable}",
            }
        results.append(row)
        print(row, file=sys.stderr)
    return results


def summarize(name: str, results: list[dict | None]) -> dict:
    """Median and range of each figure over all seeds (a seed that found nothing counts as
    infinite, so a median over mostly failed seeds is infinite too)."""
    found = [r for r in results if r is not None]
    row = {"name": name, "seeds": len(results), "found": len(found)}
    for key in ("jobs", "steps", "seconds", "proposals"):
        values = [math.inf if r is None else r[key] for r in results]
        row[key] = (statistics.median(values), min(values), max(values))
    row["runs"] = results
    return row


def _cell(triple: tuple, digits: int = 0) -> str:
    median, low, high = ("not found" if math.isinf(v) else f"{v:.{digits}f}" for v in triple)
    return f"{median} ({low} to {high})"


def markdown(rows: list[dict], mode: str) -> str:
    """The results as a markdown table."""
    lines = [
        "| strategy | found | trainings | training steps | wall time s | proposals |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = "n/a (surrogate)" if mode == "surrogate" else _cell(row["seconds"])
        lines.append(
            f"| {row['name']} | {row['found']}/{row['seeds']} | {_cell(row['jobs'])} | "
            f"{_cell(row['steps'])} | {seconds} | {_cell(row['proposals'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("surrogate", "train"), default="surrogate")
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--strategies", default="random,evolution,shrink,tpe")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--ablations", help="this strategy without each ingredient (e.g. --ablations shrink)"
    )
    parser.add_argument("--max-trials", type=int, help="proposals per search (default: the task's)")
    parser.add_argument("--out", help="write the raw results as JSON here")
    parser.add_argument(
        "--inheritance-check",
        metavar="WORKDIR",
        help="instead: train children of this finished search's best design from scratch and "
        "with inherited weights (--mode train only)",
    )
    parser.add_argument("--children", type=int, default=2)
    args = parser.parse_args(argv)

    # The journal fsyncs every write; surrogate searches are all writes, so use tmpfs if any.
    shm = "/dev/shm" if args.mode == "surrogate" and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="search-efficiency-", dir=shm))
    if args.inheritance_check:
        rows = inheritance_check(args.config, args.inheritance_check, args.children, root)
        print(json.dumps(rows, indent=2))
        return 0
    common = {} if args.max_trials is None else {"budget.max_trials": args.max_trials}
    variants = [(s, s, {}) for s in args.strategies.split(",")]
    if args.ablations:
        variants += [
            (f"{args.ablations}, {name}", args.ablations, changes)
            for name, changes in ABLATIONS.items()
            if not (args.mode == "surrogate" and "inherit" in name)  # the surrogate ignores it
        ]
    rows = []
    for name, strategy, changes in variants:
        results = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            started = time.time()
            if args.mode == "surrogate":
                result = run_surrogate(strategy, seed, {**common, **changes}, root)
            else:
                result = run_training(args.config, strategy, seed, {**common, **changes}, root)
            results.append(result)
            print(f"{name} seed {seed}: {result} ({time.time() - started:.0f}s)", file=sys.stderr)
        rows.append(summarize(name, results))
    print(markdown(rows, args.mode))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
