"""Comparing searches, the report: `report.html` and the folder it is written into.

`write_comparison(runs, out_dir)` writes

    comparison.csv / comparison.json   every candidate (`search.reporting.compare.write_tables`)
    pareto.png, knobs.png, curves.png  the figures (`search.reporting.compare_figures`)
    progress.png                       best design so far against candidates and wall time
    importance.png                     Optuna's parameter importance of each gene
    times.png                          compile and train seconds per trained design
    report.html                        all of the above in one offline file: the runs, each
                                       run's final verdict, the leaderboard (sortable by any
                                       column; a "why not" column beside "feasible"), the
                                       figures and the candidates never trained, with why

Numbers on the page have one format per kind: rates to 3 decimals with their interval,
counts as "12.3M", seconds and NetScore to one decimal.

Example:
    >>> paths = write_comparison([load_run("runs/a"), load_run("runs/b")], "runs/a-vs-b")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidnet_jax.figures import figure_png
from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.report_html import Cell, Figure, Paragraph, Section, Table, render_html
from search.ledger.requirements import final_verdicts, format_verdicts
from search.reporting.compare import (
    MIN_IMPORTANCE_DESIGNS,
    CompareError,
    Importance,
    RunData,
    comparison_rows,
    importance_targets,
    param_importances,
    requirements_config,
    shared_objective,
    write_atomic,
    write_tables,
)
from search.reporting.compare_figures import (
    curves_figure,
    importance_figure,
    knobs_figure,
    pareto_figure,
    progress_figure,
    times_figure,
)
from search.reporting.leaderboard import format_count

__all__ = ["write_comparison"]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None or interval is None:
        return _rate(value)
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _one_decimal(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(text: str, value: float | None) -> Cell:
    """A formatted number that sorts by its raw value."""
    return Cell(text, None if value is None else float(value))


def _requirements_text(requirements: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (
        ("max_macs", "MACs <="),
        ("max_params", "params <="),
        ("max_activation_bytes", "activation bytes <="),
    ):
        if requirements.get(key) is not None:
            parts.append(f"{label} {format_count(round(requirements[key]))}")
    if requirements.get("min_accuracy") is not None:
        parts.append(f"accuracy >= {requirements['min_accuracy']:.3f}")
    for name, req in (requirements.get("classes") or {}).items():
        for key, label in (("min_sensitivity", "sensitivity"), ("min_ppv", "PPV")):
            if req.get(key) is not None:
                parts.append(f"{name} {label} >= {req[key]:.3f}")
    return ", ".join(parts) or "none"


def _verdict_paragraphs(runs: Sequence[RunData]) -> list[Paragraph]:
    """Per run, the final design's requirements on validation and test with the verdict."""
    found = []
    for run in runs:
        best = run.best
        if not best or "validation" not in best or "confusion" not in best.get("test", {}):
            found.append(Paragraph(f"{run.name}: no design was declared."))
            continue
        reqs = requirements_config(run.requirements)
        validation = EvalMetrics.from_dict(dict(best["validation"]))
        test = EvalMetrics.from_dict(dict(best["test"])) if best.get("test") else None
        reports = final_verdicts(reqs, validation, test)
        text = format_verdicts(reports, reqs)
        verdict = best.get("verdict", "not recorded")
        found.append(
            Paragraph(
                f"{run.name}: trial {best.get('trial')}, {format_count(best.get('macs'))} MACs, "
                f"verdict on test: {verdict}.\n{text}",
                preformatted=True,
            )
        )
    return found


def _leaderboard_table(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], multi: bool, limit: int
) -> Table:
    rates = [f"sens {n}" for n in class_names] + [f"PPV {n}" for n in class_names]
    numbers = ["MACs", "params", "act. bytes", "rung (steps)", "val acc [CI]", "test acc [CI]"]
    numbers += [*rates, "NetScore", "compile s", "train s"]
    columns = ["#", *(["run"] if multi else []), "trial", "feasible", "why not", *numbers]
    columns.append("design")
    body, dim = [], set()
    for i, row in enumerate(r for r in rows if r["rank"] is not None):
        if i >= limit:
            break
        cells = [
            row["rank"],
            *([row["run"]] if multi else []),
            row["trial"],
            ("best, " if row["best"] else "") + ("yes" if row["feasible"] else "no"),
            "" if row["feasible"] else row["reason"] or row["status"],
            _num(format_count(row["macs"]), row["macs"]),
            _num(format_count(row["params"]), row["params"]),
            _num(format_count(row["activation_bytes"]), row["activation_bytes"]),
            _num(f"{row['rung']} ({row['steps']})", row["steps"]),
            _num(_with_interval(row["val_accuracy"], row["val_interval"]), row["val_accuracy"]),
            _num(_with_interval(row["test_accuracy"], row["test_interval"]), row["test_accuracy"]),
        ]
        cells += [_num(_rate(v), v) for v in (row["sensitivity"].get(n) for n in class_names)]
        cells += [_num(_rate(v), v) for v in (row["ppv"].get(n) for n in class_names)]
        cells += [
            _num(_one_decimal(row["netscore"]), row["netscore"]),
            _num(_one_decimal(row["compile_s"]), row["compile_s"]),
            _num(_one_decimal(row["train_s"]), row["train_s"]),
            row["summary"],
        ]
        if not row["feasible"]:
            dim.add(i)
        body.append(cells)
    styles = {name: "number" for name in numbers} | {"why not": "wrap"}
    return Table(
        columns,
        body,
        dim_rows=frozenset(dim),
        table_id="leaderboard",
        column_styles=styles,
        sortable=True,
    )


