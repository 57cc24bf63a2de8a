"""Comparing searches, the figures: accuracy vs MACs, design knobs, training curves.

Each function draws one figure from `search.reporting.compare.RunData` and returns the
Matplotlib figure (`covidnet_jax.figures.new_figure`: no pyplot, no global state);
`covidnet_jax.figures.figure_png` turns it into PNG bytes for the report:

    pareto_figure   validation accuracy vs MACs: feasible and infeasible designs with
                    interval bars, the Pareto front, never-trained candidates as ticks, the
                    requirement lines; beside it, in a panel of its own, the paper's
                    published networks (their COVIDx3 *test* accuracy, another data set and
                    split, so never on the validation axis)
    knobs_figure    parallel coordinates of the design knobs, ticks at the values, a colour
                    bar for validation accuracy
    curves_figure   training and validation loss and validation accuracy over steps, every
                    trained design in grey, the top designs in colour, rung boundaries
    progress_figure the best design so far (the one rank) against candidates finished and
                    against wall time, one line per run, a star where the first feasible
                    design was found
    importance_figure  Optuna's parameter importance of each gene for validation accuracy
                    and the objective's cost, or a note when there are too few designs
    times_figure    compile and train seconds of every trained design, stacked

Example:
    >>> png = figure_png(pareto_figure([load_run("runs/quickstart")]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from covidnet_jax.arch import COVIDX_CLASSES
from covidnet_jax.figures import new_figure
from covidnet_jax.intervals import Estimate
from search.reporting.compare import (
    CONNECTIVITY,
    TRIALS_DIR,
    Candidate,
    Importance,
    RunData,
    best_so_far,
    design_knobs,
    front_keys,
    gene_label,
    ranked,
    read_training_curve,
    requirements_config,
    shared_objective,
)
from search.reporting.leaderboard import format_count

__all__ = [
    "PAPER_REFERENCES",
    "curves_figure",
    "importance_figure",
    "knob_label",
    "knobs_figure",
    "needed_accuracy",
    "pareto_figure",
    "progress_figure",
    "times_figure",
]

# The paper's v4 comparison on the COVIDx3 test set (Wang & Wong 2020, arXiv 2003.09871 v4):
# name, MACs, params, accuracy. The ResNet-50 and VGG-19 rows are quoted from memory of that
# table, not re-read; treat them as approximate.
PAPER_REFERENCES: tuple[tuple[str, float, float, float], ...] = (
    ("COVID-Net CXR3-B", 7.50e9, 11.75e6, 0.933),
    ("COVID-Net CXR3-C", 5.55e9, 9.2e6, 0.923),
    ("ResNet-50", 17.90e9, 24.97e6, 0.906),
    ("VGG-19", 89.63e9, 20.37e6, 0.830),
)


def _requirement(runs: Sequence[RunData], key: str) -> float | None:
    values = {run.requirements.get(key) for run in runs} - {None}
    return values.pop() if len(values) == 1 else None


def _is_covidx(runs: Sequence[RunData]) -> bool:
    return all(tuple(run.class_names) == COVIDX_CLASSES for run in runs)


def _macs_axis(ax: Any, values: Sequence[float]) -> None:
    """The x axis of MACs, labelled "250k", "1M": log-scaled when the designs span more than
    about a decade, linear otherwise (a log axis over less than a decade has one label)."""
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in values if v > 0]
    wide = bool(positive) and max(positive) / min(positive) >= 15
    if wide:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_count(round(v))))
    ax.set_xlabel("MACs per image" + (" (log scale)" if wide else ""))


def _interval_bars(ax: Any, group: Sequence[Candidate], colour: str) -> None:
    with_ci = [c for c in group if c.val_interval is not None and c.val_accuracy is not None]
    if not with_ci:
        return
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


def _draw_references(ax: Any) -> None:
    """The paper's networks as horizontal bars of their published test accuracy."""
    names = [f"{name}\n{format_count(round(macs))} MACs" for name, macs, _, _ in PAPER_REFERENCES]
    accuracies = [accuracy for *_, accuracy in PAPER_REFERENCES]
    positions = range(len(names))
    ax.barh(positions, accuracies, color="lightgray", edgecolor="dimgray", gid="paper")
    for y, accuracy in zip(positions, accuracies, strict=True):
        ax.text(accuracy - 0.01, y, f"{accuracy:.3f}", ha="right", va="center", fontsize=8)
    ax.set_yticks(list(positions), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("test accuracy on COVIDx3 (paper)")
    ax.set_title("Published networks\n(other data and split:\nnot comparable)", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)


def needed_accuracy(minimum: float, trials: int, confidence: float, method: str) -> float | None:
    """The lowest validation accuracy whose one-sided lower bound at `confidence` clears
    `minimum` on `trials` images (None when even 100% does not).

    Example: minimum 0.87 on 600 images at 95% (Wilson) needs 0.890.
    """
    for successes in range(math.ceil(minimum * trials), trials + 1):
        estimate = Estimate.of(successes, trials, method=method)  # type: ignore[arg-type]
        if estimate.lower_bound(confidence) >= minimum:
            return successes / trials
    return None


def _accuracy_requirement(ax: Any, runs: Sequence[RunData], minimum: float) -> None:
    """The minimum accuracy as a line; when the runs judge by the lower bound, a band above
    it up to the accuracy a design needs on the validation split for its lower bound to
    clear the minimum (the requirement's uncertainty at that split size)."""
    ax.axhline(
        minimum,
        color="crimson",
        linestyle=":",
        linewidth=1.2,
        gid="min-accuracy",
        label=f"min accuracy {minimum:.3f}",
    )
    reqs = [requirements_config(run.requirements) for run in runs]
    if (
        any(r.decision != "lower_bound" for r in reqs)
        or len({(r.confidence, r.interval) for r in reqs}) != 1
    ):
        return
    sizes = [
        c.record.last.metrics.estimate("accuracy").trials
        for run in runs
        for c in run.candidates
        if c.trained and c.record is not None and c.record.last is not None
    ]
    if not sizes:
        return
    trials = int(np.median(sizes))
    needed = needed_accuracy(minimum, trials, reqs[0].confidence, reqs[0].interval)
    if needed is None:
        return
    ax.axhspan(
        minimum,
        needed,
        color="crimson",
        alpha=0.12,
        linewidth=0,
        gid="needed-accuracy",
        label=(
            f"accuracy whose {reqs[0].confidence:.0%} lower bound clears the min on "
            f"{trials} validation images: >= {needed:.3f}"
        ),
    )


def pareto_figure(runs: Sequence[RunData]) -> Any:
    """Validation accuracy vs MACs of every candidate of `runs`.

    Feasible designs are filled, infeasible ones hollow, each with its confidence interval;
    the declared (best) design of each run is ringed; the Pareto front of the feasible ones
    is a step line; candidates rejected before training are ticks on the bottom axis;
    requirement lines are drawn when the runs share them. With COVIDx class names the
    paper's networks get a panel of their own: their accuracies are COVIDx3 test
    accuracies, not validation accuracies of this data.

    Returns:
        The Matplotlib figure; its first axes is the validation-accuracy axis.
    """
    covidx = _is_covidx(runs)
    fig = new_figure(11 if covidx else 8.5, 6)
    if covidx:
        ax, ref_ax = fig.subplots(1, 2, width_ratios=(3.2, 1))
    else:
        ax, ref_ax = fig.add_subplot(), None
    colours = [f"C{i % 10}" for i in range(len(runs))]
    everything = [c for run in runs for c in run.candidates]
    for run, colour in zip(runs, colours, strict=True):
        trained = [c for c in run.candidates if c.trained and c.macs]
        ok = [c for c in trained if c.feasible]
        bad = [c for c in trained if not c.feasible]
        _interval_bars(ax, ok, colour)
        _interval_bars(ax, bad, colour)
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
        best = [c for c in trained if c.is_best]
        if best:
            ax.scatter(
                [c.macs for c in best],
                [c.val_accuracy for c in best],
                s=160,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                marker="D",
                label=f"{run.name}: declared design (trial {best[0].trial})",
                zorder=4,
            )
    front = front_keys(everything)
    points = sorted((c.macs, c.val_accuracy) for c in everything if (c.run, c.trial) in front)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front (feasible)")
    max_macs = _requirement(runs, "max_macs")
    if max_macs:
        ax.axvline(
            max_macs,
            color="crimson",
            linestyle="--",
            linewidth=1,
            label=f"max MACs {format_count(round(max_macs))}",
        )
    min_accuracy = _requirement(runs, "min_accuracy")
    if min_accuracy is not None:
        _accuracy_requirement(ax, runs, min_accuracy)
    _macs_axis(ax, [float(c.macs) for c in everything if c.macs])
    ax.set_ylabel("validation accuracy (bars: confidence interval)")
    ax.set_title("Validation accuracy vs MACs")
    ax.grid(True, which="both", alpha=0.3)
    if ref_ax is not None:
        _draw_references(ref_ax)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False, markerscale=0.7)
    return fig


