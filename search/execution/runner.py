"""The design-exploration loop and its workers.

Each worker repeats, against the shared trial store:

1. recover trials whose worker died (heartbeat) and enqueue their retries;
2. stop when the budget is spent (proposals, wall time) or after too many infeasible
   proposals in a row;
3. ask the strategy (an Optuna sampler) for a genome and decode it into a spec;
4. cost pre-filter: a spec over a hard cost limit is recorded as infeasible with its reason
   and never built or trained;
5. dedupe: a spec whose content hash an earlier trial holds is recorded as a duplicate of it
   and not trained again;
6. train at rung 0 through the evaluator, record validation metrics and requirement
   violations, and continue to the next rungs while successive halving promotes it;
7. tell the study the objective values and the requirement violations (as constraints);
   each rung's objective value is an intermediate value (`trial.report`), and a candidate
   successive halving stopped below the last rung ends PRUNED.

A training failure (NaN, out of memory, compile error, or an exception from the evaluator)
ends that trial with its reason; the search goes on. With several workers the main process
only watches the store (live view) and then finishes: leaderboard, best design at full
fidelity, test metrics once (`search.execution.finish`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from rich.console import Console

from covidnet_jax.arch import AnySpec, ArchSpec, spec_from_json
from covidnet_jax.checkpointing import copy_finished
from covidnet_jax.errors import SpecError
from covidnet_jax.typed_yaml import from_dict
from search.config import SearchSettings
from search.execution.evaluation import EvalFailure, EvalRequest, Evaluator
from search.execution.fidelity import should_promote
from search.ledger import store
from search.ledger.objective import trial_values
from search.ledger.records import (
    Candidate,
    Proposal,
    RungResult,
    TrialProgress,
    TrialRecord,
    gene_choices_attrs,
)
from search.ledger.requirements import (
    Cost,
    cost_violations,
    describe_violations,
    is_feasible,
    outcome_names,
    outcome_violations,
    untrained_outcome_violations,
)
from search.reporting.live import LiveView
from search.strategies import StrategyFactory, StrategySampler
from search.strategies.space import SearchSpace

CostModel = Callable[[AnySpec], Cost]


@dataclasses.dataclass(frozen=True)
class SearchJob:
    """Everything a worker process needs, in picklable form.

    Attributes:
        settings_data: the `search:` section as plain data (`typed_yaml.to_dict`).
        workdir: the search's working directory.
        storage_url: a database URL, or None for the workdir's journal.
        study_name: the Optuna study name.
        prototype_json: the prototype spec as JSON.
        class_names: the data's classes (the decoded specs predict these).
        make_evaluator: builds the evaluator in the worker process (a picklable callable).
        make_cost_model: builds the cost model in the worker process.
        deadline: epoch seconds after which no new candidate is proposed.
        artifacts: the artifact root (`search.artifact_root`; "": the workdir), where trials
            write their runs; checkpoint paths in the records are relative to it.
        strategy: builds each trial's sampler (None: the one registered as
            `search.strategy.name` in the worker's process; a strategy a user registered
            travels here, since a spawned worker does not run the registration).
    """

    settings_data: Mapping[str, Any]
    workdir: str
    storage_url: str | None
    study_name: str
    prototype_json: str
    class_names: tuple[str, ...]
    make_evaluator: Callable[[], Evaluator]
    make_cost_model: Callable[[], CostModel]
    deadline: float
    strategy: StrategyFactory | None = None
    artifacts: str = ""

    @property
    def artifact_dir(self) -> Path:
        """Where trials, confirmation runs, the best design and the leaderboard go."""
        return Path(self.artifacts or self.workdir)

    @property
    def settings(self) -> SearchSettings:
        """The validated `search:` section."""
        return from_dict(SearchSettings, self.settings_data, path="search")

    def space(self) -> SearchSpace:
        """The search space around the prototype."""
        prototype = spec_from_json(self.prototype_json)
        assert isinstance(prototype, ArchSpec)
        return SearchSpace(self.settings.space, prototype, self.class_names)


@dataclasses.dataclass(frozen=True)
class WorkerSummary:
    """What one worker did.

    Attributes:
        handled: trials this worker ran to a final status.
        stop_reason: why it stopped.
    """

    handled: int
    stop_reason: str


def proposal_count(records: Sequence[TrialRecord]) -> int:
    """Proposals made so far (retries and abandoned asks are not proposals)."""
    return sum(1 for r in records if r.is_proposal)


def infeasible_streak(records: Sequence[TrialRecord]) -> int:
    """Length of the current run of consecutive cost-infeasible proposals."""
    streak = 0
    for r in reversed(records):
        if not r.is_proposal or r.status in ("running", "cancelled", "lost", ""):
            continue
        if r.status != "infeasible":
            break
        streak += 1
    return streak


def stop_reason(
    records: Sequence[TrialRecord], settings: SearchSettings, deadline: float
) -> str | None:
    """Why a worker must not ask for another trial now (None: it may).

    Waiting retries are proposals already made: they run before any stop but the wall-time
    budget. A running trial counts as a proposal until a recovery finds it abandoned (its
    worker died before its genome was drawn); the budget then has room again.
    """
    budget = settings.budget
    if time.time() >= deadline:
        return "wall-time budget spent"
    if any(r.state == "WAITING" for r in records):
        return None
    if infeasible_streak(records) >= budget.max_consecutive_infeasible:
        return f"gave up after {budget.max_consecutive_infeasible} infeasible proposals in a row"
    if proposal_count(records) >= budget.max_trials:
        return "trial budget spent"
    if budget.stop_on_feasible and any(r.is_trained and r.feasible for r in records):
        return "a design met the requirements"
    return None


class Worker:
    """Runs trials of one search until its budget is spent.

    Args:
        job: the search.
        evaluator: trains candidates (default: `job.make_evaluator()`).
    """

    def __init__(self, job: SearchJob, evaluator: Evaluator | None = None) -> None:
        self.job = job
        self.settings = job.settings
        self.workdir = Path(job.workdir)
        self.artifacts = job.artifact_dir
        self.space = job.space()
        self.cost_model = _costed_once(job.make_cost_model())
        self.evaluator = evaluator if evaluator is not None else job.make_evaluator()
        self.sampler = StrategySampler(
            self.space,
            self.settings.strategy,
            self.settings.objective,
            self.settings.seed,
            within_cost=self._within_cost if self.settings.budget.cost_prefilter else None,
            on_proposal=self._record_proposal,
            factory=job.strategy,
            on_ask=self._claim,
        )
        self.genes = tuple(gene.name for gene in self.space.genes)
        self.storage = store.open_storage(self.workdir, job.storage_url)
        self._trial_id = -1  # the storage's id of the trial being run
        self._progress = _PublishedProgress()
        self.study = store.open_study(
            self.storage, job.study_name, self.settings.objective, self.sampler
        )
        reqs = self.settings.requirements
        self.constraint_names = [
            name
            for name, limit in (
                ("macs", reqs.max_macs),
                ("params", reqs.max_params),
                ("activation_bytes", reqs.max_activation_bytes),
            )
            if limit is not None
        ] + outcome_names(reqs)
        self._record_gene_choices()

    def _record_gene_choices(self) -> None:
        """Stores the genes' readable choices in the study (once; `covidnet dashboard`)."""
        study_id = self.storage.get_study_id_from_name(self.job.study_name)
        stored = self.storage.get_study_system_attrs(study_id)
        for key, value in gene_choices_attrs(_gene_choices(self.space)).items():
            if stored.get(key) != value:
                self.storage.set_study_system_attr(study_id, key, value)

    def _claim(self, number: int) -> None:
        # Called first inside `study.ask()`: a kill from here on leaves a trial whose dead
        # worker the next recovery sees at once (`store.recover_lost_trials`), instead of one
        # that waits out the heartbeat grace while it counts against the trial budget.
        tid = store.trial_id(self.storage, self.study, number)
        for key, value in TrialRecord.owner_attrs(store.worker_id()).items():
            self.storage.set_trial_user_attr(tid, key, value)

    def _record_proposal(self, number: int, proposal: Proposal) -> None:
        # Called inside `study.ask()`: the trial exists in the storage, its genome not yet.
        tid = store.trial_id(self.storage, self.study, number)
        for key, value in proposal.to_attrs().items():
            self.storage.set_trial_user_attr(tid, key, value)

    def _within_cost(self, spec: AnySpec) -> bool:
        return is_feasible(cost_violations(self.settings.requirements, self.cost_model(spec)))

    # The loop -------------------------------------------------------------------------------

    def run(self) -> WorkerSummary:
        """Proposes and evaluates candidates until the budget is spent."""
        handled = 0
        budget = self.settings.budget
        while True:
            store.recover_lost_trials(
                self.study,
                self.storage,
                grace_s=self.settings.heartbeat.grace_s,
                max_retries=budget.max_retries,
                genes=self.genes,
            )
            records = store.read_records(self.study)
            reason = stop_reason(records, self.settings, self.job.deadline)
            if reason is not None:
                return WorkerSummary(handled, reason)
            trial = self.study.ask()
            self.run_trial(trial)
            handled += 1

    def run_trial(self, trial: optuna.Trial) -> None:
        """Takes one asked trial to a final status (see the module docstring)."""
        retry_of = TrialRecord.of_running(trial).retry_of
        if retry_of is None:
            records = store.read_records(self.study)
            index = sum(1 for r in records if r.number < trial.number and r.is_proposal)
            _write(trial, TrialRecord.proposal_index_attrs(index))
            if index >= self.settings.budget.max_trials:
                self._finish(trial, "cancelled", "proposed after the trial budget was spent")
                return
        else:
            # Two workers repairing one lost trial at once can enqueue two retries of it
            # (`store.recover_lost_trials`): the first trains, the others stand down.
            first = min(r.number for r in store.read_records(self.study) if r.retry_of == retry_of)
            if first != trial.number:
                _write(trial, TrialRecord.stand_down_attrs())
                self._finish(trial, "cancelled", f"trial {first} already retries {retry_of}")
                return
        _write(trial, TrialRecord.running_attrs(store.worker_id()))
        self._trial_id = store.trial_id(self.storage, self.study, trial.number)
        self._progress = _PublishedProgress()
        with store.heartbeat(
            self.storage,
            self._trial_id,
            self.settings.heartbeat.interval_s,
            attrs=self._progress.unpublished,
        ):
            try:
                self._evaluate(trial)
            except Exception as err:
                self._finish(trial, "failed", f"search error: {type(err).__name__}: {err}")
                raise

    def _evaluate(self, trial: optuna.Trial) -> None:
        genome = self.space.suggest(trial)
        try:
            spec = self.space.decode(genome)
        except SpecError as err:
            self._finish(trial, "invalid", f"genome decodes to no valid spec: {err}")
            return
        candidate = Candidate.build(spec, self.cost_model, self.space.describe(genome))
        _write(trial, candidate.to_attrs())
        cost = candidate.cost

        over = cost_violations(self.settings.requirements, cost)
        if not is_feasible(over) and self.settings.budget.cost_prefilter:
            violations = {**over, **untrained_outcome_violations(self.settings.requirements)}
            self._complete(
                trial,
                "infeasible",
                cost,
                None,
                violations,
                describe_violations(over, self.settings.requirements),
            )
            return

        origin = TrialRecord.of_running(trial).origin
        original = self._find_original(trial.number, candidate.spec_hash, origin)
        if original is not None:
            self._record_duplicate(trial, original)
            return
        self._train(trial, candidate, over)

    def _train(
        self, trial: optuna.Trial, candidate: Candidate, cost_over: dict[str, float]
    ) -> None:
        spec, cost = candidate.spec, candidate.cost
        settings = self.settings
        rungs = settings.budget.rungs
        trial_dir = self.artifacts / store.TRIALS_DIR / str(trial.number)
        record = TrialRecord.from_trial(self.storage.get_trial(self._trial_id))
        done = list(record.rungs)
        for result in done:  # a retry carries its lost original's rungs: their values too
            self._report(trial, cost, result)
        retry_of = record.retry_of
        if retry_of is not None and not trial_dir.exists():
            lost_dir = self.artifacts / store.TRIALS_DIR / str(retry_of)
            if lost_dir.exists():
                # Finished checkpoint steps only: never a half-written or half-deleted one.
                copy_finished(lost_dir, trial_dir)
        trial_dir.mkdir(parents=True, exist_ok=True)
        init_from = self._inherited_checkpoint(record) if not done else None
        totals = [sum(r.compile_s for r in done), sum(r.train_s for r in done)]
        # A retry carrying rungs continues only if successive halving promotes its last one
        # (its original may have been killed between that rung and the decision).
        start = len(done) if not done or self._promoted(record, done) else len(rungs)
        for rung in range(start, len(rungs)):
            request = EvalRequest(
                spec=spec,
                steps=rungs[rung],
                workdir=trial_dir,
                init_from=init_from if rung == 0 else None,
                rung=rung,
                on_progress=self._progress.reporter(rung),
            )
            outcome = self._call_evaluator(request)
            if isinstance(outcome, EvalFailure):
                _write(trial, TrialRecord.failure_attrs(outcome.kind))
                self._finish(trial, "failed", outcome.reason)
                return
            checkpoint = ""
            if outcome.checkpoint is not None:
                checkpoint = os.path.relpath(outcome.checkpoint, self.artifacts)
            result = RungResult(
                rung=rung,
                steps=rungs[rung],
                metrics=outcome.metrics,
                compile_s=outcome.compile_s,
                train_s=outcome.train_s,
                checkpoint=checkpoint,
                violations={
                    **cost_over,
                    **outcome_violations(settings.requirements, outcome.metrics),
                },
            )
            _write(trial, TrialRecord.rung_attrs(result))
            self._report(trial, cost, result)
            totals[0] += outcome.compile_s
            totals[1] += outcome.train_s
            done.append(result)
            if rung == len(rungs) - 1 or not self._promoted(record, done):
                break
        last = done[-1]
        pruned = last.rung < len(rungs) - 1  # successive halving stopped it at a low rung
        _write(trial, TrialRecord.trained_attrs(last, compile_s=totals[0], train_s=totals[1]))
        violations = dict(last.violations)
        reason = describe_violations(violations, settings.requirements)
        self._complete(
            trial, "trained", cost, last.metrics.accuracy, violations, reason, pruned=pruned
        )

    def _promoted(self, record: TrialRecord, done: Sequence[RungResult]) -> bool:
        """Whether successive halving sends a candidate with rungs `done` to the next rung."""
        if len(done) >= len(self.settings.budget.rungs):
            return False
        return should_promote(
            dataclasses.replace(record, rungs=tuple(done)),
            len(done) - 1,
            store.read_records(self.study),
            reduction_factor=self.settings.budget.reduction_factor,
            objective=self.settings.objective,
        )

    def _report(self, trial: optuna.Trial, cost: Cost, result: RungResult) -> None:
        """The rung's objective value as an Optuna intermediate value at its step count
        (learning curves, and what TPE ranks pruned trials by). Optuna supports them for
        single-objective studies only: `pareto` reports none."""
        if self.settings.objective == "pareto":
            return
        (value,) = trial_values(
            self.settings.objective,
            accuracy=result.metrics.accuracy,
            macs=cost.macs,
            params=cost.params,
        )
        trial.report(value, step=result.steps)

    def _call_evaluator(self, request: EvalRequest):
        try:
            return self.evaluator.train(request)
        except Exception as err:  # a failing candidate must not end the search
            return EvalFailure("error", f"{type(err).__name__}: {err}")

    def _inherited_checkpoint(self, record: TrialRecord) -> Path | None:
        if not self.settings.strategy.inherit_weights:
            return None
        if record.parent is None:
            return None
        parent = TrialRecord.from_trial(self.study.get_trials(deepcopy=False)[record.parent])
        if parent.status != "trained" or not parent.checkpoint:
            return None
        path = self.artifacts / parent.checkpoint
        return path if path.exists() else None

    # Dedupe ---------------------------------------------------------------------------------

    def _find_original(self, number: int, spec_hash: str, origin: int) -> TrialRecord | None:
        """The earliest other proposal's trial holding `spec_hash` (a retry's own chain, which
        `origin` names, does not count), waiting briefly for proposals that started before
        this one and have not recorded their spec yet (closes the race between two workers
        proposing the same spec at once)."""
        give_up = time.monotonic() + 10.0
        while True:
            earlier = [r for r in store.read_records(self.study) if r.number < number]
            # A trial asked but not yet marked "running" (its worker is between `ask` and
            # the status write) is pending too: it let two workers train one spec.
            pending = any(
                r.state == "RUNNING" and r.spec_hash is None and r.status in ("", "running")
                for r in earlier
            )
            for r in earlier:
                if (
                    r.spec_hash == spec_hash
                    and r.origin != origin
                    and r.status in ("running", "trained", "failed")
                ):
                    return r
            if not pending or time.monotonic() > give_up:
                return None
            time.sleep(0.05)

    def _record_duplicate(self, trial: optuna.Trial, original: TrialRecord) -> None:
        reason = f"same spec as trial {original.number}"
        frozen = self.study.get_trials(deepcopy=False)[original.number]
        if original.status == "trained" and frozen.state in (
            TrialState.COMPLETE,
            TrialState.PRUNED,
        ):
            _write(trial, original.duplicate_attrs(result=True))
            for name, value in frozen.constraints.items():
                trial.set_constraint(name, value)
            for step, value in sorted(frozen.intermediate_values.items()):
                trial.report(value, step=step)
            _write(trial, TrialRecord.end_attrs("duplicate", reason))
            values = frozen.values if frozen.state == TrialState.COMPLETE else None
            self._tell(trial, frozen.state, values)
            return
        _write(trial, original.duplicate_attrs(result=False))
        self._finish(trial, "duplicate", reason)

    # Recording ------------------------------------------------------------------------------

    def _complete(
        self,
        trial: optuna.Trial,
        status: str,
        cost: Cost,
        accuracy: float | None,
        violations: dict[str, float],
        reason: str,
        *,
        pruned: bool = False,
    ) -> None:
        """Ends a trial with its record. A candidate successive halving stopped below the
        last rung ends PRUNED, as Optuna's pruners would leave it: its intermediate values
        say how far it got. It keeps the constraints measured at the rung it reached: TPE
        ranks pruned trials without constraints by their last intermediate value (MACs for
        `min_macs`), and learning "small pruned designs are good" cost it 7 of 10 seeds on
        the surrogate task (bench/README.md, "Optuna's trial states"). NSGA-II considers
        only COMPLETE trials, so it no longer learns a short run as a finished design."""
        _write(trial, TrialRecord.end_attrs(status, reason, violations))
        for name in self.constraint_names:
            trial.set_constraint(name, float(violations.get(name, 0.0)))
        if pruned:
            self._tell(trial, TrialState.PRUNED, None)
            return
        chance = 1.0 / len(self.space.prototype.class_names)  # an untrained design
        values = trial_values(
            self.settings.objective,
            accuracy=chance if accuracy is None else accuracy,
            macs=cost.macs,
            params=cost.params,
        )
        self._tell(trial, TrialState.COMPLETE, values)

    def _finish(self, trial: optuna.Trial, status: str, reason: str) -> None:
        """Ends a trial without values (failed, invalid, cancelled, duplicate of a failure)."""
        _write(trial, TrialRecord.end_attrs(status, reason))
        self._tell(trial, TrialState.FAIL, None)

    def _tell(self, trial: optuna.Trial, state: TrialState, values: Sequence[float] | None):
        # UpdateFinishedTrialError: another worker declared this trial lost (a missed
        # heartbeat) and retried it; the retry's result counts.
        with contextlib.suppress(UpdateFinishedTrialError):
            self.study.tell(trial, values=values, state=state)