def _untrained_table(rows: Sequence[Mapping[str, Any]], multi: bool) -> Table:
    columns = [*(["run"] if multi else []), "trial", "status", "why", "MACs", "params", "design"]
    body = [
        [
            *([row["run"]] if multi else []),
            row["trial"],
            row["status"],
            row["reason"] or row["status"],
            format_count(row["macs"]),
            format_count(row["params"]),
            row["summary"],
        ]
        for row in rows
        if row["rank"] is None
    ]
    styles = {"why": "wrap", "MACs": "number", "params": "number"}
    return Table(columns, body, table_id="untrained", column_styles=styles)


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
                _with_interval(best.test_accuracy, best.test_interval) if best else "-",
            ]
        )
    styles = {"requirements": "wrap", "best test accuracy": "number"}
    return Table(columns, body, table_id="runs", column_styles=styles)


def _judged_text(runs: Sequence[RunData]) -> str:
    rules = {requirements_config(run.requirements).decision for run in runs}
    if rules == {"lower_bound"}:
        return (
            "Points are judged by the one-sided lower bound of their accuracy, not by the "
            "point itself: the shaded band above the minimum is where a point can sit and "
            "still miss it, its top the accuracy whose lower bound clears the minimum on this "
            "validation split. Hollow points above the band miss another requirement "
            "(the leaderboard's 'why not' says which). "
        )
    if rules == {"point"}:
        return "Points are judged by their point estimate. "
    return "The runs judge requirements differently (lower bound or point estimate). "


def _importance_caption(importances: Sequence[Importance]) -> str:
    notes = [f"{i.run}, {i.target}: {i.note}." for i in importances if i.note]
    text = (
        "How much of the variation of each target over a run's trained designs each gene "
        "explains: Optuna's get_param_importances with the fANOVA evaluator, on the trained "
        "designs only (never the candidates the cost model rejected). An importance is "
        "association over the designs the strategy chose to train, not a causal effect; "
        f"it needs at least {MIN_IMPORTANCE_DESIGNS} trained designs."
    )
    return " ".join([text, *notes])


def write_comparison(
    runs: Sequence[RunData], out_dir: str | Path, *, top: int = 8, table_limit: int = 200
) -> dict[str, Path]:
    """Writes the comparison's tables, figures and HTML report into `out_dir`.

    Args:
        runs: the searches to compare.
        out_dir: the output folder (created).
        top: designs whose training curves are drawn in colour (the others in grey).
        table_limit: most leaderboard rows in the HTML report (the CSV/JSON hold all).

    Returns:
        Name -> path of every file written (csv, json, pareto, knobs, curves, progress,
        importance, times, html).

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
    rows = comparison_rows(runs)
    paths = write_tables(runs, out_dir, rows)
    targets = importance_targets(shared_objective(runs))
    importances = [i for run in runs for i in param_importances(run, targets)]
    figures = {
        "pareto": figure_png(pareto_figure(runs)),
        "knobs": figure_png(knobs_figure(runs)),
        "curves": figure_png(curves_figure(runs, top=top)),
        "progress": figure_png(progress_figure(runs)),
        "importance": figure_png(importance_figure(importances)),
        "times": figure_png(times_figure(runs)),
    }
    for name, png in figures.items():
        paths[name] = out_dir / f"{name}.png"
        write_atomic(paths[name], png)
    class_names = list(dict.fromkeys(n for run in runs for n in run.class_names))
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
                    "declared design, scored once. Greyed rows miss a requirement; 'why not' "
                    "says which and by how much. With JavaScript on, click a column heading to "
                    "sort by it (again to reverse); '#' restores the rank."
                ),
                _leaderboard_table(rows, class_names, multi, table_limit),
            ],
        ),
        Section(
            "Validation accuracy vs MACs",
            [
                Figure(
                    figures["pareto"],
                    "validation accuracy vs MACs",
                    "Filled: meets every requirement. Hollow: trained but misses a "
                    "requirement. Diamond: the declared design. Ticks on the bottom axis: "
                    "never trained. Bars: two-sided confidence intervals. Red lines: the MACs "
                    "limit (dashed) and the minimum accuracy (dotted). "
                    + _judged_text(runs)
                    + "The paper's networks, where shown, are in their own panel: "
                    "their numbers are COVIDx3 test accuracies, not validation accuracies of "
                    "this data.",
                )
            ],
        ),
        Section(
            "Search progress",
            [
                Figure(
                    figures["progress"],
                    "best design so far against candidates and wall time",
                    "The best design so far by the leaderboard's rank (feasible first, then "
                    "the objective), after each candidate finished (trained, or rejected by "
                    "the cost model before training), and against wall time. Dashed: no "
                    "feasible design yet (the best of the infeasible ones); star: the first "
                    "feasible design.",
                )
            ],
        ),
        Section("Design knobs", [Figure(figures["knobs"], "parallel coordinates")]),
        Section(
            "Parameter importance",
            [
                Figure(
                    figures["importance"],
                    "parameter importance",
                    _importance_caption(importances),
                )
            ],
        ),
        Section(
            "Training curves",
            [
                Figure(
                    figures["curves"],
                    "training curves",
                    f"The top {top} designs in colour, every other trained design in grey; "
                    "dotted lines: where fidelity rungs end.",
                )
            ],
        ),
        Section(
            "Compile and train time",
            [
                Figure(
                    figures["times"],
                    "compile and train seconds per trained design",
                    "Seconds per trained design over all its rungs: compiling (XLA; cached "
                    "compiles are short) and training with validation. The leaderboard has "
                    "both as columns.",
                )
            ],
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
    paths["html"] = out_dir / "report.html"
    write_atomic(paths["html"], render_html(title, sections, subtitle=counts).encode("utf-8"))
    return paths
