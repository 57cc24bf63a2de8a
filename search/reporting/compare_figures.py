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
from search.reporting.compare import (
    CONNECTIVITY,
    TRIALS_DIR,
    Candidate,
    RunData,
    design_knobs,
    front_keys,
    ranked,
    read_training_curve,
)
from search.reporting.leaderboard import format_count

__all__ = [
    "PAPER_REFERENCES",
    "curves_figure",
    "knob_label",
    "knobs_figure",
    "pareto_figure",
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
        rules = {run.requirements.get("decision", "lower_bound") for run in runs}
        judged = " (judged by the lower bound)" if rules == {"lower_bound"} else ""
        ax.axhline(
            min_accuracy,
            color="crimson",
            linestyle=":",
            linewidth=1,
            label=f"min accuracy {min_accuracy:.3f}{judged}",
        )
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