def _gene_choices(space: SearchSpace) -> dict[str, list]:
    """Every gene's readable choices in index order: `space.describe` of the prototype's
    genome with every stage at its deepest, changed in that gene alone; a module gene that a
    stage at its shallowest leaves out ends with "unused". A gene with a choice that decodes
    to no valid spec is left out (a viewer then shows its indices)."""
    deepest = space.prototype_genome()
    shallowest = dict(deepest)
    for gene in space.genes:
        if gene.role == "depth":
            deepest[gene.name], shallowest[gene.name] = len(gene.choices) - 1, 0
    try:
        unused = space.describe(shallowest)
    except SpecError:
        unused = {}
    table: dict[str, list] = {}
    for gene in space.genes:
        try:
            values = [
                space.describe({**deepest, gene.name: k})[gene.name]
                for k in range(len(gene.choices))
            ]
        except SpecError:
            continue
        table[gene.name] = values + (["unused"] if unused.get(gene.name) == "unused" else [])
    return table


def _costed_once(cost_model: CostModel) -> CostModel:
    """`cost_model` memoised by spec hash: the strategy's cost check of a child and the
    candidate's record cost one count (the analytic counter walks every layer)."""
    costs: dict[str, Cost] = {}

    def cost(spec: AnySpec) -> Cost:
        key = spec.content_hash()
        if key not in costs:
            costs[key] = cost_model(spec)
        return costs[key]

    return cost