def knob_label(name: str, value: float) -> str:
    """A knob value as people read it: the connectivity's name, MACs as "250k", accuracy to 3
    decimals, integers without a point, other numbers to 3 significant digits."""
    if name == "connectivity" and float(value).is_integer() and 0 <= value < len(CONNECTIVITY):
        return CONNECTIVITY[int(value)]
    if name == "MACs (log)":
        return format_count(round(10**value))
    if name == "val accuracy":
        return f"{value:.3f}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def _knob_ticks(column: np.ndarray) -> list[float]:
    """Where an axis gets labels: every value it takes when there are few, else five evenly
    spaced values."""
    values = np.unique(column[~np.isnan(column)])
    if len(values) <= 6:
        return [float(v) for v in values]
    return [float(v) for v in np.linspace(values[0], values[-1], 5)]


def knobs_figure(runs: Sequence[RunData], *, limit: int = 60) -> Any:
    """Parallel coordinates of the design knobs of the top `limit` trained designs.

    Each axis is scaled to its own range and labelled at its values; lines are coloured by
    validation accuracy (colour bar on the right), infeasible designs are dashed; knobs that
    are the same in every design are named under the plot.

    Returns:
        The Matplotlib figure.
    """
    fig = new_figure(12, 5.5)
    ax = fig.add_subplot()
    designs = [(c, design_knobs(c.spec_json)) for c in ranked(runs)[:limit]]
    designs = [(c, k) for c, k in designs if k]
    if not designs:
        ax.text(0.5, 0.5, "no PEPX designs were trained", ha="center", va="center")
        ax.set_axis_off()
        return fig
    names = list(dict.fromkeys(name for _, knobs in designs for name in knobs))
    names += ["MACs (log)", "val accuracy"]
    table = np.full((len(designs), len(names)), np.nan)
    for i, (c, knobs) in enumerate(designs):
        for j, name in enumerate(names[:-2]):
            table[i, j] = knobs.get(name, np.nan)
        table[i, -2] = math.log10(c.macs) if c.macs else np.nan
        table[i, -1] = c.val_accuracy
    low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    varied = [j for j in range(len(names)) if high[j] > low[j] or j >= len(names) - 2]
    constant = [
        f"{names[j]} = {knob_label(names[j], low[j])}" for j in range(len(names)) if j not in varied
    ]
    names = [names[j] for j in varied]
    table, low, high = table[:, varied], low[varied], high[varied]
    span = np.where(high > low, high - low, 1.0)
    scaled = (table - low) / span
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    accuracies = table[:, -1]
    a_low, a_high = float(np.nanmin(accuracies)), float(np.nanmax(accuracies))
    norm = Normalize(a_low, a_high if a_high > a_low else a_low + 1e-6)
    cmap = colormaps["viridis"]
    for i in reversed(range(len(designs))):  # the best design drawn last, on top
        c = designs[i][0]
        ax.plot(
            range(len(names)),
            scaled[i],
            color=cmap(norm(c.val_accuracy)),
            linewidth=1.2,
            linestyle="-" if c.feasible else "--",
            alpha=0.85,
        )
    for j, name in enumerate(names):
        ax.axvline(j, color="lightgray", linewidth=0.8, zorder=0)
        for value in _knob_ticks(table[:, j]):
            y = (value - low[j]) / span[j]
            ax.plot([j - 0.04, j], [y, y], color="dimgray", linewidth=0.8, zorder=1)
            ax.annotate(
                knob_label(name, value),
                (j, y),
                textcoords="offset points",
                xytext=(3, 0),
                fontsize=7,
                va="center",
                gid="knob-tick",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.3, len(names) - 0.5)
    if constant:
        ax.set_xlabel("same in every design: " + ", ".join(constant), fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.06, 1.06)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(
        f"Design knobs of the top {len(designs)} trained designs (dashed: misses requirements)"
    )
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="validation accuracy")
    return fig


