"""`search.run`: one call runs (or resumes) a design exploration and returns its result.

The command line (`covidnet search`) is a thin printer around it; Python users call it
directly:

    >>> import search
    >>> result = search.run("experiments/quickstart.yaml", "runs/quickstart")
    >>> result.best.summary["verdict"], result.leaderboard_json
    ('met', PosixPath('runs/quickstart/leaderboard.json'))

What it does, in order: validate the experiment (before any JAX work), write the resolved
`config.yaml`, load the data once (writing the synthetic set if configured), run the workers
against the trial store, confirm the best feasible design and score it on the test split once
(`search.execution.finish`), and write the leaderboard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from rich.console import Console

from covidnet_jax.data import load_data
from covidnet_jax.disk import ensure_writable
from covidnet_jax.errors import ConfigError
from covidnet_jax.typed_yaml import to_dict
from search.execution import identity
from search.execution.evaluation import AnalyticCost
from search.execution.finish import BestDesign, RunLog, finish_best
from search.execution.ray_workers import conclude_on_ray, run_on_ray
from search.execution.runner import SearchJob, run_search, settle
from search.execution.training import (
    SearchExperiment,
    TrainingEvaluator,
    load_experiment,
    load_prototype,
)
from search.ledger import store
from search.ledger.records import TrialRecord
from search.ledger.requirements import check_class_names
from search.reporting.leaderboard import count_statuses, write_leaderboard
from search.strategies.registry import strategy_factory


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a search invocation ended with.

    Attributes:
        workdir: the search's working directory.
        experiment: the validated experiment.
        records: every trial's record.
        best: the confirmed design (`best.summary` is `best/metrics.json`, None when no
            design was confirmed), its per-requirement reports and every confirmation run;
            None for a worker-only invocation (`finish=False`).
        leaderboard_csv: `leaderboard.csv` (None for a worker-only invocation).
        leaderboard_json: `leaderboard.json` (likewise).
        stop_reasons: why each worker stopped.
        elapsed_s: wall time of this call.
        trial_store: the storage URL, or the journal's path.
        artifact_dir: where the trial runs, `best/` and the leaderboard are (the workdir
            unless `search.artifact_root` is set).
    """

    workdir: Path
    experiment: SearchExperiment
    records: list[TrialRecord]
    best: BestDesign | None
    leaderboard_csv: Path | None
    leaderboard_json: Path | None
    stop_reasons: list[str]
    elapsed_s: float
    trial_store: str
    artifact_dir: Path

    @property
    def counts(self) -> dict[str, int]:
        """Trials per status, plus `proposed` and `feasible`."""
        return count_statuses(self.records)