class _PublishedProgress:
    """The running trial's progress: the evaluator reports it as often as it likes (on its
    training thread); the heartbeat thread publishes the latest, only when it changed, so
    the trial store sees one write per heartbeat interval at most."""

    def __init__(self) -> None:
        # One reference swapped whole on each side: no lock needed.
        self._latest: TrialProgress | None = None
        self._published: TrialProgress | None = None

    def reporter(self, rung: int) -> Callable[[str, int, int], None]:
        """The `EvalRequest.on_progress` of one rung."""

        def report(phase: str, step: int, total: int) -> None:
            self._latest = TrialProgress(rung=rung, phase=phase, step=step, total=total)

        return report

    def unpublished(self) -> dict[str, Any]:
        """The attribute to write now (empty when nothing changed since the last write)."""
        latest = self._latest
        if latest is None or latest == self._published:
            return {}
        self._published = latest
        return TrialRecord.progress_attrs(latest)


def _write(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Stores attributes built by the ledger (`TrialRecord.*_attrs`, `Candidate.to_attrs`)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def run_worker(job: SearchJob, evaluator: Evaluator | None = None) -> WorkerSummary:
    """Runs one worker of `job` in this process until the budget is spent."""
    return Worker(job, evaluator).run()


def _worker_main(job: SearchJob, env: Mapping[str, str]) -> None:
    os.environ.update(env)  # before JAX is imported in this (spawned) process
    _end_with_parent()
    run_worker(job)


def _end_with_parent() -> None:
    """Ends this worker process (SIGTERM to itself) when the process that started it dies.

    Ctrl-C reaches every process of the terminal's group, but a `kill` of the search command
    (or a scheduler ending it) reaches only that process. Its workers would otherwise go on
    training, holding cores or a GPU, beside the workers of the search when it is resumed. A
    worker that ends this way mid-trial leaves the trial to the heartbeat check, like a
    crash: the resumed search retries it from its last checkpoint.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent process is gone
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # a library's SIGTERM handler may not exit: then end here
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="covidnet-parent-watch", daemon=True).start()


def count_gpus() -> int:
    """GPUs visible on this host (without initializing JAX in this process)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def worker_environments(count: int, devices: Sequence[str]) -> list[dict[str, str]]:
    """The environment each of `count` workers starts with, given the host's GPUs.

    Workers are spread over the devices round robin, each seeing one (`CUDA_VISIBLE_DEVICES`).
    Where several workers share a device, JAX's default (preallocating 75% of the device's
    memory in the first process) would leave the second nothing: each gets an equal share
    of 90% (`XLA_PYTHON_CLIENT_MEM_FRACTION`) instead. Without GPUs nothing is set.

    Args:
        count: worker processes.
        devices: the visible GPUs' ids ([] on a CPU-only host).

    Returns:
        One dict of environment variables per worker.
    """
    if not devices:
        return [{} for _ in range(count)]
    envs = []
    for i in range(count):
        device = devices[i % len(devices)]
        sharing = sum(1 for k in range(count) if devices[k % len(devices)] == device)
        env = {"CUDA_VISIBLE_DEVICES": device}
        if sharing > 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.3f}"
        envs.append(env)
    return envs


