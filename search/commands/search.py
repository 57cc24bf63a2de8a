"""`covidnet search`: run or resume a design exploration.

    covidnet search --config experiments/quickstart.yaml --workdir runs/quickstart
    covidnet search --config FILE --workers 2                   # two worker processes
    covidnet search --config FILE --storage postgresql+psycopg2://user@host/db
    covidnet search --config FILE --set search.budget.max_trials=40

Running the same command again resumes: finished trials are kept, trials of workers that
died are retried, and the strategy continues from the trial store.

At the end the best feasible design is confirmed (search.confirm.seeds more runs from scratch,
each judged on other validation patients; the next design is tried if one fails), trained to
full fidelity in WORKDIR/best/train and scored on the test split once. The summary states
each requirement on validation and test with 95% intervals and a verdict: met / not met /
inconclusive. Requirements are judged on the lower confidence bound of each validation rate
(search.requirements.decision: lower_bound; `point` judges the rate itself).

Many machines: every host runs the same command with `--storage` (one PostgreSQL study) and
`--set search.artifact_root=/shared/dir` (a file system all hosts mount); `--worker` hosts
only train, one plain invocation finishes. Or `--ray ADDRESS` runs the workers as tasks on
a Ray cluster.

From Python: `search.run("experiments/quickstart.yaml", "runs/quickstart")` does the same and
returns a SearchResult.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from covidnet_jax.disk import ensure_writable
from search.execution import session
from search.execution.finish import describe_run
from search.execution.training import load_experiment
from search.ledger.requirements import format_verdicts
from search.reporting.leaderboard import leaderboard_table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `search` subcommand."""
    parser = subparsers.add_parser(
        "search",
        help="run or resume a design exploration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="search experiment YAML file")
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--storage",
        help="trial store URL, e.g. postgresql+psycopg2://user@host:5432/db "
        "(default: a journal file in the workdir)",
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes (default: search.workers in the config)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. search.budget.max_trials=10 (repeatable)",
    )
    parser.add_argument(
        "--no-live", action="store_true", help="print one line per trial instead of a live view"
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="join the search as a worker only: train proposals until the budget is spent, "
        "then exit without the finish (start any number on any host with the same --config, "
        "--storage and search.artifact_root; one plain `covidnet search` finishes)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the workers as tasks on the Ray cluster at ADDRESS (e.g. 10.0.0.5:6379; "
        "one per GPU unless --workers is given); needs pip install 'covidnet-jax[ray]'",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the search (`search.run`) and prints the leaderboard and the verdict."""
    experiment = load_experiment(args.config, tuple(args.overrides))
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    ensure_writable(workdir, "--workdir", create=False)  # fails now, not mid-search
    workers = experiment.search.workers if args.workers is None else args.workers
    # Logs and pipes get a wide console: the leaderboard's columns do not fit 80.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(f"[bold]covidnet search[/] {args.config} -> {workdir} ({workers} worker(s))")
    result = session.run(
        experiment,
        workdir,
        storage=args.storage,
        workers=args.workers,
        console=console,
        lines=args.no_live,
        finish=not args.worker,
        ray=args.ray,
    )
    settings = experiment.search
    records, best = result.records, result.best
    console.print(
        leaderboard_table(records, settings.objective, requirements=settings.requirements)
    )
    if best is None:  # a worker: the finish is another invocation's
        console.print(
            f"worker done ({'; '.join(result.stop_reasons)}); {result.counts['proposed']} "
            "proposals in the study. The finish (confirmation, test split) runs in a plain "
            "`covidnet search` on the same study.",
            markup=False,
            soft_wrap=True,
        )
        return 0
    artifacts = result.artifact_dir
    counts = result.counts
    console.print(
        "proposed {proposed}, infeasible (not trained) {infeasible}, duplicates {duplicate}, "
        "trained {trained}, failed {failed}, feasible {feasible}; workers lost {lost} "
        "time(s), retried {retried}".format(
            **{
                k: counts.get(k, 0)
                for k in (
                    "proposed",
                    "infeasible",
                    "duplicate",
                    "trained",
                    "failed",
                    "feasible",
                    "lost",
                    "retried",
                )
            }
        )
    )
    if counts.get("unsettled"):
        console.print(
            f"{counts['unsettled']} proposal(s) not finished (running elsewhere, or their "
            "retry is waiting): run the same command again to train them"
        )
    for run_ in best.tried:
        console.print(f"  {describe_run(run_, settings)}", markup=False, soft_wrap=True)
    console.print(best.message)
    if best.summary is not None:
        console.print(
            f"  {best.summary['summary']}\n"
            f"  MACs {best.summary['macs']:,}  params {best.summary['params']:,}  "
            f"steps {best.summary['steps']} (judged on the last checkpoint)\n"
            f"  {artifacts / 'best' / 'spec.json'}, {artifacts / 'best' / 'train'}",
            markup=False,
            soft_wrap=True,
        )
        console.print(
            format_verdicts(best.reports, settings.requirements), markup=False, soft_wrap=True
        )
        console.print(
            f"verdict on the test split: {best.summary['verdict']} "
            "(met: every lower bound clears its minimum; not met: an upper bound is below it)",
            markup=False,
            soft_wrap=True,
        )
    console.print(f"leaderboard: {result.leaderboard_csv}, {result.leaderboard_json}")
    console.print(f"elapsed {result.elapsed_s:.0f}s; trial store: {result.trial_store}")
    return 0
