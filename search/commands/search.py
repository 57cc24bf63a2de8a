"""`covidnet search`: run or resume a design exploration.

    covidnet search --config experiments/quickstart.yaml --workdir runs/quickstart
    covidnet search --config FILE --workers 2                   # two worker processes
    covidnet search --config FILE --storage postgresql+psycopg2://user@host/db
    covidnet search --config FILE --set search.budget.max_trials=40

Running the same command again resumes: finished trials are kept, trials of workers that
died are retried, and the strategy continues from the trial store.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import yaml
from rich.console import Console

from covidnet_jax.data import load_data
from covidnet_jax.errors import ConfigError
from covidnet_jax.typed_yaml import to_dict
from search import store
from search.evaluation import AnalyticCost
from search.finish import RunLog, describe_run, finish_best
from search.leaderboard import count_statuses, leaderboard_table, write_leaderboard
from search.requirements import check_class_names, format_verdicts
from search.runner import SearchJob, run_search
from search.training import (
    SearchExperiment,
    TrainingEvaluator,
    load_experiment,
    load_prototype,
)


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
    parser.set_defaults(func=run)


def prepare_job(
    experiment: SearchExperiment, workdir: Path, storage_url: str | None, start: float
) -> SearchJob:
    """Loads the data once (writing the synthetic set if configured) and builds the job.

    Raises:
        ConfigError: the prototype is not a PEPX spec, or a required class is not in the data.
    """
    training = experiment.training
    data = load_data(training.data, seed=training.seed)
    check_class_names(experiment.search.requirements, data.class_names)
    prototype = load_prototype(experiment).with_head_classes(tuple(data.class_names))
    return SearchJob(
        settings_data=experiment.search_data,
        workdir=str(workdir),
        storage_url=storage_url,
        study_name=experiment.search.study_name or workdir.resolve().name,
        prototype_json=prototype.to_json(indent=None),
        class_names=tuple(data.class_names),
        make_evaluator=functools.partial(
            TrainingEvaluator.from_file, experiment.path, experiment.overrides
        ),
        make_cost_model=functools.partial(AnalyticCost, training.train.batch_size),
        deadline=start + experiment.search.budget.max_wall_time_s,
    )


def run(args: argparse.Namespace) -> int:
    """Runs the search and prints the leaderboard and the best design."""
    start = time.time()
    experiment = load_experiment(args.config, tuple(args.overrides))
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    workers = args.workers or experiment.search.workers
    if workers < 1:
        raise ConfigError(f"--workers: expected a count >= 1, got {workers}")
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = {**to_dict(experiment.training), "search": experiment.search_data}
    (workdir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    console = Console()
    console.print(f"[bold]covidnet search[/] {args.config} -> {workdir} ({workers} worker(s))")
    job = prepare_job(experiment, workdir, args.storage, start)
    outcome = run_search(job, workers=workers, console=console, lines=args.no_live)
    settings = experiment.search
    records = outcome.records
    console.print(f"stopped: {'; '.join(outcome.stop_reasons)}")
    evaluator = job.make_evaluator()
    study = store.load_study(store.open_storage(workdir, args.storage), job.study_name)
    console.print(
        f"confirming the best design: {settings.confirm.seeds} further seed(s) on other "
        f"validation splits, up to {settings.confirm.max_candidates} candidate(s)"
    )
    best = finish_best(
        workdir,
        records,
        settings,
        evaluator,
        train_seed=experiment.training.seed,
        log=RunLog(study.user_attrs, study.set_user_attr),
    )
    csv_path, json_path = write_leaderboard(
        workdir,
        records,
        study=job.study_name,
        objective=settings.objective,
        requirements_data=to_dict(settings.requirements),
        best=best.summary,
        confirmation=[run.to_dict() for run in best.tried],
    )
    console.print(
        leaderboard_table(records, settings.objective, requirements=settings.requirements)
    )
    counts = count_statuses(records)
    console.print(
        "proposed {proposed}, infeasible (not trained) {infeasible}, duplicates {duplicate}, "
        "trained {trained}, failed {failed}, feasible {feasible}".format(
            **{
                k: counts.get(k, 0)
                for k in ("proposed", "infeasible", "duplicate", "trained", "failed", "feasible")
            }
        )
    )
    for run in best.tried:
        console.print(f"  {describe_run(run, settings)}", markup=False)
    console.print(best.message)
    if best.summary is not None:
        console.print(
            f"  {best.summary['summary']}\n"
            f"  MACs {best.summary['macs']:,}  params {best.summary['params']:,}  "
            f"steps {best.summary['steps']} (judged on the last checkpoint)\n"
            f"  {workdir / 'best' / 'spec.json'}, {workdir / 'best' / 'train'}",
            markup=False,
        )
        console.print(format_verdicts(best.reports, settings.requirements), markup=False)
        console.print(
            f"verdict on the test split: {best.summary['verdict']} "
            "(met: every lower bound clears its minimum; not met: an upper bound is below it)",
            markup=False,
        )
    console.print(f"leaderboard: {csv_path}, {json_path}")
    console.print(
        f"elapsed {time.time() - start:.0f}s; trial store: "
        f"{args.storage or store.journal_path(workdir)}"
    )
    return 0
