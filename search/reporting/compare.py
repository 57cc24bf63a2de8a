"""Comparing searches, the data: load runs, rank their candidates, write the tables.

`load_run(workdir)` reads one search's trial store (its Optuna study; see
`search.ledger.records`) and its `leaderboard.json` (requirements, objective, best design);
`ranked` orders the trained candidates of several runs by `search.ledger.records.rank_key`
(the leaderboard's one rank) and `comparison_rows` gives every candidate as one JSON-ready
row; `best_so_far` follows a run's best design (same rank) as its trials finish, and
`param_importances` asks Optuna which genes the trained designs' accuracy and cost depend on;
`write_tables(runs, out_dir)` writes the rows:

    comparison.csv / comparison.json   every candidate of every run: trained ones ranked
                                       (feasible first), then those never trained, with why

The figures are drawn by `search.reporting.compare_figures`; `write_comparison` in
`search.reporting.compare_report` writes tables, figures and the offline HTML page.

Example:
    >>> runs = [load_run("runs/quickstart"), load_run("runs/other")]
    >>> rows = comparison_rows(runs)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from covidnet_jax.arch import ArchSpec, spec_from_json
from covidnet_jax.errors import ConfigError, SpecError, UserError
from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.typed_yaml import from_dict
from search.config import Objective, RequirementsConfig
from search.ledger import store
from search.ledger.records import TrialRecord, pareto_indices, rank_key

__all__ = [
    "CONNECTIVITY",
    "MIN_IMPORTANCE_DESIGNS",
    "Candidate",
    "CompareError",
    "Importance",
    "ProgressPoint",
    "RunData",
    "best_so_far",
    "comparison_rows",
    "design_knobs",
    "front_keys",
    "gene_label",
    "importance_targets",
    "load_run",
    "open_search_study",
    "param_importances",
    "ranked",
    "read_training_curve",
    "requirements_config",
    "shared_objective",
    "write_atomic",
    "write_tables",
]

LEADERBOARD_JSON = "leaderboard.json"
# Spec connectivity by knob value (0, 1, 2), so a knob axis can be labelled with names.
CONNECTIVITY = ("none", "residual", "dense")
TRIALS_DIR = store.TRIALS_DIR
TRAIN_LOG = "metrics.jsonl"


class CompareError(UserError):
    """A folder given to `covidnet compare` is not a search, or holds nothing to compare."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One proposed design of one run.

    Attributes:
        run: the run's name.
        trial: the Optuna trial number.
        status: "trained", "infeasible", "failed", ... (see `search.ledger.records`).
        spec_hash: the spec's content hash ("" when never decoded).
        summary: the spec's one-line summary.
        spec_json: the spec JSON ("" when unknown).
        macs, params, activation_bytes: the analytic cost (None when unknown).
        rung, steps: the last trained fidelity rung and its training steps (None untrained).
        val_accuracy: validation accuracy at that rung.
        test_accuracy: test accuracy (only the run's best design is ever tested).
        sensitivity, ppv: per-class validation sensitivity and PPV.
        netscore: NetScore at that rung (None untrained).
        feasible: whether every requirement holds.
        reason: why not (one line; "" when feasible).
        compile_s, train_s: seconds compiling and training, over all rungs.
        is_best: whether this is the run's selected best design.
        val_interval: the validation accuracy's two-sided interval at the run's confidence
            (None untrained).
        test_interval: likewise for the test accuracy (the best design only).
        record: the trial record (ranking goes through `search.ledger.records.rank_key`, the one
            rank of the search, so the comparison orders designs as the leaderboard does).
    """

    run: str
    trial: int
    status: str
    spec_hash: str
    summary: str
    spec_json: str
    macs: int | None
    params: int | None
    activation_bytes: int | None
    rung: int | None
    steps: int | None
    val_accuracy: float | None
    test_accuracy: float | None
    sensitivity: Mapping[str, float]
    ppv: Mapping[str, float]
    netscore: float | None
    feasible: bool
    reason: str
    compile_s: float
    train_s: float
    is_best: bool = False
    val_interval: tuple[float, float] | None = None
    test_interval: tuple[float, float] | None = None
    record: TrialRecord | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def trained(self) -> bool:
        """Whether the candidate has validation metrics."""
        return self.val_accuracy is not None


@dataclasses.dataclass(frozen=True)
class RunData:
    """One search, as read from its workdir.

    Attributes:
        name: a short name (the workdir's name).
        workdir: the search's working directory.
        artifacts: where its trial runs and leaderboard are (`search.artifact_root`, else
            the workdir).
        class_names: the data's classes.
        objective: the search objective ("min_macs", "max_netscore", "pareto").
        requirements: the requirements as plain data (`search.config.RequirementsConfig`).
        candidates: every proposed candidate except duplicates, trial order.
        best: the best design's summary (`best/metrics.json`), or None.
        distributions: gene name -> the Optuna distribution of its choice index (what
            `param_importances` needs to rebuild trials).
    """

    name: str
    workdir: Path
    artifacts: Path
    class_names: tuple[str, ...]
    objective: str
    requirements: Mapping[str, Any]
    candidates: tuple[Candidate, ...]
    best: Mapping[str, Any] | None
    distributions: Mapping[str, optuna.distributions.BaseDistribution] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )


def open_search_study(
    workdir: Path, storage_url: str | None, study_name: str | None
) -> optuna.Study:
    """Loads a search's Optuna study (the only one in its storage unless `study_name`).

    Raises:
        CompareError: if the storage holds no such study, or several and none is named.
    """
    storage = store.open_storage(workdir, storage_url)
    names = store.search_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise CompareError(
                f"{workdir}: the storage holds {len(names)} studies "
                f"({', '.join(names) or 'none'}); cannot tell which is this search's"
            )
        study_name = names[0]
    elif study_name not in names:
        raise CompareError(f"{workdir}: no study {study_name!r} in the storage")
    return store.load_study(storage, study_name)


def _class_names(records: Sequence[TrialRecord]) -> tuple[str, ...]:
    for record in records:
        if record.last is not None:
            return tuple(record.last.metrics.class_names)
    for record in records:
        if record.spec_json:
            try:
                return tuple(spec_from_json(record.spec_json).class_names)
            except SpecError:
                continue
    return ()


def _test_accuracy(best: Mapping[str, Any] | None, trial: int) -> float | None:
    if not best or best.get("trial") != trial:
        return None
    test = best.get("test")
    if isinstance(test, Mapping) and "accuracy" in test:
        return float(test["accuracy"])
    return None


def _test_metrics(best: Mapping[str, Any] | None, trial: int) -> EvalMetrics | None:
    if not best or best.get("trial") != trial:
        return None
    test = best.get("test")
    if isinstance(test, Mapping) and "confusion" in test:
        return EvalMetrics.from_dict(dict(test))
    return None


def _interval(metrics: EvalMetrics | None, reqs: RequirementsConfig) -> tuple[float, float] | None:
    if metrics is None:
        return None
    e = metrics.estimate("accuracy", level=reqs.confidence, method=reqs.interval)
    return (e.low, e.high)


def _candidate(
    name: str, record: TrialRecord, best: Mapping[str, Any] | None, reqs: RequirementsConfig
) -> Candidate:
    last = record.last
    trained = record.is_trained
    metrics = last.metrics if (trained and last is not None) else None
    test = _test_metrics(best, record.number)
    reason = record.reason
    return Candidate(
        run=name,
        trial=record.number,
        status=record.status or record.state.lower(),
        spec_hash=record.spec_hash or "",
        summary=record.summary,
        spec_json=record.spec_json,
        macs=record.macs,
        params=record.params_count,
        activation_bytes=record.activation_bytes,
        rung=last.rung if metrics is not None else None,
        steps=last.steps if metrics is not None else None,
        val_accuracy=metrics.accuracy if metrics is not None else None,
        test_accuracy=_test_accuracy(best, record.number),
        sensitivity=(
            dict(zip(metrics.class_names, metrics.sensitivity, strict=True)) if metrics else {}
        ),
        ppv=dict(zip(metrics.class_names, metrics.ppv, strict=True)) if metrics else {},
        netscore=record.netscore() if metrics is not None else None,
        feasible=bool(trained and record.feasible),
        reason=reason if reason or trained else record.status,
        compile_s=record.compile_s,
        train_s=record.train_s,
        is_best=bool(best) and best.get("trial") == record.number,
        val_interval=_interval(metrics, reqs),
        test_interval=_interval(test, reqs),
        record=record,
    )


def load_run(
    workdir: str | Path, *, storage_url: str | None = None, study_name: str | None = None
) -> RunData:
    """Reads one search's candidates from its trial store and leaderboard.

    Args:
        workdir: the search's working directory.
        storage_url: the search's database URL when it did not use the workdir's journal.
        study_name: the study, when the storage holds several.

    Returns:
        The `RunData`.

    Raises:
        CompareError: one line, for a missing folder, a folder that is not a search, or a
            search without any finished trial.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise CompareError(
            f"{workdir}: no such folder; pass a search workdir such as runs/quickstart"
        )
    try:
        artifacts = store.artifact_dir(workdir)
    except ConfigError as err:
        raise CompareError(str(err)) from None
    board_path = artifacts / LEADERBOARD_JSON
    if storage_url is None and not store.journal_path(workdir).is_file():
        raise CompareError(
            f"{workdir}: not a search workdir (no {store.JOURNAL_NAME}); run "
            f"`covidnet search --config FILE --workdir {workdir}` first"
        )
    board: dict[str, Any] = {}
    if board_path.is_file():
        try:
            board = json.loads(board_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CompareError(f"{board_path}: unreadable ({err})") from None
    study = open_search_study(workdir, storage_url, study_name or board.get("study"))
    trials = study.get_trials(deepcopy=False)  # one read (a database query for PostgreSQL)
    records = [TrialRecord.from_trial(t) for t in trials]
    records = [r for r in records if r.status != "duplicate"]
    finished = [r for r in records if r.is_trained or r.status in ("infeasible", "failed")]
    if not finished:
        raise CompareError(
            f"{workdir}: the search has no finished trial yet; let it run (or resume it) first"
        )
    best = board.get("best")
    reqs = requirements_config(board.get("requirements") or {})
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in trials:
        distributions.update(trial.distributions)
    candidates = tuple(
        _candidate(workdir.name, r, best, reqs)
        for r in records
        if r.is_trained or r.status not in ("running", "waiting", "")
    )
    return RunData(
        name=workdir.name,
        workdir=workdir,
        artifacts=artifacts,
        class_names=_class_names(records),
        objective=str(board.get("objective", "pareto")),
        requirements=dict(board.get("requirements") or {}),
        candidates=candidates,
        best=best,
        distributions=distributions,
    )


def requirements_config(data: Mapping[str, Any]) -> RequirementsConfig:
    """A leaderboard's `requirements` as typed settings (defaults for an older leaderboard
    whose requirements do not parse)."""
    try:
        return from_dict(RequirementsConfig, dict(data), path="requirements")
    except ConfigError:
        return RequirementsConfig()  # an older leaderboard: intervals at 95%, Wilson


def shared_objective(runs: Sequence[RunData]) -> Objective:
    """The objective the runs share, or "pareto" when they differ (or is unknown)."""
    objectives = {run.objective for run in runs}
    objective = objectives.pop() if len(objectives) == 1 else "pareto"
    return objective if objective in ("min_macs", "max_netscore") else "pareto"  # type: ignore[return-value]


def ranked(runs: Sequence[RunData]) -> list[Candidate]:
    """Trained candidates of all runs, best first, by `search.ledger.records.rank_key` (the
    leaderboard's rank) under the objective the runs share, or "pareto" when they differ."""
    objective = shared_objective(runs)
    trained = [c for run in runs for c in run.candidates if c.trained and c.record is not None]
    return sorted(
        trained,
        key=lambda c: (rank_key(c.record, objective), c.run, c.trial),  # type: ignore[arg-type]
    )


def front_keys(candidates: Sequence[Candidate]) -> set[tuple[str, int]]:
    """(run, trial) of the feasible trained candidates on the accuracy/MACs Pareto front
    (`search.ledger.records.pareto_indices`, the search's one front)."""
    pool = [c for c in candidates if c.trained and c.feasible and c.macs is not None]
    points = [(float(c.val_accuracy or 0.0), float(c.macs or 0)) for c in pool]
    return {(pool[i].run, pool[i].trial) for i in pareto_indices(points)}


@dataclasses.dataclass(frozen=True)
class ProgressPoint:
    """The state of a search when one more of its candidates finished.

    Attributes:
        finished: candidates finished so far, this one included (trained or rejected).
        elapsed_s: seconds from the start of the run's first trial to this one's end.
        trial: the trial that just finished.
        best: the best trained design so far by `search.ledger.records.rank_key` (None
            before the first one was trained).
    """

    finished: int
    elapsed_s: float
    trial: int
    best: Candidate | None


def best_so_far(run: RunData, objective: Objective) -> list[ProgressPoint]:
    """The run's best design so far, one point per finished candidate in order of finishing.

    Args:
        run: one search.
        objective: the objective ranking the designs (`shared_objective` of the compared runs,
            so every line of a figure uses the one rank).

    Returns:
        One `ProgressPoint` per candidate, in order of its end time (then trial number);
        candidates without an end time are left out.
    """
    timed = [c for c in run.candidates if c.record is not None and c.record.completed is not None]
    timed.sort(key=lambda c: (c.record.completed, c.trial))  # type: ignore[union-attr]
    starts = [c.record.started for c in timed if c.record.started is not None]  # type: ignore[union-attr]
    start = min(starts, default=None)
    points, best, best_key = [], None, None
    for i, c in enumerate(timed, start=1):
        if c.trained:
            key = rank_key(c.record, objective)  # type: ignore[arg-type]
            if best_key is None or key < best_key:
                best, best_key = c, key
        end = float(c.record.completed)  # type: ignore[union-attr, arg-type]
        points.append(ProgressPoint(i, end - (end if start is None else start), c.trial, best))
    return points


# Fewest trained designs `param_importances` works from: Optuna's random forests fit on fewer
# rank genes by noise (with 12 genes, each needs a few designs that differ in it).
MIN_IMPORTANCE_DESIGNS = 8


def importance_targets(objective: Objective) -> tuple[str, ...]:
    """What the parameter importance explains under `objective`: validation accuracy always
    (it decides feasibility), and the objective's cost side (log10 MACs, or NetScore)."""
    if objective == "max_netscore":
        return ("validation accuracy", "NetScore")
    return ("validation accuracy", "log10 MACs")


def _target_value(c: Candidate, target: str) -> float | None:
    if target == "validation accuracy":
        return c.val_accuracy
    if target == "NetScore":
        return c.netscore
    if target == "log10 MACs":
        return math.log10(c.macs) if c.macs else None
    raise ValueError(f"importance target {target!r}; expected one of {_TARGETS}")


_TARGETS = ("validation accuracy", "log10 MACs", "NetScore")


@dataclasses.dataclass(frozen=True)
class Importance:
    """How much each gene explains one target over a run's trained designs.

    Attributes:
        run: the run's name.
        target: "validation accuracy", "log10 MACs" or "NetScore".
        values: gene name -> importance (they sum to 1), largest first; empty with a `note`.
        designs: trained designs it was computed from.
        note: why there are no values ("" when there are).
    """

    run: str
    target: str
    values: Mapping[str, float]
    designs: int
    note: str = ""


def param_importances(
    run: RunData,
    targets: Sequence[str],
    *,
    evaluator: optuna.importance.BaseImportanceEvaluator | None = None,
) -> list[Importance]:
    """Optuna's parameter importance (`optuna.importance.get_param_importances`) of the
    run's genes, over its trained designs only (a candidate the cost model rejected says
    nothing about accuracy).

    Args:
        run: one search.
        targets: names from `importance_targets`.
        evaluator: Optuna's evaluator (default fANOVA, seeded so reports repeat).

    Returns:
        One `Importance` per target; with fewer than `MIN_IMPORTANCE_DESIGNS` trained designs,
        genes that never varied or a target that did not, its `note` says so instead.
    """
    trained = [c for c in run.candidates if c.trained and c.record is not None]
    genes = {
        g: d for g, d in run.distributions.items() if all(g in c.record.params for c in trained)
    }
    found = []
    for target in targets:
        rows = [(c, _target_value(c, target)) for c in trained]
        rows = [(c, v) for c, v in rows if v is not None and math.isfinite(v)]
        varied = {g for g in genes if len({c.record.params[g] for c, _ in rows}) > 1}
        note = ""
        if len(rows) < MIN_IMPORTANCE_DESIGNS:
            note = f"needs at least {MIN_IMPORTANCE_DESIGNS} trained designs, {len(rows)} so far"
        elif not varied:
            note = "no gene differs between the trained designs"
        elif len({v for _, v in rows}) == 1:  # fANOVA: "zero total variance in all trees"
            note = f"every trained design has the same {target}"
        if note:
            found.append(Importance(run.name, target, {}, len(rows), note))
            continue
        study = optuna.create_study(direction="maximize")
        study.add_trials(
            [
                optuna.trial.create_trial(
                    params={g: c.record.params[g] for g in genes},  # type: ignore[union-attr]
                    distributions=dict(genes),
                    value=value,
                )
                for c, value in rows
            ]
        )
        values = optuna.importance.get_param_importances(
            study,
            evaluator=evaluator or optuna.importance.FanovaImportanceEvaluator(seed=0),
            params=sorted(varied),
        )
        found.append(Importance(run.name, target, dict(values), len(rows)))
    return found


def gene_label(name: str) -> str:
    """A gene's name as people read it: `s1.m0.width` -> "stage 2 module 1 width
    (s1.m0.width)"; stages and modules counted from 1, as in the spec summary."""
    parts = name.split(".")
    words = []
    for part in parts:
        if part[:1] == "s" and part[1:].isdigit():
            words.append(f"stage {int(part[1:]) + 1}")
        elif part[:1] == "m" and part[1:].isdigit():
            words.append(f"module {int(part[1:]) + 1}")
        else:
            words.append(part)
    readable = " ".join(words)
    return readable if readable == name else f"{readable} ({name})"


def comparison_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """The combined leaderboard: ranked trained candidates, then untrained ones.

    Returns:
        One JSON-ready dict per candidate with keys rank (None untrained), run, trial,
        status, feasible, reason, pareto, best, summary, macs, params, activation_bytes,
        rung, steps, val_accuracy, val_interval [low, high], test_accuracy, test_interval,
        sensitivity {class: value}, ppv
        {class: value}, netscore, compile_s, train_s, spec_hash.
    """
    top = ranked(runs)
    front = front_keys(top)
    untrained = [c for run in runs for c in run.candidates if not c.trained]
    rows = []
    for rank, c in enumerate([*top, *untrained], start=1):
        rows.append(
            {
                "rank": rank if c.trained else None,
                "run": c.run,
                "trial": c.trial,
                "status": c.status,
                "feasible": c.feasible,
                "reason": c.reason,
                "pareto": (c.run, c.trial) in front,
                "best": c.is_best,
                "summary": c.summary,
                "macs": c.macs,
                "params": c.params,
                "activation_bytes": c.activation_bytes,
                "rung": c.rung,
                "steps": c.steps,
                "val_accuracy": c.val_accuracy,
                "val_interval": None if c.val_interval is None else list(c.val_interval),
                "test_accuracy": c.test_accuracy,
                "test_interval": None if c.test_interval is None else list(c.test_interval),
                "sensitivity": dict(c.sensitivity),
                "ppv": dict(c.ppv),
                "netscore": c.netscore,
                "compile_s": c.compile_s,
                "train_s": c.train_s,
                "spec_hash": c.spec_hash,
            }
        )
    return rows


def _flat_row(row: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k not in ("sensitivity", "ppv")}
    for name in class_names:
        flat[f"sensitivity:{name}"] = row["sensitivity"].get(name)
        flat[f"ppv:{name}"] = row["ppv"].get(name)
    return {k: "" if v is None else v for k, v in flat.items()}


def design_knobs(spec_json: str) -> dict[str, float]:
    """The design knobs of a PEPX spec, as numbers for parallel coordinates.

    Args:
        spec_json: the spec JSON.

    Returns:
        input size, stem width, and per stage its depth, output width, mean expansion width
        and mean kernel size; {} for specs that are not PEPX designs or do not parse.
    """
    try:
        spec = spec_from_json(spec_json)
    except SpecError:
        return {}
    if not isinstance(spec, ArchSpec):
        return {}
    knobs = {"input": float(spec.input_size), "stem": float(spec.stem.channels)}
    for i, stage in enumerate(spec.stages, start=1):
        modules = stage.modules
        knobs[f"s{i} depth"] = float(len(modules))
        knobs[f"s{i} width"] = float(stage.width)
        knobs[f"s{i} expand"] = float(np.mean([m.expand for m in modules]))
        knobs[f"s{i} kernel"] = float(np.mean([m.kernel_size for m in modules]))
    knobs["connectivity"] = float(CONNECTIVITY.index(spec.connectivity))
    return knobs


def read_training_curve(trial_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Training loss, validation loss and validation accuracy over steps, from a run's
    `metrics.jsonl`.

    Args:
        trial_dir: a training workdir (a search trial's folder).

    Returns:
        {"loss": [(step, train loss)], "val_loss": [(step, validation loss)],
        "val_accuracy": [(step, accuracy)]}; empty lists when there is no log. Lines that do
        not parse (a write cut short) are skipped.
    """
    curve: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": [], "val_accuracy": []}
    path = Path(trial_dir) / TRAIN_LOG
    if not path.is_file():
        return curve
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event") if isinstance(event, dict) else None
            if kind == "train" and "loss" in event:
                curve["loss"].append((int(event["step"]), float(event["loss"])))
            elif kind == "validation":
                for key, name in (("val_accuracy", "accuracy"), ("val_loss", "loss")):
                    if event.get(name) is not None:
                        curve[key].append((int(event["step"]), float(event[name])))
    for key in curve:  # a resumed run logs some steps twice; keep the last value per step
        curve[key] = sorted(dict(curve[key]).items())
    return curve


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file renamed into place, so a reader never
    sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tables(
    runs: Sequence[RunData], out_dir: Path, rows: Sequence[Mapping[str, Any]]
) -> dict[str, Path]:
    """Writes `comparison.json` (runs and rows) and `comparison.csv` (rows, per-class rates
    flattened into `sensitivity:<class>` / `ppv:<class>` columns) into `out_dir`.

    Args:
        runs: the searches compared.
        out_dir: an existing folder.
        rows: `comparison_rows(runs)`.

    Returns:
        {"json": path, "csv": path}.
    """
    paths = {"json": out_dir / "comparison.json", "csv": out_dir / "comparison.csv"}
    document = {
        "runs": [
            {
                "name": run.name,
                "workdir": str(run.workdir),
                "objective": run.objective,
                "requirements": dict(run.requirements),
                "class_names": list(run.class_names),
                "best": run.best,
            }
            for run in runs
        ],
        "rows": list(rows),
    }
    write_atomic(paths["json"], (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    class_names = list(dict.fromkeys(n for run in runs for n in run.class_names))
    flat = [_flat_row(row, class_names) for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    write_atomic(paths["csv"], buffer.getvalue().encode("utf-8"))
    return paths