def start_workers(job: SearchJob, count: int) -> list[multiprocessing.process.BaseProcess]:
    """Starts `count` worker processes (spawned; see `worker_environments` for their GPUs).

    Returns:
        The started processes.
    """
    context = multiprocessing.get_context("spawn")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    else:
        devices = [str(i) for i in range(count_gpus())]
    processes = []
    for i, env in enumerate(worker_environments(count, devices)):
        process = context.Process(
            target=_worker_main, args=(job, env), name=f"covidnet-search-worker-{i}"
        )
        process.start()
        processes.append(process)
    return processes


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    """How a search invocation ended.

    Attributes:
        records: every trial's record after the workers stopped.
        stop_reasons: why each worker stopped (in-process worker last).
    """

    records: list[TrialRecord]
    stop_reasons: list[str]


def run_search(
    job: SearchJob,
    *,
    workers: int = 1,
    evaluator: Evaluator | None = None,
    console: Console | None = None,
    lines: bool = False,
) -> SearchOutcome:
    """Runs (or resumes) a search: `workers` worker processes, or this process for one.

    The study is created here before any worker starts. With several workers, this process
    watches the store and afterwards drains what they left (retries of trials lost at the
    very end) with an in-process worker.

    Args:
        job: the search.
        workers: worker processes (1: run in this process).
        evaluator: the in-process worker's evaluator (default: `job.make_evaluator()`).
        console: where the live view draws (None: no live view).
        lines: one line per finished trial instead of a redrawn panel.

    Returns:
        The records and the workers' stop reasons.
    """
    storage = store.open_storage(job.workdir, job.storage_url)
    study = store.open_study(storage, job.study_name, job.settings.objective)
    # The settings of the latest invocation (a resumed search may raise its budget).
    study.set_user_attr("search", dict(job.settings_data))
    study.set_user_attr("prototype", job.prototype_json)
    # Recover what a killed earlier invocation left before the workers start: otherwise
    # every worker finds the same lost trials at once and enqueues a retry of each (the
    # second retry stands down, but costs an ask and a "cancelled" line).
    store.recover_lost_trials(
        study,
        storage,
        grace_s=job.settings.heartbeat.grace_s,
        max_retries=job.settings.budget.max_retries,
        genes=tuple(gene.name for gene in job.space().genes),
    )

    def records() -> list[TrialRecord]:
        return store.read_records(study)

    reasons: list[str] = []
    view = (
        LiveView(
            records,
            job.settings.budget,
            console,
            objective=job.settings.objective,
            lines=lines,
            spent_s=max(0.0, job.settings.budget.max_wall_time_s - (job.deadline - time.time())),
        )
        if console is not None
        else contextlib.nullcontext()
    )
    with view:
        if workers > 1:
            processes = start_workers(job, workers)
            for process in processes:
                process.join()
                reasons.append(f"worker pid {process.pid} exited with {process.exitcode}")
        reasons.append(run_worker(job, evaluator).stop_reason)
    return SearchOutcome(records(), reasons)


