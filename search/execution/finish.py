"""The end of a search: confirm the best feasible design, train it to full fidelity, test once.

A design is declared only after it is *confirmed*: the top-ranked feasible candidate's own run
is continued to the full-fidelity budget, and `confirm.seeds` further runs train it from
scratch, each with another training seed and judged on another patient-disjoint validation
split (`validation_draw`), so that neither a lucky initialization nor the validation images the
design was chosen on decide. Every run must meet the requirements by the search's decision
rule (`search.ledger.requirements.outcome_violations`: each run's interval is valid for that run;
pooling the runs' counts would treat the same images as independent evidence several times).
When one fails, the next-ranked feasible candidate is tried, up to `confirm.max_candidates`.
Each confirmation run is recorded in the trial store as a study user attribute
`confirmation:<trial>:<k>` (`ConfirmationRun.to_dict()`), so a resumed finish reuses it.

Then the confirmed design's own run is scored on the test split, once, and every outcome
requirement is reported on validation and test with intervals and a verdict
(`search.ledger.requirements.final_verdicts`). Nothing is decided on the test split.

Files written in the workdir (see docs/CONTRACTS.md):

- `confirmation/<trial>_<k>/`: the confirmation runs (`_0` is the trial's own run continued to
  full fidelity; it moves to `best/train` once the design is confirmed).
- `best/spec.json`: the confirmed design (`covidnet_jax.arch.spec_from_json` reads it).
- `best/train/`: its training run at the full-fidelity budget (a `covidnet train` workdir).
- `best/metrics.json`: `{"trial", "spec_hash", "summary", "macs", "params", "steps",
  "checkpoint", "validation", "test" (EvalMetrics.to_dict()), "feasible", "violations",
  "judged_on", "decision", "requirements" (RequirementReport.to_dict() per outcome
  requirement), "verdict" ("met" | "not met" | "inconclusive" on test, over all
  requirements), "confirmation" (every run tried, ConfirmationRun.to_dict())}`. When this file
  already exists for the same design, a re-run reuses it instead of scoring the test split
  again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from covidnet_jax.arch import AnySpec, spec_from_json
from covidnet_jax.checkpointing import copy_finished
from covidnet_jax.metrics import EvalMetrics
from search.config import SearchSettings
from search.execution.evaluation import EvalFailure, EvalRequest, Evaluator
from search.ledger import store
from search.ledger.records import TrialRecord
from search.ledger.requirements import (
    Cost,
    RequirementReport,
    cost_violations,
    describe_violations,
    final_verdicts,
    is_feasible,
    outcome_violations,
)
from search.reporting.leaderboard import ranked

BEST_DIR = "best"
CONFIRM_DIR = "confirmation"
ATTR_PREFIX = "confirmation:"


@dataclasses.dataclass(frozen=True)
class ConfirmationRun:
    """One full-fidelity run of a candidate during confirmation.

    Attributes:
        trial: the candidate's trial number.
        index: 0 for the trial's own run continued to full fidelity; k > 0 for the k-th
            confirmation run (training seed + k, validation draw k, from scratch).
        spec_hash: the design.
        seed: the training seed.
        validation_draw: the validation split that judged it.
        steps: the training budget.
        workdir: the run's directory, relative to the search workdir.
        metrics: validation metrics of its last checkpoint (None when training failed).
        violations: requirement shortfalls by the search's decision rule.
        failure: why training failed ("" when it did not).
    """

    trial: int
    index: int
    spec_hash: str
    seed: int
    validation_draw: int
    steps: int
    workdir: str
    metrics: EvalMetrics | None
    violations: dict[str, float]
    failure: str = ""

    @property
    def holds(self) -> bool:
        """Whether the run trained and met every requirement."""
        return self.metrics is not None and is_feasible(self.violations)

    @property
    def key(self) -> str:
        """The study user attribute that records it."""
        return f"{ATTR_PREFIX}{self.trial}:{self.index}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the study user attribute's value)."""
        return {
            "trial": self.trial,
            "index": self.index,
            "spec_hash": self.spec_hash,
            "seed": self.seed,
            "validation_draw": self.validation_draw,
            "steps": self.steps,
            "workdir": self.workdir,
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
            "violations": dict(self.violations),
            "failure": self.failure,
            "holds": self.holds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfirmationRun:
        """The inverse of `to_dict`."""
        metrics = data.get("metrics")
        return cls(
            trial=int(data["trial"]),
            index=int(data["index"]),
            spec_hash=str(data["spec_hash"]),
            seed=int(data["seed"]),
            validation_draw=int(data["validation_draw"]),
            steps=int(data["steps"]),
            workdir=str(data["workdir"]),
            metrics=None if metrics is None else EvalMetrics.from_dict(dict(metrics)),
            violations={k: float(v) for k, v in dict(data["violations"]).items()},
            failure=str(data.get("failure", "")),
        )


class RunLog:
    """Where confirmation runs are recorded: a mapping of study user attributes.

    Args:
        attrs: the study's user attributes as they are now (read once).
        write: stores one attribute (`optuna.Study.set_user_attr`); None keeps them in memory.
    """

    def __init__(
        self, attrs: Mapping[str, Any], write: Callable[[str, Any], None] | None = None
    ) -> None:
        self._runs = {
            key: ConfirmationRun.from_dict(value)
            for key, value in attrs.items()
            if key.startswith(ATTR_PREFIX)
        }
        self._write = write

    def get(self, trial: int, index: int) -> ConfirmationRun | None:
        """The recorded run, if any."""
        return self._runs.get(f"{ATTR_PREFIX}{trial}:{index}")

    def put(self, run: ConfirmationRun) -> None:
        """Records a run (in the store when there is one)."""
        self._runs[run.key] = run
        if self._write is not None:
            self._write(run.key, run.to_dict())


@dataclasses.dataclass(frozen=True)
class BestDesign:
    """The outcome of `finish_best`.

    Attributes:
        summary: the content of `best/metrics.json` (None when no design was confirmed).
        message: one line for the user.
        reports: per outcome requirement, validation and test with intervals and verdicts.
        tried: every confirmation run, in order (also for a search that confirmed nothing).
    """

    summary: Mapping[str, Any] | None
    message: str
    reports: tuple[RequirementReport, ...] = ()
    tried: tuple[ConfirmationRun, ...] = ()


def feasible_ranked(records: Sequence[TrialRecord], settings: SearchSettings) -> list[TrialRecord]:
    """Trained designs that meet every requirement, best first (the confirmation order)."""
    return [r for r in ranked(records, settings.objective) if r.feasible]


class _Confirmer:
    """Runs and judges the confirmation runs of candidates (one `finish_best` call)."""

    def __init__(
        self,
        workdir: Path,
        settings: SearchSettings,
        evaluator: Evaluator,
        log: RunLog,
        train_seed: int,
    ) -> None:
        self.workdir, self.settings, self.evaluator = workdir, settings, evaluator
        self.log, self.train_seed = log, train_seed
        self.tried: list[ConfirmationRun] = []

    def confirm(self, record: TrialRecord) -> list[ConfirmationRun] | None:
        """The candidate's runs when every one holds, else None (it stops at the first
        failing run, so a weak candidate costs one run)."""
        spec = spec_from_json(record.spec_json)
        steps = max(self.settings.budget.full_fidelity_steps, record.last.steps)
        runs = []
        for index in range(self.settings.confirm.seeds + 1):
            run = self._run(record, spec, index, steps)
            self.tried.append(run)
            runs.append(run)
            if not run.holds:
                return None
        return runs

    def _run(self, record: TrialRecord, spec: AnySpec, index: int, steps: int) -> ConfirmationRun:
        spec_hash = spec.content_hash()
        seed = self.train_seed + index
        previous = self.log.get(record.number, index)
        if (
            previous is not None
            and previous.spec_hash == spec_hash
            and previous.steps == steps
            and (previous.metrics is None or (self.workdir / previous.workdir).exists())
        ):
            return previous
        relative = Path(CONFIRM_DIR) / f"{record.number}_{index}"
        run_dir = self.workdir / relative
        if index == 0 and not run_dir.exists():
            # The trial's own run, continued: its checkpoints come along, so the design that
            # is confirmed is the design whose weights the search trained and ranked.
            source = self.workdir / store.TRIALS_DIR / str(record.number)
            if source.exists():
                # Finished steps only, and all at once: a kill mid-copy leaves no half run.
                copy_finished(source, run_dir)
        request = EvalRequest(
            spec=spec,
            steps=steps,
            workdir=run_dir,
            init_from=None,
            rung=-1,
            seed=None if index == 0 else seed,
            validation_draw=index,
        )
        outcome = self.evaluator.train(request)
        if isinstance(outcome, EvalFailure):
            run = ConfirmationRun(
                record.number,
                index,
                spec_hash,
                seed,
                index,
                steps,
                str(relative),
                None,
                {},
                failure=outcome.reason,
            )
        else:
            violations = {
                **cost_violations(self.settings.requirements, _cost_of(record)),
                **outcome_violations(self.settings.requirements, outcome.metrics),
            }
            run = ConfirmationRun(
                record.number, index, spec_hash, seed, index, steps, str(relative),
                outcome.metrics, violations,
            )  # fmt: skip
        self.log.put(run)
        return run


def _cost_of(record: TrialRecord) -> Cost:
    return Cost(record.macs or 0, record.params_count or 0, record.activation_bytes or 0)


def describe_run(run: ConfirmationRun, settings: SearchSettings) -> str:
    """One line: `trial 7 run 1 (seed 1, validation draw 1): accuracy 0.012 below ...`."""
    head = (
        f"trial {run.trial} run {run.index} "
        f"(seed {run.seed}, validation draw {run.validation_draw})"
    )
    if run.metrics is None:
        return f"{head}: training failed: {run.failure}"
    if run.holds:
        return f"{head}: holds (validation accuracy {run.metrics.accuracy:.3f})"
    return f"{head}: {describe_violations(run.violations, settings.requirements)}"


def finish_best(
    workdir: str | Path,
    records: Sequence[TrialRecord],
    settings: SearchSettings,
    evaluator: Evaluator,
    *,
    train_seed: int = 0,
    log: RunLog | None = None,
) -> BestDesign:
    """Confirms the best feasible design, trains it to full fidelity and tests it once.

    Args:
        workdir: the search's artifact root (`SearchJob.artifact_dir`: its workdir unless
            `search.artifact_root` is set); trial runs are read and `best/` written there.
        records: every trial's record.
        settings: the `search:` section.
        evaluator: trains and tests.
        train_seed: the experiment's training seed (confirmation run k uses seed + k).
        log: where confirmation runs are recorded and found again (default: in memory).

    Returns:
        The confirmed design's summary, or a message saying why there is none.
    """
    workdir = Path(workdir)
    log = log if log is not None else RunLog({})
    candidates = feasible_ranked(records, settings)[: settings.confirm.max_candidates]
    if not candidates:
        return BestDesign(None, "no design met the requirements")
    summary_path = workdir / BEST_DIR / "metrics.json"
    previous = None
    if summary_path.exists():
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
    confirmer = _Confirmer(workdir, settings, evaluator, log, train_seed)
    for record in candidates:
        runs = confirmer.confirm(record)
        if runs is None:
            continue
        if previous is not None and previous.get("spec_hash") == record.spec_hash:
            # Declared by an earlier invocation: the test split is not scored again. (A
            # summary written before verdicts existed gets them from its stored metrics.)
            reports = _reports_from(settings, previous)
            previous = {
                **previous,
                "requirements": [r.to_dict() for r in reports],
                "verdict": overall_verdict(reports),
            }
            message = f"best design: trial {record.number} (already finished)"
            return BestDesign(previous, message, reports, tuple(confirmer.tried))
        return _declare(workdir, record, runs, confirmer, settings, evaluator)
    numbers = ", ".join(str(r.number) for r in candidates)
    return BestDesign(
        None,
        f"no design was confirmed: trials {numbers} met the requirements in the search but "
        f"not in every confirmation run (see {CONFIRM_DIR}/ and the leaderboard)",
        tried=tuple(confirmer.tried),
    )


def _reports_from(
    settings: SearchSettings, summary: Mapping[str, Any]
) -> tuple[RequirementReport, ...]:
    validation = EvalMetrics.from_dict(dict(summary["validation"]))
    test = EvalMetrics.from_dict(dict(summary["test"])) if summary.get("test") else None
    return tuple(final_verdicts(settings.requirements, validation, test))


def overall_verdict(reports: Sequence[RequirementReport]) -> str:
    """ "not met" if any requirement is not met on test, "met" if all are, else
    "inconclusive" (no requirements: "met")."""
    verdicts = [r.verdict for r in reports]
    if "not met" in verdicts:
        return "not met"
    if all(v == "met" for v in verdicts):
        return "met"
    return "inconclusive"


def _declare(
    workdir: Path,
    record: TrialRecord,
    runs: Sequence[ConfirmationRun],
    confirmer: _Confirmer,
    settings: SearchSettings,
    evaluator: Evaluator,
) -> BestDesign:
    best_dir = workdir / BEST_DIR
    train_dir = best_dir / "train"
    own = runs[0]
    best_dir.mkdir(parents=True, exist_ok=True)
    if (workdir / own.workdir).resolve() != train_dir.resolve():
        if train_dir.exists():
            shutil.rmtree(train_dir)
        os.replace(workdir / own.workdir, train_dir)
        own = dataclasses.replace(own, workdir=os.path.relpath(train_dir, workdir))
        confirmer.log.put(own)
        confirmer.tried = [own if r.key == own.key else r for r in confirmer.tried]
    tried = confirmer.tried
    spec = spec_from_json(record.spec_json)
    request = EvalRequest(spec=spec, steps=own.steps, workdir=train_dir, init_from=None, rung=-1)
    test = evaluator.test(request)
    assert own.metrics is not None
    reports = tuple(final_verdicts(settings.requirements, own.metrics, test))
    reqs = settings.requirements
    summary = {
        "trial": record.number,
        "spec_hash": record.spec_hash,
        "summary": record.summary,
        "macs": record.macs,
        "params": record.params_count,
        "steps": own.steps,
        "checkpoint": os.path.relpath(train_dir, workdir),
        "judged_on": f"the last checkpoint (step {own.steps}) of each run",
        "decision": {
            "rule": reqs.decision,
            "confidence": reqs.confidence,
            "interval": reqs.interval,
        },
        "validation": own.metrics.to_dict(),
        "test": test.to_dict(),
        "feasible": own.holds,
        "violations": dict(own.violations),
        "requirements": [r.to_dict() for r in reports],
        "verdict": overall_verdict(reports),
        "confirmation": [r.to_dict() for r in tried],
    }
    (best_dir / "spec.json").write_text(spec.to_json() + "\n", encoding="utf-8")
    tmp = (best_dir / "metrics.json").with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, best_dir / "metrics.json")
    confirmed = f"confirmed over {len(runs)} runs" if len(runs) > 1 else "not re-confirmed"
    return BestDesign(
        summary, f"best design: trial {record.number} ({confirmed})", reports, tuple(tried)
    )
