"""Trial records: what the trial store holds about each candidate, and how designs rank.

Each proposed candidate is one Optuna trial. Its user attributes (JSON values) are the record;
compare/export read them through `TrialRecord.from_trial` or straight from the storage:

    status            "running" | "trained" | "infeasible" | "duplicate" | "failed" |
                      "lost" (its worker died) | "cancelled" (proposed after the budget was
                      spent) | "invalid" (the genome decodes to no valid spec)
    reason            why a candidate is infeasible/failed/lost/duplicate (one line)
    spec              the spec JSON (`covidnet_jax.arch.spec_from_json` reads it)
    spec_hash         `spec.content_hash()`, the dedupe key
    summary           `spec.summary()`
    design.<gene>     each gene's value as a person reads it (`SearchSpace.describe`: widths,
                      kernel size, connectivity and head names, "unused" modules); Optuna's
                      parameters stay the choice indices the samplers work on
    macs, params, activation_bytes     the analytic cost
    violations        {requirement name: shortfall}, 0.0 where it holds (see requirements.py)
    feasible          all violations 0 (cost, and outcome at the last trained rung)
    rung.<r>          per completed rung r: {"steps", "metrics" (EvalMetrics.to_dict()),
                      "compile_s", "train_s", "checkpoint", "violations"}
    rung              the last completed rung (-1 when never trained)
    val_accuracy      validation accuracy at that rung
    checkpoint        checkpoint directory of the last rung, relative to the workdir
    compile_s, train_s     totals over the rungs
    parent, operator  the trial the strategy derived this one from, and how
    duplicate_of      the earlier trial with the same spec hash
    retry_of          the trial this one retries (lost, or failed with a retryable kind)
    origin            the first trial of that chain of retries (the proposal)
    losses, failures  how often the chain was lost (its worker died) / failed on its own
    lost              set by the worker that found the trial's worker dead (the reason); a
                      FAIL trial with it reads as status "lost"
    abandoned         lost before its genome was complete: not a proposal, never retried
    failure_kind      "nan" | "oom" | "compile" | "error" for a failed trial
    proposal          index among proposals (retries share their original's index)
    worker            "host:pid" of the worker that ran it

Trial values are the objective (min_macs: MACs; max_netscore: NetScore; pareto: validation
accuracy and MACs) and the violations are set as Optuna constraints.

A running trial's system attribute `search:progress` (`TrialRecord.progress_attrs`, written by
the worker's heartbeat thread at most once per heartbeat interval) says where its training is:
{"rung", "phase": "compiling" | "training" | "evaluating", "step", "of"}.

The study's system attribute `search:gene_choices` holds every gene's readable choices in index
order (`gene_choices_attrs`), so a viewer can show a parameter's value and its range without
the search space (`covidnet dashboard`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna

from covidnet_jax.arch import AnySpec
from covidnet_jax.metrics import EvalMetrics, netscore
from search.config import Objective
from search.ledger.objective import design_order
from search.ledger.requirements import COST_NAMES, Cost, is_feasible

DESIGN_PREFIX = "design."
GENE_CHOICES_ATTR = "search:gene_choices"
PROGRESS_ATTR = "search:progress"

Genome = dict[str, int]
"""A point of the search space: gene name -> index (Optuna's parameters of a trial)."""

TERMINAL_STATUSES = (
    "trained",
    "infeasible",
    "duplicate",
    "failed",
    "lost",
    "cancelled",
    "invalid",
)


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A proposed genome and where it came from.

    Attributes:
        genome: gene name -> index.
        parent: the trial number it was derived from (None for fresh designs).
        operator: how it was derived, e.g. "random", "prototype", "narrow s1.m0.width".
    """

    genome: Genome
    parent: int | None
    operator: str

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes recording the proposal's origin (the genome is Optuna's
        parameters)."""
        attrs: dict[str, Any] = {"operator": self.operator}
        if self.parent is not None:
            attrs["parent"] = self.parent
        return attrs


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A decoded design and its analytic cost, built once per trial (`Candidate.build`).

    Attributes:
        spec: the architecture.
        spec_hash: `spec.content_hash()`, the dedupe key.
        cost: its analytic cost.
        design: gene name -> readable value (`SearchSpace.describe` of its genome).
    """

    spec: AnySpec
    spec_hash: str
    cost: Cost
    design: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        spec: AnySpec,
        cost_model: Callable[[AnySpec], Cost],
        design: Mapping[str, Any] | None = None,
    ) -> Candidate:
        """Hashes and costs `spec` (once); `design` is its genome described."""
        return cls(
            spec=spec,
            spec_hash=spec.content_hash(),
            cost=cost_model(spec),
            design=dict(design or {}),
        )

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes describing the design."""
        return {
            "spec": self.spec.to_json(indent=None),
            "spec_hash": self.spec_hash,
            "summary": self.spec.summary(),
            "macs": self.cost.macs,
            "params": self.cost.params,
            "activation_bytes": self.cost.activation_bytes,
            **{f"{DESIGN_PREFIX}{gene}": value for gene, value in self.design.items()},
        }


@dataclasses.dataclass(frozen=True)
class RungResult:
    """The evaluation of a candidate at one fidelity rung.

    Attributes:
        rung: rung index.
        steps: training steps reached.
        metrics: validation metrics.
        compile_s: seconds spent compiling.
        train_s: seconds spent training and evaluating.
        checkpoint: checkpoint directory relative to the workdir ("" when none).
        violations: requirement shortfalls at this rung (outcome requirements, and cost
            limits, which are all 0 unless the cost pre-filter is off).
    """

    rung: int
    steps: int
    metrics: EvalMetrics
    compile_s: float
    train_s: float
    checkpoint: str
    violations: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_attr(self) -> dict[str, Any]:
        """The JSON value stored as user attribute `rung.<r>`."""
        return {
            "steps": self.steps,
            "metrics": self.metrics.to_dict(),
            "compile_s": self.compile_s,
            "train_s": self.train_s,
            "checkpoint": self.checkpoint,
            "violations": dict(self.violations),
        }

    @classmethod
    def from_attr(cls, rung: int, value: Mapping[str, Any]) -> RungResult:
        """The inverse of `to_attr`."""
        return cls(
            rung=rung,
            steps=int(value["steps"]),
            metrics=EvalMetrics.from_dict(dict(value["metrics"])),
            compile_s=float(value["compile_s"]),
            train_s=float(value["train_s"]),
            checkpoint=str(value.get("checkpoint", "")),
            violations={k: float(v) for k, v in value.get("violations", {}).items()},
        )


@dataclasses.dataclass(frozen=True)
class TrialProgress:
    """Where a running trial's training is (its worker publishes it with the heartbeat).

    Attributes:
        rung: the fidelity rung being trained (-1 for the final training).
        phase: "loading", "compiling", "training" or "evaluating" (validation).
        step: the last step trained.
        total: the rung's step budget.
    """

    rung: int
    phase: str
    step: int
    total: int

    def describe(self) -> str:
        """A few words for people, e.g. "r0 step 120/400", "r0 val 200/400" (validating
        after step 200) or "r1 compiling"."""
        rung = "" if self.rung < 0 else f"r{self.rung} "
        if self.phase == "training":
            return f"{rung}step {self.step}/{self.total}"
        if self.phase == "evaluating":
            return f"{rung}val {self.step}/{self.total}"
        return f"{rung}{self.phase}"


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One candidate as recorded in the trial store (see the module docstring).

    Attributes:
        number: the Optuna trial number.
        state: the Optuna trial state name ("COMPLETE", "FAIL", "RUNNING", "WAITING", ...).
        status: the search status.
        params: the genome (gene name -> index).
        attrs: every user attribute.
        rungs: completed rungs, in order.
        heartbeat: epoch seconds of the last heartbeat (None when none).
        started: epoch seconds the trial started (None while waiting).
        completed: epoch seconds it finished (None while running).
        progress: where its training was at the worker's last heartbeat (None before any;
            kept after the end, so read it for running trials).
    """

    number: int
    state: str
    status: str
    params: dict[str, int]
    attrs: dict[str, Any]
    rungs: tuple[RungResult, ...]
    heartbeat: float | None
    started: float | None = None
    completed: float | None = None
    progress: TrialProgress | None = None

    @classmethod
    def of_running(cls, trial: optuna.Trial) -> TrialRecord:
        """The record of a trial this process is running (an asked `optuna.Trial`)."""
        return cls(
            number=trial.number,
            state="RUNNING",
            status=str(trial.user_attrs.get("status", "")),
            params={k: int(v) for k, v in trial.params.items()},
            attrs=dict(trial.user_attrs),
            rungs=(),
            heartbeat=None,
        )

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        """Reads a record from an Optuna `FrozenTrial`."""
        attrs = dict(trial.user_attrs)
        if trial.state.name == "FAIL" and "lost" in attrs:
            # Marked by `store.recover_lost_trials`: its worker died.
            attrs["status"], attrs["reason"] = "lost", attrs["lost"]
        rungs = sorted(
            (int(key.split(".", 1)[1]), value)
            for key, value in attrs.items()
            if key.startswith("rung.")
        )
        return cls(
            number=trial.number,
            state=trial.state.name,
            status=str(attrs.get("status", "waiting" if trial.state.name == "WAITING" else "")),
            params={k: int(v) for k, v in trial.params.items()},
            attrs=attrs,
            rungs=tuple(RungResult.from_attr(r, v) for r, v in rungs),
            heartbeat=trial.system_attrs.get("search:heartbeat"),
            started=None if trial.datetime_start is None else trial.datetime_start.timestamp(),
            completed=(
                None if trial.datetime_complete is None else trial.datetime_complete.timestamp()
            ),
            progress=_read_progress(trial.system_attrs.get(PROGRESS_ATTR)),
        )

    # Reading: typed views of the attributes ----------------------------------------------

    @property
    def spec_hash(self) -> str | None:
        """The spec's content hash, once known."""
        return self.attrs.get("spec_hash")

    @property
    def spec_json(self) -> str:
        """The spec as JSON ("" before it is known)."""
        return str(self.attrs.get("spec", ""))

    @property
    def summary(self) -> str:
        """The spec's one-line summary ("" before it is known)."""
        return str(self.attrs.get("summary", ""))

    @property
    def design(self) -> dict[str, Any]:
        """Gene name -> readable value (empty for a trial recorded before its spec)."""
        n = len(DESIGN_PREFIX)
        return {k[n:]: v for k, v in self.attrs.items() if k.startswith(DESIGN_PREFIX)}

    @property
    def macs(self) -> int | None:
        """Analytic MACs, once known."""
        value = self.attrs.get("macs")
        return None if value is None else int(value)

    @property
    def params_count(self) -> int | None:
        """Analytic parameter count, once known."""
        value = self.attrs.get("params")
        return None if value is None else int(value)

    @property
    def activation_bytes(self) -> int | None:
        """Analytic activation memory, once known."""
        value = self.attrs.get("activation_bytes")
        return None if value is None else int(value)

    @property
    def reason(self) -> str:
        """Why the trial ended as it did (one line; "" when it needs no reason)."""
        return str(self.attrs.get("reason", "") or "")

    @property
    def parent(self) -> int | None:
        """The trial the strategy derived this one from."""
        value = self.attrs.get("parent")
        return None if value is None else int(value)

    @property
    def operator(self) -> str:
        """How the strategy derived it ("" when unknown)."""
        return str(self.attrs.get("operator", ""))

    @property
    def worker(self) -> str:
        """`host:pid` of the worker that ran it ("" before one took it)."""
        return str(self.attrs.get("worker", ""))

    @property
    def failure_kind(self) -> str:
        """ "nan" | "oom" | "compile" | "error" for a failed trial, else ""."""
        return str(self.attrs.get("failure_kind", ""))

    @property
    def checkpoint(self) -> str:
        """The last rung's checkpoint, relative to the workdir ("" when none)."""
        return str(self.attrs.get("checkpoint", ""))

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling, over the rungs."""
        return float(self.attrs.get("compile_s", 0.0) or 0.0)

    @property
    def train_s(self) -> float:
        """Seconds spent training and evaluating, over the rungs."""
        return float(self.attrs.get("train_s", 0.0) or 0.0)

    @property
    def abandoned(self) -> bool:
        """Lost before its genome was complete (not a proposal)."""
        return bool(self.attrs.get("abandoned", False))

    @property
    def second_retry(self) -> bool:
        """A retry that stood down because another retry of the same trial runs."""
        return bool(self.attrs.get("second_retry", False))

    @property
    def losses(self) -> int:
        """Times the chain up to this trial was lost."""
        return int(self.attrs.get("losses", 0))

    @property
    def failures(self) -> int:
        """Times the chain up to this trial failed on its own."""
        return int(self.attrs.get("failures", 0))

    @property
    def last(self) -> RungResult | None:
        """The last completed rung (None when never trained)."""
        return self.rungs[-1] if self.rungs else None

    @property
    def violations(self) -> dict[str, float]:
        """Requirement shortfalls (empty when unknown)."""
        return dict(self.attrs.get("violations", {}))

    @property
    def feasible(self) -> bool:
        """Whether the candidate meets every requirement at its last trained rung."""
        return bool(self.attrs.get("feasible", False))

    @property
    def retry_of(self) -> int | None:
        """The lost trial this one retries, if any."""
        value = self.attrs.get("retry_of")
        return None if value is None else int(value)

    @property
    def origin(self) -> int:
        """The proposal's first trial (a retry's chain leads back to it)."""
        return int(
            self.attrs.get("origin", self.retry_of if self.retry_of is not None else self.number)
        )

    @property
    def is_proposal(self) -> bool:
        """True for a proposal: a trial the strategy asked for (not a retry), with its whole
        genome drawn (not `abandoned` by a kill before that), no longer waiting."""
        return self.retry_of is None and self.state != "WAITING" and not self.abandoned

    @property
    def is_trained(self) -> bool:
        """True when at least one rung completed and the record is final."""
        return self.status == "trained" and bool(self.rungs)

    def netscore(self) -> float:
        """NetScore of the last rung (-inf when untrained)."""
        if self.last is None or not self.macs or not self.params_count:
            return -math.inf
        return netscore(self.last.metrics.accuracy, self.params_count, self.macs)

    # Writing: with `from_trial`, the only code that knows the attribute names ------------

    @staticmethod
    def owner_attrs(worker: str) -> dict[str, Any]:
        """The attribute naming the worker that asked for a trial (written inside
        `study.ask`, so a kill right after the ask leaves a trial whose worker is known)."""
        return {"worker": worker}

    @staticmethod
    def running_attrs(worker: str) -> dict[str, Any]:
        """Attributes of a trial a worker has taken."""
        return {**TrialRecord.owner_attrs(worker), "status": "running"}

    @staticmethod
    def end_attrs(
        status: str, reason: str, violations: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """Attributes of a trial's end: its status and reason, and, for a judged candidate,
        its requirement shortfalls and whether all hold."""
        assert status in TERMINAL_STATUSES, status
        attrs: dict[str, Any] = {}
        if violations is not None:
            attrs["violations"] = dict(violations)
            attrs["feasible"] = is_feasible(violations)
        return {**attrs, "reason": reason, "status": status}

    @staticmethod
    def progress_attrs(progress: TrialProgress) -> dict[str, Any]:
        """The system attribute publishing a running trial's progress."""
        return {
            PROGRESS_ATTR: {
                "rung": progress.rung,
                "phase": progress.phase,
                "step": progress.step,
                "of": progress.total,
            }
        }

    @staticmethod
    def rung_attrs(result: RungResult) -> dict[str, Any]:
        """The attribute of one completed rung."""
        return {f"rung.{result.rung}": result.to_attr()}

    @staticmethod
    def trained_attrs(last: RungResult, *, compile_s: float, train_s: float) -> dict[str, Any]:
        """The summary attributes of a trained candidate (its last rung and the totals)."""
        return {
            "rung": last.rung,
            "steps": last.steps,
            "val_accuracy": last.metrics.accuracy,
            "checkpoint": last.checkpoint,
            "compile_s": compile_s,
            "train_s": train_s,
        }

    @staticmethod
    def failure_attrs(kind: str) -> dict[str, Any]:
        """The attribute naming a failure's kind."""
        return {"failure_kind": kind}

    @staticmethod
    def proposal_index_attrs(index: int) -> dict[str, Any]:
        """The attribute numbering a proposal among proposals."""
        return {"proposal": index}

    @staticmethod
    def stand_down_attrs() -> dict[str, Any]:
        """The attribute of a retry that stands down for an earlier retry of its trial."""
        return {"second_retry": True}

    @staticmethod
    def lost_attrs(reason: str, *, abandoned: bool) -> dict[str, Any]:
        """The mark of a trial whose worker died (`abandoned`: before its genome was
        complete, so it is no proposal)."""
        return {"abandoned": True, "lost": reason} if abandoned else {"lost": reason}

    def duplicate_attrs(self, *, result: bool) -> dict[str, Any]:
        """The attributes of a duplicate of this record: which trial it duplicates and, with
        `result` (this one trained), its result, not its identity."""
        keys = ("rung", "steps", "val_accuracy", "checkpoint", "violations", "feasible")
        copied = {key: self.attrs[key] for key in keys if key in self.attrs} if result else {}
        return {"duplicate_of": self.number, **copied}

    def retry_attrs(self, *, losses: int, failures: int) -> dict[str, Any]:
        """The attributes of this trial's retry: its proposal (origin, parent, operator,
        index), its completed rungs, and the chain's counts."""
        carried = {
            k: v
            for k, v in self.attrs.items()
            if k.startswith("rung.") or k in ("parent", "operator", "proposal")
        }
        return {
            **carried,
            "retry_of": self.number,
            "origin": self.origin,
            "losses": losses,
            "failures": failures,
        }