def settle(
    job: SearchJob,
    evaluator: Evaluator | None = None,
    *,
    on_wait: Callable[[Sequence[TrialRecord]], None] = lambda running: None,
) -> list[TrialRecord]:
    """Waits until no trial of the study is running anywhere, training what is left here.

    Another command on the same workdir, or a host sharing the database, may still be
    training trials when this process's workers stop; finishing then would leave them out of
    the leaderboard and the confirmation. So this process recovers lost trials, trains the
    retries still waiting and proposes again where a recovery found an ask abandoned (a
    worker killed between `study.ask` and the end of its genome: no proposal, so the budget
    has room), while `stop_reason` allows, and waits for the others' running trials to end (a
    dead worker's trial is recovered once its heartbeat expires).

    Args:
        job: the search.
        evaluator: the evaluator for retries trained here (default: `job.make_evaluator()`).
        on_wait: called with the trials running elsewhere, each time before waiting.

    Returns:
        Every trial's record once none is running.
    """
    settings = job.settings
    storage = store.open_storage(job.workdir, job.storage_url)
    study = store.load_study(storage, job.study_name)
    genes = tuple(gene.name for gene in job.space().genes)
    drain = True
    while True:
        if store.recover_lost_trials(
            study,
            storage,
            grace_s=settings.heartbeat.grace_s,
            max_retries=settings.budget.max_retries,
            genes=genes,
        ):
            drain = True  # a retry to train, or an abandoned ask that frees budget
        records = store.read_records(study)
        if drain and stop_reason(records, settings, job.deadline) is None:
            # No progress means another process took the work: do not spin on it.
            drain = run_worker(job, evaluator).handled > 0
            continue
        running = [r for r in records if r.state == "RUNNING"]
        if not running:
            return records
        on_wait(running)
        time.sleep(settings.heartbeat.interval_s)
