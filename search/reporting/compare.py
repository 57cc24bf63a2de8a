"""Comparing searches: one leaderboard across runs, plots, tables and a self-contained report.

`load_run(workdir)` reads one search's trial store (its Optuna study; see `search.ledger.records`)
and its `leaderboard.json` (requirements, objective, best design); `write_comparison(runs,
out_dir)` writes:

    comparison.csv / comparison.json   every candidate of every run: trained ones ranked
                                       (feasible first), then those never trained, with why
    pareto.png                         validation accuracy vs MACs: feasible and infeasible
                                       designs, the Pareto front, the requirement lines, and
                                       for COVIDx class names the paper's reference networks
    knobs.png                          parallel coordinates of the design knobs
    curves.png                         training loss and validation accuracy of the top designs
    report.html                        all of the above in one offline file (images embedded)

Example:
    >>> runs = [load_run("runs/quickstart"), load_run("runs/other")]
    >>> paths = write_comparison(runs, "runs/compare")
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

from covidnet_jax.arch import COVIDX_CLASSES, ArchSpec, spec_from_json
from covidnet_jax.errors import ConfigError, SpecError, UserError
from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.report_html import Figure, Paragraph, Section, Table, render_html
from covidnet_jax.typed_yaml import from_dict
from search.config import RequirementsConfig
from search.ledger import store
from search.ledger.records import TrialRecord, pareto_indices, rank_key
from search.ledger.requirements import final_verdicts, format_verdicts

__all__ = [
    "PAPER_REFERENCES",
    "Candidate",
    "CompareError",
    "RunData",
    "comparison_rows",
    "design_knobs",
    "load_run",
    "open_search_study",
    "read_training_curve",
    "write_comparison",
]

LEADERBOARD_JSON = "leaderboard.json"
_CONNECTIVITY = ("none", "residual", "dense")  # knob values 0, 1, 2
TRIALS_DIR = "trials"
TRAIN_LOG = "metrics.jsonl"

# The paper's v4 comparison on the COVIDx3 test set (Wang & Wong 2020, arXiv 2003.09871 v4):
# name, MACs, params, accuracy. The ResNet-50 and VGG-19 rows are quoted from memory of that
# table, not re-read; treat them as approximate.
PAPER_REFERENCES: tuple[tuple[str, float, float, float], ...] = (
    ("COVID-Net CXR3-B", 7.50e9, 11.75e6, 0.933),
    ("COVID-Net CXR3-C", 5.55e9, 9.2e6, 0.923),
    ("ResNet-50", 17.90e9, 24.97e6, 0.906),
    ("VGG-19", 89.63e9, 20.37e6, 0.830),
)


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
        class_names: the data's classes.
        objective: the search objective ("min_macs", "max_netscore", "pareto").
        requirements: the requirements as plain data (`search.config.RequirementsConfig`).
        candidates: every proposed candidate except duplicates, trial order.
        best: the best design's summary (`best/metrics.json`), or None.
    """

    name: str
    workdir: Path
    class_names: tuple[str, ...]
    objective: str
    requirements: Mapping[str, Any]
    candidates: tuple[Candidate, ...]
    best: Mapping[str, Any] | None


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
        if record.attrs.get("spec"):
            try:
                return tuple(spec_from_json(record.attrs["spec"]).class_names)
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
    reason = str(record.attrs.get("reason", ""))
    return Candidate(
        run=name,
        trial=record.number,
        status=record.status or record.state.lower(),
        spec_hash=record.spec_hash or "",
        summary=str(record.attrs.get("summary", "")),
        spec_json=str(record.attrs.get("spec", "")),
        macs=record.macs,
        params=record.params_count,
        activation_bytes=record.attrs.get("activation_bytes"),
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
        compile_s=float(record.attrs.get("compile_s", 0.0) or 0.0),
        train_s=float(record.attrs.get("train_s", 0.0) or 0.0),
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
    board_path = workdir / LEADERBOARD_JSON
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
    records = [r for r in store.read_records(study) if r.status != "duplicate"]
    finished = [r for r in records if r.is_trained or r.status in ("infeasible", "failed")]
    if not finished:
        raise CompareError(
            f"{workdir}: the search has no finished trial yet; let it run (or resume it) first"
        )
    best = board.get("best")
    reqs = _requirements_config(board.get("requirements") or {})
    candidates = tuple(
        _candidate(workdir.name, r, best, reqs)
        for r in records
        if r.is_trained or r.status not in ("running", "waiting", "")
    )
    return RunData(
        name=workdir.name,
        workdir=workdir,
        class_names=_class_names(records),
        objective=str(board.get("objective", "pareto")),
        requirements=dict(board.get("requirements") or {}),
        candidates=candidates,
        best=best,
    )


def _requirements_config(data: Mapping[str, Any]) -> RequirementsConfig:
    try:
        return from_dict(RequirementsConfig, dict(data), path="requirements")
    except ConfigError:
        return RequirementsConfig()  # an older leaderboard: intervals at 95%, Wilson


def ranked(runs: Sequence[RunData]) -> list[Candidate]:
    """Trained candidates of all runs, best first, by `search.ledger.records.rank_key` (the
    leaderboard's rank) under the objective the runs share, or "pareto" when they differ."""
    objectives = {run.objective for run in runs}
    objective = objectives.pop() if len(objectives) == 1 else "pareto"
    if objective not in ("min_macs", "max_netscore", "pareto"):
        objective = "pareto"
    trained = [c for run in runs for c in run.candidates if c.trained and c.record is not None]
    return sorted(
        trained,
        key=lambda c: (rank_key(c.record, objective), c.run, c.trial),  # type: ignore[arg-type]
    )


def _front(candidates: Sequence[Candidate]) -> set[tuple[str, int]]:
    pool = [c for c in candidates if c.trained and c.feasible and c.macs is not None]
    points = [(float(c.val_accuracy or 0.0), float(c.macs or 0)) for c in pool]
    return {(pool[i].run, pool[i].trial) for i in pareto_indices(points)}


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
    front = _front(top)
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
    knobs["connectivity"] = float(_CONNECTIVITY.index(spec.connectivity))
    return knobs


def read_training_curve(trial_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Training loss and validation accuracy over steps, from a run's `metrics.jsonl`.

    Args:
        trial_dir: a training workdir (a search trial's folder).

    Returns:
        {"loss": [(step, train loss)], "val_accuracy": [(step, accuracy)]}; empty lists when
        there is no log. Lines that do not parse (a write cut short) are skipped.
    """
    curve: dict[str, list[tuple[int, float]]] = {"loss": [], "val_accuracy": []}
    path = Path(trial_dir) / TRAIN_LOG
    if not path.is_file():
        return curve
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "train" and "loss" in event:
                curve["loss"].append((int(event["step"]), float(event["loss"])))
            elif event.get("event") == "validation" and "accuracy" in event:
                curve["val_accuracy"].append((int(event["step"]), float(event["accuracy"])))
    for key in curve:  # a resumed run logs some steps twice; keep the last value per step
        curve[key] = sorted(dict(curve[key]).items())
    return curve


# -- plots ---------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no GUI backend, no globals

    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _requirement(runs: Sequence[RunData], key: str) -> float | None:
    values = {run.requirements.get(key) for run in runs} - {None}
    return values.pop() if len(values) == 1 else None


def _is_covidx(runs: Sequence[RunData]) -> bool:
    return all(tuple(run.class_names) == COVIDX_CLASSES for run in runs)


def plot_pareto(runs: Sequence[RunData]) -> bytes:
    """Validation accuracy vs MACs of every trained design, as PNG bytes.

    Feasible designs are filled, infeasible ones hollow; the Pareto front of the feasible
    ones is a step line; candidates rejected by the cost model before training are ticks on
    the bottom axis; requirement lines are drawn when the runs share them; with COVIDx class
    names the paper's networks are added (their test accuracy on COVIDx3).
    """
    fig = _new_figure(8.5, 5.5)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    everything = [c for run in runs for c in run.candidates]
    for run, colour in zip(runs, colours, strict=True):
        trained = [c for c in run.candidates if c.trained and c.macs]
        ok = [c for c in trained if c.feasible]
        bad = [c for c in trained if not c.feasible]
        for group in (ok, bad):
            with_ci = [c for c in group if c.val_interval is not None]
            if with_ci:
                ax.errorbar(
                    [c.macs for c in with_ci],
                    [c.val_accuracy for c in with_ci],
                    yerr=[
                        [c.val_accuracy - c.val_interval[0] for c in with_ci],
                        [c.val_interval[1] - c.val_accuracy for c in with_ci],
                    ],
                    fmt="none",
                    ecolor=colour,
                    alpha=0.35,
                    linewidth=1,
                    zorder=2,
                )
        if ok:
            ax.scatter(
                [c.macs for c in ok],
                [c.val_accuracy for c in ok],
                color=colour,
                marker="o",
                label=f"{run.name}: feasible ({len(ok)})",
                zorder=3,
            )
        if bad:
            ax.scatter(
                [c.macs for c in bad],
                [c.val_accuracy for c in bad],
                facecolors="none",
                edgecolors=colour,
                marker="o",
                label=f"{run.name}: misses requirements ({len(bad)})",
                zorder=3,
            )
        rejected = [c.macs for c in run.candidates if not c.trained and c.macs]
        if rejected:
            ax.plot(
                rejected,
                [0.0] * len(rejected),
                linestyle="none",
                marker="|",
                markersize=12,
                color=colour,
                alpha=0.6,
                label=f"{run.name}: not trained ({len(rejected)})",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        for c in trained:
            if c.is_best:
                ax.annotate(
                    "best",
                    (c.macs, c.val_accuracy),
                    textcoords="offset points",
                    xytext=(6, 6),
                    fontsize=8,
                    color=colour,
                )
    front = _front(everything)
    points = sorted((c.macs, c.val_accuracy) for c in everything if (c.run, c.trial) in front)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front (feasible)")
    max_macs = _requirement(runs, "max_macs")
    if max_macs:
        ax.axvline(
            max_macs, color="crimson", linestyle="--", linewidth=1, label=f"max MACs {max_macs:.3g}"
        )
    min_accuracy = _requirement(runs, "min_accuracy")
    if min_accuracy is not None:
        rules = {run.requirements.get("decision", "lower_bound") for run in runs}
        judged = " (judged by the lower bound)" if rules == {"lower_bound"} else ""
        ax.axhline(
            min_accuracy,
            color="crimson",
            linestyle=":",
            linewidth=1,
            label=f"min accuracy {min_accuracy:.3g}{judged}",
        )
    if _is_covidx(runs):
        # CXR3-B and CXR3-C sit close together: label one above, one below.
        offsets = ((6, 4), (-10, -12), (6, -10), (6, -10))
        for (name, macs, _params, accuracy), offset in zip(PAPER_REFERENCES, offsets, strict=True):
            ax.scatter([macs], [accuracy], marker="*", s=120, color="dimgray", zorder=4)
            ax.annotate(
                name,
                (macs, accuracy),
                textcoords="offset points",
                xytext=offset,
                ha="right" if offset[0] < 0 else "left",
                fontsize=8,
                color="dimgray",
            )
        ax.scatter(
            [],
            [],
            marker="*",
            s=120,
            color="dimgray",
            label="paper, COVIDx3 test (not comparable to other data)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (log scale)")
    ax.set_ylabel("validation accuracy (bars: confidence interval)")
    ax.set_title("Accuracy vs MACs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def plot_knobs(runs: Sequence[RunData], *, limit: int = 60) -> bytes:
    """Parallel coordinates of the design knobs of the top trained designs, as PNG bytes.

    Each axis is scaled to its own range (printed at its ends); lines are coloured by
    validation accuracy, and infeasible designs are dashed.
    """
    fig = _new_figure(11, 5)
    ax = fig.add_subplot()
    designs = [(c, design_knobs(c.spec_json)) for c in ranked(runs)[:limit]]
    designs = [(c, k) for c, k in designs if k]
    if not designs:
        ax.text(0.5, 0.5, "no PEPX designs were trained", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    names = list(dict.fromkeys(name for _, knobs in designs for name in knobs))
    names += ["log10 MACs", "val accuracy"]
    table = np.full((len(designs), len(names)), np.nan)
    for i, (c, knobs) in enumerate(designs):
        for j, name in enumerate(names[:-2]):
            table[i, j] = knobs.get(name, np.nan)
        table[i, -2] = math.log10(c.macs) if c.macs else np.nan
        table[i, -1] = c.val_accuracy
    low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    varied = [j for j in range(len(names)) if high[j] > low[j] or j >= len(names) - 2]
    constant = [f"{names[j]} = {low[j]:.4g}" for j in range(len(names)) if j not in varied]
    names = [names[j] for j in varied]
    table, low, high = table[:, varied], low[varied], high[varied]
    span = np.where(high > low, high - low, 1.0)
    scaled = (table - low) / span
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    accuracies = table[:, -1]
    a_low, a_high = float(np.nanmin(accuracies)), float(np.nanmax(accuracies))
    for i, (c, _) in enumerate(reversed(designs)):
        row = scaled[len(designs) - 1 - i]
        shade = (c.val_accuracy - a_low) / (a_high - a_low) if a_high > a_low else 1.0
        ax.plot(
            range(len(names)),
            row,
            color=cmap(shade),
            linewidth=1.2,
            linestyle="-" if c.feasible else "--",
            alpha=0.85,
        )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    for j, name in enumerate(names):
        ax.axvline(j, color="lightgray", linewidth=0.8, zorder=0)
        ends = (low[j], high[j])
        labels = [_CONNECTIVITY[int(v)] if name == "connectivity" else f"{v:.3g}" for v in ends]
        ax.annotate(
            labels[0], (j, 0), textcoords="offset points", xytext=(2, -2), fontsize=6, va="top"
        )
        ax.annotate(
            labels[1], (j, 1), textcoords="offset points", xytext=(2, 2), fontsize=6, va="bottom"
        )
    if constant:
        ax.set_xlabel("same in every design: " + ", ".join(constant), fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(
        f"Design knobs of the top {len(designs)} designs (colour: validation "
        "accuracy; dashed: misses requirements)"
    )
    return _png(fig)


def plot_curves(runs: Sequence[RunData], *, top: int = 5) -> bytes:
    """Training loss and validation accuracy over steps of the top designs, as PNG bytes."""
    fig = _new_figure(11, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    workdirs = {run.name: run.workdir for run in runs}
    shown = 0
    for i, c in enumerate(ranked(runs)[:top]):
        curve = read_training_curve(workdirs[c.run] / TRIALS_DIR / str(c.trial))
        label = f"{c.run} #{c.trial}" if len(runs) > 1 else f"trial {c.trial}"
        if curve["loss"]:
            loss_ax.plot(*zip(*curve["loss"], strict=True), color=f"C{i}", label=label)
        if curve["val_accuracy"]:
            acc_ax.plot(
                *zip(*curve["val_accuracy"], strict=True),
                color=f"C{i}",
                marker="o",
                markersize=3,
                label=label,
            )
        shown += bool(curve["loss"] or curve["val_accuracy"])
    for ax, title in ((loss_ax, "training loss"), (acc_ax, "validation accuracy")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if shown:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5, 0.5, "no training logs found", ha="center", va="center", transform=ax.transAxes
            )
    return _png(fig)


# -- report --------------------------------------------------------------------------------


def _fmt_count(value: int | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _requirements_text(requirements: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (
        ("max_macs", "MACs <="),
        ("max_params", "params <="),
        ("max_activation_bytes", "activation bytes <="),
        ("min_accuracy", "accuracy >="),
    ):
        if requirements.get(key) is not None:
            parts.append(f"{label} {requirements[key]:.4g}")
    for name, req in (requirements.get("classes") or {}).items():
        for key, label in (("min_sensitivity", "sensitivity"), ("min_ppv", "PPV")):
            if req.get(key) is not None:
                parts.append(f"{name} {label} >= {req[key]:.4g}")
    return ", ".join(parts) or "none"


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str | None:
    if value is None:
        return None
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _verdict_paragraphs(runs: Sequence[RunData]) -> list[Paragraph]:
    """Per run, the final design's requirements on validation and test with the verdict."""
    found = []
    for run in runs:
        best = run.best
        if not best or "validation" not in best or "confusion" not in best.get("test", {}):
            found.append(Paragraph(f"{run.name}: no design was declared."))
            continue
        reqs = _requirements_config(run.requirements)
        validation = EvalMetrics.from_dict(dict(best["validation"]))
        test = EvalMetrics.from_dict(dict(best["test"])) if best.get("test") else None
        reports = final_verdicts(reqs, validation, test)
        text = format_verdicts(reports, reqs)
        verdict = best.get("verdict", "not recorded")
        found.append(
            Paragraph(
                f"{run.name}: trial {best.get('trial')}, {best.get('macs') or 0:,} MACs, "
                f"verdict on test: {verdict}.\n{text}",
                preformatted=True,
            )
        )
    return found


def _leaderboard_table(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], multi: bool, limit: int
) -> Table:
    columns = [
        "#",
        *(["run"] if multi else []),
        "trial",
        "feasible",
        "MACs",
        "params",
        "act. mem",
        "rung (steps)",
        "val acc [CI]",
        "test acc [CI]",
    ]
    columns += [f"sens {n}" for n in class_names] + [f"PPV {n}" for n in class_names]
    columns += ["NetScore", "train s", "design / why not"]
    body, dim = [], set()
    for i, row in enumerate(r for r in rows if r["rank"] is not None):
        if i >= limit:
            break
        cells = [
            row["rank"],
            *([row["run"]] if multi else []),
            row["trial"],
            ("best " if row["best"] else "") + ("yes" if row["feasible"] else "no"),
            _fmt_count(row["macs"]),
            _fmt_count(row["params"]),
            _fmt_count(row["activation_bytes"]),
            f"{row['rung']} ({row['steps']})",
            _with_interval(row["val_accuracy"], row["val_interval"]),
            _with_interval(row["test_accuracy"], row["test_interval"]),
        ]
        cells += [row["sensitivity"].get(n) for n in class_names]
        cells += [row["ppv"].get(n) for n in class_names]
        cells += [
            row["netscore"],
            row["train_s"],
            row["summary"] if row["feasible"] else f"{row['reason']} | {row['summary']}",
        ]
        if not row["feasible"]:
            dim.add(i)
        body.append(cells)
    return Table(columns, body, dim_rows=frozenset(dim), table_id="leaderboard")


def _untrained_table(rows: Sequence[Mapping[str, Any]], multi: bool) -> Table:
    columns = [*(["run"] if multi else []), "trial", "status", "MACs", "params", "why"]
    body = [
        [
            *([row["run"]] if multi else []),
            row["trial"],
            row["status"],
            _fmt_count(row["macs"]),
            _fmt_count(row["params"]),
            row["reason"],
        ]
        for row in rows
        if row["rank"] is None
    ]
    return Table(columns, body, table_id="untrained")


def _runs_table(runs: Sequence[RunData]) -> Table:
    columns = [
        "run",
        "workdir",
        "objective",
        "requirements",
        "proposed",
        "trained",
        "feasible",
        "best trial",
        "best test accuracy",
    ]
    body = []
    for run in runs:
        trained = [c for c in run.candidates if c.trained]
        best = next((c for c in run.candidates if c.is_best), None)
        body.append(
            [
                run.name,
                str(run.workdir),
                run.objective,
                _requirements_text(run.requirements),
                len(run.candidates),
                len(trained),
                sum(c.feasible for c in trained),
                best.trial if best else "none",
                best.test_accuracy if best else None,
            ]
        )
    return Table(columns, body, table_id="runs")


def write_comparison(
    runs: Sequence[RunData], out_dir: str | Path, *, top: int = 5, table_limit: int = 200
) -> dict[str, Path]:
    """Writes the comparison's tables, plots and HTML report into `out_dir`.

    Args:
        runs: the searches to compare.
        out_dir: the output folder (created).
        top: designs whose training curves are drawn.
        table_limit: most leaderboard rows in the HTML report (the CSV/JSON hold all).

    Returns:
        Name -> path of every file written (csv, json, pareto, knobs, curves, html).

    Raises:
        CompareError: if no run has a trained candidate or `out_dir` is a file.
    """
    if not any(c.trained for run in runs for c in run.candidates):
        names = ", ".join(str(run.workdir) for run in runs)
        raise CompareError(f"{names}: no trained candidate to compare yet")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"{out_dir}: exists and is not a folder; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = list(dict.fromkeys(n for run in runs for n in run.class_names))
    rows = comparison_rows(runs)
    paths = {
        "json": out_dir / "comparison.json",
        "csv": out_dir / "comparison.csv",
        "pareto": out_dir / "pareto.png",
        "knobs": out_dir / "knobs.png",
        "curves": out_dir / "curves.png",
        "html": out_dir / "report.html",
    }
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
        "rows": rows,
    }
    _write_text(paths["json"], json.dumps(document, indent=2) + "\n")
    flat = [_flat_row(row, class_names) for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    _write_text(paths["csv"], buffer.getvalue())
    figures = {
        "pareto": plot_pareto(runs),
        "knobs": plot_knobs(runs),
        "curves": plot_curves(runs, top=top),
    }
    for name, png in figures.items():
        _write_bytes(paths[name], png)
    multi = len(runs) > 1
    sections = [
        Section("Runs", [_runs_table(runs)]),
        Section(
            "Final verdict",
            [
                Paragraph(
                    "Each run's declared design, requirement by requirement: the validation "
                    "estimate the search decided on and the test estimate scored once "
                    "afterwards, with confidence intervals. Met: the one-sided lower bound "
                    "clears the minimum; not met: the upper bound is below it; inconclusive: "
                    "the split cannot tell."
                ),
                *_verdict_paragraphs(runs),
            ],
        ),
        Section(
            "Leaderboard",
            [
                Paragraph(
                    "Trained designs, best first: feasible designs first, then by the "
                    "objective. Validation metrics of the last checkpoint at each design's last "
                    "fidelity rung, with confidence intervals; test accuracy only for the "
                    "declared design, scored once."
                ),
                _leaderboard_table(rows, class_names, multi, table_limit),
            ],
        ),
        Section(
            "Accuracy vs MACs",
            [
                Figure(
                    figures["pareto"],
                    "accuracy vs MACs",
                    "Filled: meets every requirement. Hollow: trained "
                    "but misses a requirement. Ticks: never trained.",
                )
            ],
        ),
        Section("Design knobs", [Figure(figures["knobs"], "parallel coordinates")]),
        Section(
            "Training curves",
            [Figure(figures["curves"], "training curves", f"The top {top} designs.")],
        ),
        Section(
            "Not trained",
            [
                Paragraph(
                    "Candidates rejected by the cost model before training, or whose "
                    "training failed, with the reason."
                ),
                _untrained_table(rows, multi),
            ],
        ),
    ]
    title = "Design comparison: " + ", ".join(run.name for run in runs)
    counts = f"{len(rows)} candidates, {sum(r['rank'] is not None for r in rows)} trained"
    _write_text(paths["html"], render_html(title, sections, subtitle=counts))
    return paths


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