def _read_progress(value: Any) -> TrialProgress | None:
    # A viewer must not fail on a record another version wrote: unreadable is unknown.
    try:
        return TrialProgress(
            rung=int(value["rung"]),
            phase=str(value["phase"]),
            step=int(value["step"]),
            total=int(value["of"]),
        )
    except (TypeError, KeyError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class ProposalOutcome:
    """Where one proposal stands, over its chain of retries.

    Attributes:
        origin: the proposal's first trial.
        final: the chain's latest trial (a second retry cancelled in favour of the first
            is skipped).
        attempts: trials in the chain.
        losses: times the chain's worker died.
        trained: trials of the chain that trained it to a final record (1 at most unless
            something is wrong).
    """

    origin: int
    final: TrialRecord
    attempts: int
    losses: int
    trained: int

    @property
    def settled(self) -> bool:
        """True when the proposal has a final result (trained, infeasible, failed, ...), False
        while it runs, waits for its retry, or is lost with no retry queued yet."""
        return self.final.state not in ("RUNNING", "WAITING") and self.final.status != "lost"


def proposal_outcomes(records: Sequence[TrialRecord]) -> list[ProposalOutcome]:
    """Every proposal's standing, in proposal order: the search's account of what it tried
    (every proposal is trained or ends with its reason exactly once; none goes missing)."""
    chains: dict[int, list[TrialRecord]] = {}
    for r in records:
        if r.is_proposal:
            chains.setdefault(r.number, []).insert(0, r)
        elif r.retry_of is not None and not r.second_retry:
            chains.setdefault(r.origin, []).append(r)
    outcomes = []
    for origin, chain in sorted(chains.items()):
        if chain[0].number != origin:  # retries of a trial that is not a proposal
            continue
        outcomes.append(
            ProposalOutcome(
                origin=origin,
                final=max(chain, key=lambda r: r.number),
                attempts=len(chain),
                losses=sum(1 for r in chain if r.status == "lost"),
                trained=sum(1 for r in chain if r.status == "trained"),
            )
        )
    return outcomes


def gene_choices_attrs(choices: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The study's system attribute listing every gene's readable choices in index order
    (`design.<gene>` values are among them)."""
    return {GENE_CHOICES_ATTR: {gene: list(values) for gene, values in choices.items()}}


def gene_choices(study_system_attrs: Mapping[str, Any]) -> dict[str, tuple]:
    """Reads `gene_choices_attrs` back (empty for a study written before it existed)."""
    table = study_system_attrs.get(GENE_CHOICES_ATTR) or {}
    return {gene: tuple(values) for gene, values in table.items()}


def outcome_shortfall(record: TrialRecord) -> float:
    """Sum of the outcome (non-cost) violations of a trained record."""
    return sum(v for k, v in record.violations.items() if k not in COST_NAMES)


def rank_key(record: TrialRecord, objective: Objective) -> tuple[float, ...]:
    """Sort key of a trained record, best first.

    Feasible designs come first, then by how little the cost limits are exceeded (only
    designs trained without the cost pre-filter exceed them), then by how little the outcome
    requirements are missed; within that, by the objective (`search.ledger.objective.design_order`).
    The one rank of the search: the leaderboard, `covidnet compare`, the finish's
    confirmation order and the strategies use it.

    Args:
        record: a trained record.
        objective: the search objective.

    Returns:
        A tuple; smaller is better.
    """
    assert record.last is not None
    over = sum(record.violations.get(k, 0.0) for k in COST_NAMES)
    head = (0.0 if record.feasible else 1.0, over, outcome_shortfall(record))
    return (*head, *_design_order(record, record.last.metrics, objective))


def _design_order(
    record: TrialRecord, metrics: EvalMetrics, objective: Objective
) -> tuple[float, ...]:
    return design_order(
        objective,
        accuracy=metrics.accuracy,
        macs=float(record.macs or 0),
        params=float(record.params_count or 0),
    )


def rung_rank_key(record: TrialRecord, rung: int, objective: Objective) -> tuple[float, ...]:
    """Sort key of a record's result at one rung (for successive halving), best first:
    requirements met first, then by how little they are missed, then the objective."""
    result = record.rungs[rung]
    shortfall = sum(result.violations.values())
    feasible = 0.0 if shortfall <= 0 else 1.0
    return (feasible, shortfall, *_design_order(record, result.metrics, objective))


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, MACs) points no other point dominates (higher accuracy and
    fewer MACs, one of them strictly): the one definition of the front, for the leaderboard
    and `covidnet compare` alike."""
    return [
        i
        for i, (acc, macs) in enumerate(points)
        if not any(
            a >= acc and m <= macs and (a > acc or m < macs)
            for j, (a, m) in enumerate(points)
            if j != i
        )
    ]


def pareto_front(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Feasible trained records not dominated in (higher accuracy, fewer MACs)."""
    pool = [r for r in records if r.is_trained and r.feasible]
    points = [(r.last.metrics.accuracy, float(r.macs or 0)) for r in pool]
    return [pool[i] for i in pareto_indices(points)]


def compact_json(value: Any) -> str:
    """JSON without whitespace (for attributes that hold JSON text)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