def prepare_job(
    experiment: SearchExperiment,
    workdir: Path,
    storage_url: str | None,
    start: float,
    study_name: str | None = None,
    *,
    wall_time_s: float | None = None,
    artifacts: str = "",
) -> SearchJob:
    """Loads the data once (writing the synthetic set if configured) and builds the job.

    Args:
        experiment: the validated experiment.
        workdir: the search's working directory.
        storage_url: a database URL, or None for the workdir's journal.
        start: epoch seconds the invocation started (the wall-time budget counts from it).
        study_name: the study (default: `search.study_name`, else the workdir's name; see
            `search.execution.identity.resolve_study_name`).
        wall_time_s: proposing time left to this invocation (default: the whole
            `budget.max_wall_time_s`; `run` passes what earlier invocations left).
        artifacts: the resolved artifact root ("": the workdir).

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
        study_name=study_name or experiment.search.study_name or workdir.resolve().name,
        prototype_json=prototype.to_json(indent=None),
        class_names=tuple(data.class_names),
        make_evaluator=functools.partial(TrainingEvaluator.from_experiment, experiment),
        make_cost_model=functools.partial(AnalyticCost, training.train.batch_size),
        deadline=start
        + (experiment.search.budget.max_wall_time_s if wall_time_s is None else wall_time_s),
        strategy=strategy_factory(experiment.search.strategy.name),
        artifacts=artifacts,
    )


def run(
    experiment: SearchExperiment | str | Path,
    workdir: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    storage: str | None = None,
    workers: int | None = None,
    console: Console | None = None,
    lines: bool = False,
    finish: bool = True,
    ray: str | None = None,
) -> SearchResult:
    """Runs or resumes a design exploration to its end.

    Args:
        experiment: an experiment file, one loaded with `search.load_experiment`, or a
            `SearchExperiment` built in Python (then `workdir` is required).
        workdir: the run directory (default `runs/<experiment file name>`); running again
            with the same one resumes.
        overrides: "key.path=value" changes to the experiment file (with a path only).
        storage: a trial-store URL (e.g. PostgreSQL) instead of the workdir's journal.
        workers: worker processes (default `search.workers`).
        console: where progress is drawn (None: silently).
        lines: one line per finished trial instead of a redrawn live panel.
        finish: confirm and test the best design at the end (False: a worker that joins
            the search, trains until the budget is spent and leaves the finish to another
            invocation; see "Many machines" in the README).
        ray: the address of a Ray cluster to run the workers on, as Ray tasks (one per GPU
            unless `workers` is given; `search.execution.ray_workers`).

    Returns:
        The `SearchResult`.

    Raises:
        ConfigError: a bad experiment or argument, before anything is trained.
    """
    start = time.time()
    if not isinstance(experiment, SearchExperiment):
        experiment = load_experiment(experiment, tuple(overrides))
    elif overrides:
        raise ConfigError("overrides: pass them to load_experiment with the file")
    if workdir is None and not experiment.path:
        raise ConfigError("workdir: required for an experiment built in Python (no file name)")
    workdir = Path(workdir or Path("runs") / Path(experiment.path).stem)
    count = experiment.search.workers if workers is None else workers
    if count < 1:
        raise ConfigError(f"--workers: expected a count >= 1, got {count}")
    strategy_factory(experiment.search.strategy.name)  # an unknown name, before any write
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = ""
    if experiment.search.artifact_root:
        root = Path(experiment.search.artifact_root).resolve()
        ensure_writable(root, "search.artifact_root")
        artifacts = str(root)
    say = console.print if console is not None else (lambda *a, **k: None)
    trial_store = store.open_storage(workdir, storage)
    name = identity.resolve_study_name(
        workdir, experiment.search.study_name, None if storage else trial_store
    )
    resolved = {
        **to_dict(experiment.training),
        "search": {**experiment.search_data, "study_name": name, "artifact_root": artifacts},
    }
    defining = identity.identity_of(resolved, load_prototype(experiment).content_hash())
    identity.check_resume(workdir, trial_store, name, defining)  # before anything is written
    _write_atomically(workdir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    settings = experiment.search
    study = store.open_study(trial_store, name, settings.objective)
    study.set_user_attr(identity.IDENTITY_ATTR, defining)
    spent = store.wall_time_spent(study)
    remaining = max(0.0, settings.budget.max_wall_time_s - spent)
    job = prepare_job(
        experiment, workdir, storage, start, name, wall_time_s=remaining, artifacts=artifacts
    )
    proposed = count_statuses(store.read_records(study))["proposed"]
    if remaining <= 0 or proposed >= settings.budget.max_trials:
        say(
            f"the search's budget is spent ({proposed}/{settings.budget.max_trials} proposals, "
            f"{spent:.0f} s of {settings.budget.max_wall_time_s:.0f} s proposing): nothing new "
            "is proposed. To extend it, raise search.budget.max_trials or "
            "search.budget.max_wall_time_s with --set"
        )
    elif spent > 0:
        say(f"resuming: {proposed} proposals and {spent:.0f} s of the wall-time budget spent")
    running = [r for r in store.read_records(study) if r.state == "RUNNING"]
    if running:
        where = ", ".join(f"{r.number} ({r.worker or '?'})" for r in running)
        say(
            f"other processes are running trials of this search ({where}): joining them "
            "as a worker; the finish waits for them (a dead one's trial is retried once its "
            f"heartbeat is {settings.heartbeat.grace_s:.0f} s old)"
        )
    with store.wall_clock(study, settings.heartbeat.interval_s):
        if ray is not None:
            say(f"starting the workers on the Ray cluster at {ray}")
            stop_reasons = run_on_ray(job, ray, workers)
        else:
            stop_reasons = run_search(job, workers=count, console=console, lines=lines).stop_reasons
    say(f"stopped: {'; '.join(stop_reasons)}")
    records, best, csv_path, json_path = store.read_records(study), None, None, None
    if finish and ray is not None:
        say("finishing on the Ray cluster (confirmation, the best design, the test split)")
        records, best, csv_path, json_path = conclude_on_ray(
            job, ray, train_seed=experiment.training.seed
        )
    elif finish:
        records, best, csv_path, json_path = conclude(
            job, train_seed=experiment.training.seed, console=console
        )
    return SearchResult(
        workdir=workdir,
        experiment=experiment,
        records=records,
        best=best,
        leaderboard_csv=csv_path,
        leaderboard_json=json_path,
        stop_reasons=stop_reasons,
        elapsed_s=time.time() - start,
        trial_store=storage or str(store.journal_path(workdir)),
        artifact_dir=job.artifact_dir,
    )


def conclude(
    job: SearchJob, *, train_seed: int, console: Console | None = None
) -> tuple[list[TrialRecord], BestDesign, Path, Path]:
    """The end of a search invocation, once its own workers stopped.

    Waits until no trial runs anywhere (`search.execution.runner.settle`), then takes the study's
    finisher lease (`search.ledger.store.FinisherLease`; while another process holds it, waits and
    then reuses its confirmation runs and test score), confirms the best design and tests it
    once (`search.execution.finish.finish_best`), and writes the leaderboard, all under the lease.

    Args:
        job: the search.
        train_seed: the experiment's training seed (confirmation run k uses seed + k).
        console: where progress is printed (None: silently).

    Returns:
        (records, best design, leaderboard.csv, leaderboard.json).
    """
    settings, workdir = job.settings, Path(job.workdir)
    artifacts = job.artifact_dir
    say = console.print if console is not None else (lambda *a, **k: None)
    settle(job, on_wait=_waiting_message(console))
    trial_store = store.open_storage(workdir, job.storage_url)
    study = store.load_study(trial_store, job.study_name)
    lease = store.FinisherLease(
        trial_store,
        job.study_name,
        grace_s=settings.heartbeat.grace_s,
        interval_s=settings.heartbeat.interval_s,
    )
    _acquire(lease, settings.heartbeat.interval_s, console)
    with lease:
        records = store.read_records(study)
        say(
            f"confirming the best design: {settings.confirm.seeds} further seed(s) on other "
            f"validation splits, up to {settings.confirm.max_candidates} candidate(s)"
        )
        status = console.status("confirming ...") if console is not None else None
        with status or contextlib.nullcontext():
            best = finish_best(
                artifacts,
                records,
                settings,
                job.make_evaluator(),
                train_seed=train_seed,
                log=RunLog(study.user_attrs, study.set_user_attr),
            )
        csv_path, json_path = write_leaderboard(
            artifacts,
            records,
            study=job.study_name,
            objective=settings.objective,
            requirements_data=to_dict(settings.requirements),
            best=best.summary,
            confirmation=[r.to_dict() for r in best.tried],
        )
    return records, best, csv_path, json_path


def _write_atomically(path: Path, text: str) -> None:
    """Writes `path` through a temporary file and a rename: a kill leaves the old or the
    new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _waiting_message(console: Console | None) -> Callable[[Sequence[TrialRecord]], None]:
    said: set[tuple[int, ...]] = set()

    def on_wait(running: Sequence[TrialRecord]) -> None:
        numbers = tuple(r.number for r in running)
        if console is None or numbers in said:
            return
        said.add(numbers)
        where = ", ".join(f"{r.number} ({r.worker or '?'})" for r in running)
        console.print(f"waiting for trials other processes are running: {where}")

    return on_wait


def _acquire(lease: store.FinisherLease, interval_s: float, console: Console | None) -> None:
    """Waits until this process holds the finisher lease (another may be finishing)."""
    told = False
    while not lease.try_acquire():
        holder = lease.holder()
        if console is not None and not told and holder is not None:
            console.print(
                f"{holder.worker} is finishing this search (confirmation and test); "
                "waiting for it, then reusing its runs"
            )
            told = True
        time.sleep(interval_s)