# Matplotlib's default colours without its grey (C7), which the designs outside the top share.
_PALETTE = tuple(f"C{i}" for i in range(10) if i != 7)


def _rung_steps(candidates: Sequence[Candidate]) -> list[int]:
    """The step counts at which fidelity rungs ended, over the candidates."""
    steps = {rung.steps for c in candidates if c.record is not None for rung in c.record.rungs}
    return sorted(s for s in steps if s)


def _legend_label(c: Candidate, multi: bool) -> str:
    name = f"{c.run} #{c.trial}" if multi else f"trial {c.trial}"
    verdict = "feasible" if c.feasible else "misses reqs"
    accuracy = "-" if c.val_accuracy is None else f"{c.val_accuracy:.3f}"
    return f"{name}: {format_count(c.macs)} MACs, val acc {accuracy}, {verdict}"


def curves_figure(runs: Sequence[RunData], *, top: int = 8) -> Any:
    """Loss and validation accuracy over training steps.

    Every trained design is drawn in light grey; the top `top` designs (by the comparison's
    rank) in colour, labelled with their MACs, validation accuracy and verdict. Training
    loss is solid, validation loss dashed with markers; dotted vertical lines mark the steps
    where fidelity rungs end (a design promoted to the next rung resumes from there).

    Returns:
        The Matplotlib figure.
    """
    from matplotlib.lines import Line2D

    fig = new_figure(12, 5.5)
    loss_ax, acc_ax = fig.subplots(1, 2)
    workdirs = {run.name: run.artifacts for run in runs}
    order = ranked(runs)
    multi = len(runs) > 1
    shown = 0
    legend: dict[int, tuple[Any, str]] = {}  # rank -> (line, label)
    for i, c in reversed(list(enumerate(order))):  # the best drawn last, on top
        curve = read_training_curve(workdirs[c.run] / TRIALS_DIR / str(c.trial))
        highlighted = i < top
        style = {
            "color": _PALETTE[i % len(_PALETTE)] if highlighted else "lightgray",
            "linewidth": 1.4 if highlighted else 0.8,
            "zorder": 3 if highlighted else 1,
        }
        lines = []
        if curve["loss"]:
            lines += loss_ax.plot(*zip(*curve["loss"], strict=True), **style)
        if curve["val_loss"]:
            lines += loss_ax.plot(
                *zip(*curve["val_loss"], strict=True),
                **style,
                linestyle="--",
                marker="o",
                markersize=3,
                gid="val-loss",
            )
        if curve["val_accuracy"]:
            lines += acc_ax.plot(
                *zip(*curve["val_accuracy"], strict=True), **style, marker="o", markersize=3
            )
        if lines and highlighted:
            legend[i] = (lines[0], _legend_label(c, multi))
        shown += bool(lines)
    rung_steps = _rung_steps(order)
    for ax, title in (
        (loss_ax, "loss (solid: training, dashed: validation)"),
        (acc_ax, "validation accuracy"),
    ):
        for r, step in enumerate(rung_steps):
            ax.axvline(step, color="black", linestyle=":", linewidth=0.8, gid="rung")
            ax.annotate(
                f"rung {r} ends",
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(-3, -3),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize=7,
                rotation=90,
            )
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if not shown:
            ax.text(
                0.5, 0.5, "no training logs found", ha="center", va="center", transform=ax.transAxes
            )
    if legend:
        handles = [legend[i][0] for i in sorted(legend)]
        labels = [legend[i][1] for i in sorted(legend)]
        others = shown - len(legend)
        if others:
            handles.append(Line2D([], [], color="lightgray"))
            labels.append(f"{others} other trained design{'s' if others > 1 else ''}")
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _objective_value(c: Candidate, objective: str) -> tuple[float, str]:
    """What the best-so-far line plots: the quantity the objective ranks feasible designs by."""
    if objective == "min_macs":
        return float(c.macs or 0), "MACs of the best design (fewer is better)"
    if objective == "max_netscore":
        return float(c.netscore or 0.0), "NetScore of the best design (higher is better)"
    return float(c.val_accuracy or 0.0), "validation accuracy of the best design"


def progress_figure(runs: Sequence[RunData]) -> Any:
    """The best design so far (by `search.ledger.records.rank_key` under the runs' shared
    objective) against candidates finished and against wall time, one line per run.

    Until a run finds a feasible design its line is dashed (the best of the infeasible
    ones); a star marks the candidate that was its first feasible design.

    Returns:
        The Matplotlib figure; axes 0 is against candidates, axes 1 against wall time.
    """
    from matplotlib.ticker import FuncFormatter

    objective = shared_objective(runs)
    fig = new_figure(12, 4.8)
    count_ax, time_ax = fig.subplots(1, 2, sharey=True)
    ylabel = ""
    longest = max((p.elapsed_s for run in runs for p in best_so_far(run, objective)), default=0)
    minutes = longest > 300
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        points = [p for p in best_so_far(run, objective) if p.best is not None]
        if not points:
            continue
        first = next((p for p in points if p.best is not None and p.best.feasible), None)
        for ax, x_of in ((count_ax, "finished"), (time_ax, "elapsed_s")):
            xs = [getattr(p, x_of) / (60 if minutes and x_of == "elapsed_s" else 1) for p in points]
            ys = []
            for p in points:
                y, ylabel = _objective_value(p.best, objective)  # type: ignore[arg-type]
                ys.append(y)
            split = len(points) if first is None else points.index(first)
            if split:  # before any feasible design: the best infeasible one
                ax.step(
                    xs[: split + 1] if first else xs[:split],
                    ys[: split + 1] if first else ys[:split],
                    where="post",
                    color=colour,
                    linestyle="--",
                    linewidth=1.2,
                    gid="infeasible",
                    label=f"{run.name}: best so far, none feasible yet" if ax is count_ax else None,
                )
            if first is not None:
                ax.step(
                    xs[split:],
                    ys[split:],
                    where="post",
                    color=colour,
                    linewidth=1.8,
                    gid="best-so-far",
                    label=f"{run.name}: best feasible so far" if ax is count_ax else None,
                )
                ax.plot(
                    xs[split],
                    ys[split],
                    marker="*",
                    markersize=14,
                    color=colour,
                    markeredgecolor="black",
                    linestyle="none",
                    gid="first-feasible",
                    label=(
                        f"{run.name}: first feasible design (trial {first.best.trial}, "  # type: ignore[union-attr]
                        f"candidate {first.finished})"
                    )
                    if ax is count_ax
                    else None,
                )
    count_ax.set_xlabel("candidates finished (trained or rejected)")
    time_ax.set_xlabel("wall time since the first trial started (" + ("min)" if minutes else "s)"))
    count_ax.set_ylabel(ylabel)
    if objective == "min_macs":
        count_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_count(round(v))))
    for ax, title in ((count_ax, "against candidates"), (time_ax, "against wall time")):
        ax.set_title(f"Best design so far, {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


def importance_figure(importances: Sequence[Importance]) -> Any:
    """Bars of Optuna's parameter importance, one panel per target, one bar colour per run;
    genes labelled as people read them (`search.reporting.compare.gene_label`). A run with
    too few trained designs shows its note instead of bars (in the panel when no run has
    bars, else under the panel's title; either text has gid "importance-note").

    Args:
        importances: from `search.reporting.compare.param_importances`, for one or more runs.

    Returns:
        The Matplotlib figure; one axes per target.
    """
    targets = list(dict.fromkeys(i.target for i in importances))
    run_names = list(dict.fromkeys(i.run for i in importances))
    genes = list(dict.fromkeys(g for i in importances for g in i.values))
    height = max(3.5, 1.2 + 0.32 * len(genes) * max(1, len(run_names)) ** 0.5)
    fig = new_figure(12, height)
    axes = fig.subplots(1, max(1, len(targets)), sharey=True, squeeze=False)[0]
    # Genes in order of their largest importance, the most important on top.
    top = {g: max(i.values.get(g, 0.0) for i in importances) for g in genes}
    genes.sort(key=lambda g: top[g])
    width = 0.8 / max(1, len(run_names))
    for ax, target in zip(axes, targets, strict=False):
        notes = []
        for k, name in enumerate(run_names):
            found = next((i for i in importances if i.run == name and i.target == target), None)
            if found is None:
                continue
            if found.note:
                notes.append(f"{name}: {found.note}" if len(run_names) > 1 else found.note)
                continue
            ys = [j + (k - (len(run_names) - 1) / 2) * width for j in range(len(genes))]
            ax.barh(
                ys,
                [found.values.get(g, 0.0) for g in genes],
                height=width,
                color=f"C{k % 10}",
                gid="importance",
                label=f"{name} ({found.designs} trained designs)",
            )
        title = ax.set_title(f"importance for {target}", fontsize=10)
        if notes and not ax.patches:  # nothing to draw: the note fills the panel
            ax.set_xticks([])
            ax.text(
                0.5,
                0.5,
                "\n".join(notes),
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=10,
                gid="importance-note",
            )
        elif notes:  # under the title, clear of the bars
            title.set_text("\n".join([title.get_text(), *notes]))
            title.set_gid("importance-note")
        ax.set_xlabel("share of the variance explained (fANOVA)")
        ax.grid(True, axis="x", alpha=0.3)
        if genes:
            ax.set_yticks(range(len(genes)), [gene_label(g) for g in genes], fontsize=8)
        else:
            ax.set_yticks([])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    return fig


def times_figure(runs: Sequence[RunData]) -> Any:
    """Compile and train seconds of every trained design (over all its rungs), stacked, in
    trial order per run.

    Returns:
        The Matplotlib figure; its bars carry gid "compile" and "train".
    """
    fig = new_figure(12, 4.2)
    ax = fig.add_subplot()
    multi = len(runs) > 1
    labels, compile_s, train_s = [], [], []
    for run in runs:
        for c in sorted((c for c in run.candidates if c.trained), key=lambda c: c.trial):
            labels.append(f"{run.name} #{c.trial}" if multi else str(c.trial))
            compile_s.append(c.compile_s)
            train_s.append(c.train_s)
    xs = range(len(labels))
    ax.bar(xs, compile_s, color="darkorange", label="compile", gid="compile")
    ax.bar(
        xs, train_s, bottom=compile_s, color="steelblue", label="train and evaluate", gid="train"
    )
    rotation = 90 if multi or len(labels) > 30 else 0
    ax.set_xticks(list(xs), labels, rotation=rotation, fontsize=7 if len(labels) > 30 else 8)
    ax.set_xlabel("trained design (" + ("run #trial" if multi else "trial") + ")")
    ax.set_ylabel("seconds, over all rungs")
    total_c, total_t = sum(compile_s), sum(train_s)
    share = total_c / (total_c + total_t) if total_c + total_t else 0.0
    ax.set_title(
        f"Compile and train time per trained design (compiling: {total_c:.0f} s of "
        f"{total_c + total_t:.0f} s, {share:.0%})",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    if not labels:
        ax.text(0.5, 0.5, "no trained designs", ha="center", va="center", transform=ax.transAxes)
    return fig
