"""`covidnet compare`: tables, plots and the offline HTML report over two small searches."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html as html_module
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidnet_jax.presets import get_preset
from covidnet_jax.report_html import Cell, Section, Table, render_html
from search.cli import main
from search.execution.runner import run_worker
from search.execution.surrogate import surrogate_job
from search.ledger import store
from search.ledger.requirements import COST_NAMES
from search.reporting.compare import (
    MIN_IMPORTANCE_DESIGNS,
    CompareError,
    best_so_far,
    design_knobs,
    gene_label,
    importance_targets,
    load_run,
    param_importances,
    read_training_curve,
)
from search.reporting.compare_figures import (
    PAPER_REFERENCES,
    curves_figure,
    importance_figure,
    knob_label,
    knobs_figure,
    needed_accuracy,
    pareto_figure,
    progress_figure,
    times_figure,
)
from search.reporting.compare_report import write_comparison
from search.reporting.leaderboard import format_count, write_leaderboard

_REQUIREMENTS = {
    "max_macs": 4.0e5,
    "min_accuracy": 0.6,
    "classes": {"COVID-19": {"min_sensitivity": 0.5}},
    "decision": "point",  # the surrogate's metrics are exact, not samples
}


def _train_loss(trial: int, step: int) -> float:
    """The fixture's training loss: falling, at a different pace per trial."""
    return 1.2 * math.exp(-step / (60 + 9 * trial))


def _search(
    workdir: Path, seed: int, max_trials: int = 12, requirements: dict | None = None
) -> Path:
    """A small search scored by the surrogate evaluator (no training), with training logs
    and a best design written the way the real search writes them."""
    settings = {
        "space": {
            "prototype": "tiny",
            "stage_depths": [[1, 3], [1, 2]],
            "stage_width": {"min": 0.5, "max": 1.5, "step": 0.25},
            "module_width": {"min": 0.25, "max": 1.0, "step": 0.25},
            "kernel_sizes": [3, 5],
            "connectivity": ["dense", "residual"],
        },
        "requirements": requirements or _REQUIREMENTS,
        "objective": "min_macs",
        "strategy": {"name": "random"},
        "budget": {"max_trials": max_trials, "rungs": [50, 150]},
        "seed": seed,
    }
    job = surrogate_job(
        settings, workdir, prototype=get_preset("tiny"), macs_mid=1.2e5, params_mid=1e3
    )
    run_worker(job)
    study = store.open_study(store.open_storage(workdir), workdir.name, "min_macs")
    records = store.read_records(study)
    best = None
    for r in records:
        if not r.is_trained:
            continue
        # The training log format of covidnet_jax.train (metrics.jsonl events), one stretch
        # per fidelity rung: a promoted design resumes where its last rung ended.
        with open(workdir / "trials" / str(r.number) / "metrics.jsonl", "w") as f:
            for rung in r.rungs:
                for step in range(10, rung.steps + 1, 10):
                    loss = _train_loss(r.number, step)
                    f.write(json.dumps({"event": "train", "step": step, "loss": loss}) + "\n")
                validation = {"accuracy": rung.metrics.accuracy, "loss": loss + 0.1}
                f.write(json.dumps({"event": "validation", "step": rung.steps, **validation}))
                f.write("\n")
            f.write('{"event": "train", "step": 6')  # a write cut short by a kill
        if r.feasible and best is None:
            best = {"trial": r.number, "test": {"accuracy": 0.625}}
    write_leaderboard(
        workdir,
        records,
        study=workdir.name,
        objective="min_macs",
        requirements_data=requirements or _REQUIREMENTS,
        best=best,
    )
    return workdir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("searches")
    return _search(root / "alpha", 0), _search(root / "beta", 1)


@pytest.fixture(scope="module")
def written(two_runs, tmp_path_factory):
    runs = [load_run(d) for d in two_runs]
    return runs, write_comparison(runs, tmp_path_factory.mktemp("out") / "cmp")


def test_every_table_and_plot_is_written(written):
    runs, paths = written
    assert set(paths) == {
        "csv",
        "json",
        "pareto",
        "knobs",
        "curves",
        "progress",
        "importance",
        "times",
        "html",
    }
    for name in _FIGURES:
        with Image.open(paths[name]) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 200
            assert len(np.unique(np.asarray(png.convert("L")))) > 10  # not a blank canvas
    total = sum(len(run.candidates) for run in runs)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == total
    assert {
        "run",
        "trial",
        "feasible",
        "reason",
        "macs",
        "params",
        "val_accuracy",
        "test_accuracy",
        "sensitivity:COVID-19",
        "ppv:COVID-19",
        "netscore",
        "train_s",
    } <= set(rows[0])
    document = json.loads(paths["json"].read_text())
    assert [r["name"] for r in document["runs"]] == ["alpha", "beta"]
    ranks = [r["rank"] for r in document["rows"] if r["rank"] is not None]
    assert ranks == list(range(1, len(ranks) + 1))
    trained = [r for r in document["rows"] if r["rank"] is not None]
    # Feasible designs first, then fewest MACs (the runs' shared objective).
    flags = [r["feasible"] for r in trained]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    feasible = [r for r in trained if r["feasible"]]
    assert [r["macs"] for r in feasible] == sorted(r["macs"] for r in feasible)
    assert all(r["reason"] for r in trained if not r["feasible"])
    assert all(r["macs"] <= _REQUIREMENTS["max_macs"] for r in feasible)
    tested = [r for r in document["rows"] if r["test_accuracy"] is not None]
    assert len(tested) == 2 and all(r["best"] for r in tested)


_FIGURES = ("pareto", "knobs", "curves", "progress", "importance", "times")


def test_html_embeds_every_plot(written):
    _, paths = written
    html = paths["html"].read_text()
    for name in _FIGURES:
        encoded = base64.b64encode(paths[name].read_bytes()).decode()
        assert f'src="data:image/png;base64,{encoded}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must work offline"
    for table_id in ("runs", "leaderboard", "untrained"):
        assert re.search(rf'<table id="{table_id}"( class="sortable")?>', html)


def _chromium() -> str | None:
    configured = os.environ.get("COVIDNET_TEST_CHROMIUM")
    if configured:
        assert Path(configured).is_file(), f"COVIDNET_TEST_CHROMIUM={configured} does not exist"
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  var tables = [];
  document.querySelectorAll("table[id]").forEach(function (t) {
    tables.push(t.id + ":" + t.querySelectorAll("tbody tr").length);
  });
  // Click leaderboard headings as a reader does: each twice (ascending, then descending).
  var board = document.getElementById("leaderboard"), sorts = {};
  Array.prototype.forEach.call(board.tHead.rows[0].cells, function (th, col) {
    if (["trial", "MACs", "test acc [CI]"].indexOf(th.textContent) < 0) { return; }
    sorts[th.textContent] = [];
    for (var click = 0; click < 2; click++) {
      th.click();
      sorts[th.textContent].push(Array.prototype.map.call(board.tBodies[0].rows, function (r) {
        return r.cells[col].textContent;
      }));
    }
  });
  sorts["class"] = board.className;
  var marker = document.createElement("pre");
  marker.id = "render-check";
  marker.textContent = "IMAGES " + loaded + "/" + images.length + " TABLES " + tables.join(",") +
    "\\nSORTS " + JSON.stringify(sorts) + "\\nEND";
  document.body.appendChild(marker);
});
</script>"""


def test_report_renders_in_headless_chromium(written, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium (CI sets COVIDNET_TEST_CHROMIUM)")
    runs, paths = written
    # A copy with a checking script (the report's own script only sorts tables).
    page = tmp_path / "page.html"
    page.write_text(paths["html"].read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"IMAGES (\d+)/(\d+) TABLES ([\w:,]+)\nSORTS (.*)\nEND", result.stdout)
    assert match, f"no render marker; chromium said: {result.stderr[-1500:]}"
    loaded, total = int(match.group(1)), int(match.group(2))
    assert total == len(_FIGURES) and loaded == total
    sorts = json.loads(html_module.unescape(match.group(4)))
    assert sorts["class"] == "sortable sorting"  # headings look clickable once script runs
    trials = [[int(t) for t in order] for order in sorts["trial"]]
    assert trials[0] == sorted(trials[0]) and trials[1] == sorted(trials[1], reverse=True)
    assert trials[0] != sorted(map(str, trials[0]))  # numbers, not text: 2 before 11
    rows = [r for r in json.loads(paths["json"].read_text())["rows"] if r["rank"] is not None]
    by_macs = sorted(rows, key=lambda r: r["macs"])
    macs = [[_parse_count(cell) for cell in order] for order in sorts["MACs"]]
    assert macs[0] == sorted(macs[0]) and macs[1] == sorted(macs[1], reverse=True)
    assert macs[0][0] == _parse_count(format_count(by_macs[0]["macs"]))
    tested = sum(r["test_accuracy"] is not None for r in rows)
    for order in sorts["test acc [CI]"]:  # the blank cells stay last both ways
        assert all(cell != "-" for cell in order[:tested]), order
        assert all(cell == "-" for cell in order[tested:]), order
    tables = dict(item.split(":") for item in match.group(3).split(","))
    trained = sum(c.trained for run in runs for c in run.candidates)
    assert int(tables["runs"]) == 2
    assert int(tables["leaderboard"]) == trained
    assert "untrained" in tables


def test_training_curves_and_knobs_are_read(two_runs):
    trained = next(c for c in load_run(two_runs[0]).candidates if c.trained)
    curve = read_training_curve(two_runs[0] / "trials" / str(trained.trial))
    rungs = trained.record.rungs
    assert curve["loss"][0] == (10, pytest.approx(_train_loss(trained.trial, 10)))
    assert len(curve["loss"]) == rungs[-1].steps // 10  # each step once, the torn line skipped
    assert curve["val_accuracy"] == [(r.steps, pytest.approx(r.metrics.accuracy)) for r in rungs]
    assert [step for step, _ in curve["val_loss"]] == [r.steps for r in rungs]
    empty = {"loss": [], "val_loss": [], "val_accuracy": []}
    assert read_training_curve(two_runs[0] / "nowhere") == empty
    knobs = design_knobs(get_preset("tiny").to_json())
    assert knobs["s1 depth"] == 2 and knobs["s2 kernel"] == 5 and knobs["input"] == 32
    assert design_knobs(get_preset("resnet50").to_json()) == {}


def test_command_line(two_runs, tmp_path, capsys):
    assert main(["compare", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trained candidates" in out and "report.html" in out
    assert (tmp_path / "report.html").is_file()


def test_bad_paths_give_one_line_errors(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    store.open_study(store.open_storage(empty), "empty", "min_macs")  # a study, no trials
    cases = [
        ([str(tmp_path / "nowhere")], "no such folder"),
        ([str(tmp_path)], "not a search workdir"),
        ([str(empty)], "no finished trial yet"),
        ([str(two_runs[0]), str(two_runs[1])], "needs --out"),
    ]
    for argv, message in cases:
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(CompareError, match="not a folder"):
        write_comparison([load_run(two_runs[0])], two_runs[0] / "leaderboard.json")


def _parse_count(text: str) -> float:
    """ "294k" -> 294000.0 (the leaderboard's count format)."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1.0)
    return float(text.rstrip("kMG")) * scale


def _table(html: str, table_id: str) -> str:
    return re.split(rf'<table id="{table_id}"[^>]*>', html, maxsplit=1)[1].split("</table>", 1)[0]


def _cells(html: str, table_id: str, css: str) -> list[list[str]]:
    """Per body row of one table, the text of its cells with class `css`."""
    table = _table(html, table_id)
    rows = re.findall(r"<tr( class=\"bad\")?>(.*?)</tr>", table.split("<tbody>", 1)[1])
    return [re.findall(rf'<td class="{css}"[^>]*>(.*?)</td>', row) for _, row in rows]


def test_html_rejected_rows_say_why_and_numbers_share_one_format(written):
    _, paths = written
    html = paths["html"].read_text()
    assert "max-width: 1200px" not in html  # wide tables are not cut off at 1200 px
    table = _table(html, "leaderboard")
    heads = re.findall(r"<th>(.*?)</th>", table)
    # "why not" sits beside "feasible", not after the long design column.
    assert heads.index("why not") == heads.index("feasible") + 1 < heads.index("design")
    bad = re.findall(r'<tr class="bad">(.*?)</tr>', table)
    assert bad, "the fixture has infeasible trained designs"
    for row in bad:
        (why,) = re.findall(r'<td class="wrap"[^>]*>(.*?)</td>', row)
        assert "below minimum" in why, row
    untrained = _cells(html, "untrained", "wrap")
    assert untrained and all(len(why) == 1 and "over limit" in why[0] for why in untrained)
    number = re.compile(
        r"-|\d+(\.\d{1,2})?[kMG]?|\d\.\d{3}( \[\d\.\d{3}, \d\.\d{3}\])?|\d+\.\d|\d+ \(\d+\)"
    )
    numbers = [cell for row in _cells(html, "leaderboard", "number") for cell in row]
    assert numbers and all(number.fullmatch(cell) for cell in numbers), numbers


def test_paper_references_are_not_on_the_validation_axis(two_runs):
    runs = [load_run(d) for d in two_runs]
    fig = pareto_figure(runs)
    validation_ax, paper_ax = fig.axes
    assert validation_ax.get_ylabel().startswith("validation accuracy")
    designs = [c.macs for run in runs for c in run.candidates if c.macs]
    low, high = validation_ax.get_xlim()
    # The axis spans the designs, not the paper's 5e9..9e10 MACs.
    assert low <= min(designs) and max(designs) <= high < 2 * max(designs)
    for artist in validation_ax.collections:
        offsets = np.asarray(artist.get_offsets())
        assert not offsets.size or offsets[:, 0].max() < 1e9
    assert "test accuracy" in paper_ax.get_xlabel() and "COVIDx3" in paper_ax.get_xlabel()
    bars = [p for p in paper_ax.patches if p.get_gid() == "paper"]
    assert [round(b.get_width(), 3) for b in bars] == [r[3] for r in PAPER_REFERENCES]


def test_knobs_have_value_ticks_names_and_a_colour_bar(two_runs):
    runs = [load_run(d) for d in two_runs]
    fig = knobs_figure(runs)
    assert any(ax.get_ylabel() == "validation accuracy" for ax in fig.axes[1:])  # colour bar
    ticks = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "knob-tick"]
    assert {"dense", "residual"} <= set(ticks)
    assert "12" in ticks and "20" in ticks  # values between an axis's ends are labelled
    assert knob_label("connectivity", 2.0) == "dense"
    assert knob_label("s1 depth", 3.0) == "3" and knob_label("s1 expand", 5.333) == "5.33"
    assert knob_label("MACs (log)", np.log10(2.5e5)) == "250k"


def test_curves_show_every_design_validation_loss_and_rungs(two_runs):
    runs = [load_run(d) for d in two_runs]
    trained = [c for run in runs for c in run.candidates if c.trained]
    fig = curves_figure(runs, top=3)
    loss_ax, acc_ax = fig.axes
    training = [line for line in loss_ax.lines if line.get_gid() is None]
    assert len(training) == len(trained)  # every trained design, not only the top 3
    assert len([line for line in loss_ax.lines if line.get_gid() == "val-loss"]) == len(trained)
    for ax in (loss_ax, acc_ax):
        rungs = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == "rung")
        assert rungs == [50, 150]
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 4 and labels[-1] == f"{len(trained) - 3} other trained designs"
    assert all("MACs" in label and "val acc" in label for label in labels[:3])


@pytest.fixture(scope="module")
def gamma(tmp_path_factory):
    """A longer search whose first trained designs all miss the accuracy requirement."""
    requirements = dict(_REQUIREMENTS, min_accuracy=0.7)
    workdir = _search(tmp_path_factory.mktemp("more") / "gamma", 5, 28, requirements)
    return load_run(workdir)


def test_leaderboard_reads_in_rank_order_and_sorts_by_raw_values(written):
    _, paths = written
    html = paths["html"].read_text()
    assert '<table id="leaderboard" class="sortable">' in html
    assert html.count("<script>") == 1 and 'addEventListener("click"' in html
    # Without script the rows are in rank order; each number cell carries its raw value.
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", _table(html, "leaderboard").split("<tbody>")[1])
    document = json.loads(paths["json"].read_text())
    ranked = [r for r in document["rows"] if r["rank"] is not None]
    assert [int(re.search(r'data-sort="(\d+)"', row).group(1)) for row in rows] == [
        r["rank"] for r in ranked
    ]
    heads = re.findall(r"<th>(.*?)</th>", _table(html, "leaderboard"))
    assert heads.index("compile s") + 1 == heads.index("train s")
    macs_col, test_col = heads.index("MACs"), heads.index("test acc [CI]")
    for row, expected in zip(rows, ranked, strict=True):
        cells = re.findall(r"<td([^>]*)>", row)
        assert f'data-sort="{float(expected["macs"])!r}"' in cells[macs_col]
        test = expected["test_accuracy"]
        assert f'data-sort="{"" if test is None else repr(float(test))}"' in cells[test_col]


def test_sortable_table_cells_render_their_sort_values():
    table = Table(
        ("name", "size", "note"),
        [("a", Cell("1.2M", 1.2e6), Cell("-", None)), ("b", 7, "x<y")],
        table_id="t",
        sortable=True,
    )
    page = render_html("t", [Section("s", [table])])
    assert '<td class="number" data-sort="1200000.0">1.2M</td>' not in page  # no style given
    assert '<td data-sort="1200000.0">1.2M</td>' in page
    assert '<td class="text" data-sort="">-</td>' in page
    assert '<td data-sort="7">7</td>' in page and 'data-sort="x&lt;y">x&lt;y' in page
    assert "<script>" in page
    plain = render_html("t", [Section("s", [Table(("a",), [(1,)])])])
    assert "<script>" not in plain and "data-sort" not in plain


def _hand_best(candidates):
    """The best trained design among `candidates`, by the rule written out: feasible ones by
    fewest MACs (then higher accuracy); else the least over the cost limits, then the least
    short of the outcome requirements, then fewest MACs."""
    trained = [c for c in candidates if c.trained]
    if not trained:
        return None
    feasible = [c for c in trained if c.feasible]
    if feasible:
        return min(feasible, key=lambda c: (c.macs, -c.val_accuracy))

    def shortfall(c):
        cost = sum(v for k, v in c.record.violations.items() if k in COST_NAMES)
        outcome = sum(v for k, v in c.record.violations.items() if k not in COST_NAMES)
        return (cost, outcome, c.macs, -c.val_accuracy)

    return min(trained, key=shortfall)


def test_best_so_far_matches_a_hand_computation(two_runs, gamma):
    runs = [load_run(d) for d in two_runs] + [gamma]
    for run in runs:
        points = best_so_far(run, "min_macs")
        order = sorted(run.candidates, key=lambda c: (c.record.completed, c.trial))
        assert [p.trial for p in points] == [c.trial for c in order]
        start = min(c.record.started for c in run.candidates)
        for k, point in enumerate(points, start=1):
            assert point.finished == k
            assert point.elapsed_s == pytest.approx(order[k - 1].record.completed - start)
            expected = _hand_best(order[:k])
            assert (point.best and point.best.trial) == (expected and expected.trial), k
    # gamma's first trained designs all miss the requirements: its best so far is infeasible
    # for a while, then the first feasible design takes over.
    points = best_so_far(gamma, "min_macs")
    flags = [p.best.feasible for p in points if p.best is not None]
    assert not flags[0] and flags[-1] and flags == sorted(flags)


def test_progress_figure_marks_the_first_feasible_design(two_runs, gamma):
    runs = [load_run(two_runs[0]), gamma]
    fig = progress_figure(runs)
    count_ax, time_ax = fig.axes
    for ax in (count_ax, time_ax):
        stars = [line for line in ax.lines if line.get_gid() == "first-feasible"]
        assert len(stars) == 2  # one per run
        assert len([line for line in ax.lines if line.get_gid() == "best-so-far"]) == 2
    # gamma's dashed stretch (no feasible design yet) ends where its star is.
    (dashed,) = [line for line in count_ax.lines if line.get_gid() == "infeasible"]
    first = next(p for p in best_so_far(gamma, "min_macs") if p.best and p.best.feasible)
    gamma_star = [line for line in count_ax.lines if line.get_gid() == "first-feasible"][1]
    assert gamma_star.get_xdata()[0] == first.finished == dashed.get_xdata()[-1]
    assert gamma_star.get_ydata()[0] == first.best.macs
    assert "candidates" in count_ax.get_xlabel() and "wall time" in time_ax.get_xlabel()


def test_importance_needs_enough_designs(two_runs, gamma):
    targets = importance_targets("min_macs")
    few = load_run(two_runs[1])
    assert sum(c.trained for c in few.candidates) < MIN_IMPORTANCE_DESIGNS
    for found in param_importances(few, targets):
        assert not found.values
        assert found.note.startswith(f"needs at least {MIN_IMPORTANCE_DESIGNS} trained designs")
    found = param_importances(gamma, targets)
    assert [i.target for i in found] == ["validation accuracy", "log10 MACs"]
    for importance in found:
        assert not importance.note and importance.designs >= MIN_IMPORTANCE_DESIGNS
        assert importance.designs == sum(c.trained for c in gamma.candidates)  # trained only
        assert sum(importance.values.values()) == pytest.approx(1.0)
        assert set(importance.values) <= set(gamma.distributions)
    flat = dataclasses.replace(
        gamma,
        candidates=tuple(
            dataclasses.replace(c, val_accuracy=0.5) if c.trained else c for c in gamma.candidates
        ),
    )  # fANOVA itself fails on a target without variance
    (same, _) = param_importances(flat, targets)
    assert same.note == "every trained design has the same validation accuracy"
    fig = importance_figure([*found, *param_importances(few, targets)])
    bars = [p for ax in fig.axes for p in ax.patches if p.get_gid() == "importance"]
    assert len(bars) == sum(len(i.values) for i in found)
    texts = [t for ax in fig.axes for t in (*ax.texts, ax.title)]
    notes = [t.get_text() for t in texts if t.get_gid() == "importance-note"]
    assert len(notes) == 2 and all("beta: needs at least" in n for n in notes)
    alone = importance_figure(param_importances(few, targets))  # no bars: the note alone
    assert all(ax.texts[0].get_text().startswith("needs at least") for ax in alone.axes)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "stage 2 module 1 width (s1.m0.width)" in labels or "stage 1 width (s0.width)" in labels
    assert gene_label("s1.m0.width") == "stage 2 module 1 width (s1.m0.width)"
    assert gene_label("connectivity") == "connectivity"


def test_times_show_compile_and_train_per_trained_design(gamma):
    # The surrogate neither compiles nor trains: give each design its own seconds.
    timed = tuple(
        dataclasses.replace(c, compile_s=1.0 + c.trial, train_s=2.0 + 0.5 * c.trial)
        for c in gamma.candidates
    )
    run = dataclasses.replace(gamma, candidates=timed)
    trained = sorted((c for c in run.candidates if c.trained), key=lambda c: c.trial)
    fig = times_figure([run])
    (ax,) = fig.axes
    compile_bars = [p for p in ax.patches if p.get_gid() == "compile"]
    train_bars = [p for p in ax.patches if p.get_gid() == "train"]
    assert len(compile_bars) == len(train_bars) == len(trained)
    for c, low, high in zip(trained, compile_bars, train_bars, strict=True):
        assert low.get_height() == pytest.approx(c.compile_s)
        assert high.get_y() == pytest.approx(c.compile_s)
        assert high.get_height() == pytest.approx(c.train_s)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c.trial) for c in trained]


def test_pareto_draws_the_minimum_and_what_clears_its_lower_bound(two_runs):
    # 0.87 on 600 images at 95% (one-sided Wilson, z = 1.645), by hand: 535/600 has lower
    # bound (0.8917 + 0.00226 - 0.02099) / 1.00451 = 0.8690, 536/600 has 0.8708.
    assert needed_accuracy(0.87, 600, 0.95, "wilson") == pytest.approx(536 / 600)
    assert needed_accuracy(0.99, 20, 0.95, "wilson") is None
    run = load_run(two_runs[0])
    point = pareto_figure([run]).axes[0]
    (line,) = [x for x in point.lines if x.get_gid() == "min-accuracy"]
    assert line.get_ydata()[0] == _REQUIREMENTS["min_accuracy"]
    assert not [p for p in point.patches if p.get_gid() == "needed-accuracy"]  # judged on points
    bound = dataclasses.replace(
        run, requirements=dict(run.requirements, decision="lower_bound", confidence=0.95)
    )
    ax = pareto_figure([bound]).axes[0]
    (band,) = [p for p in ax.patches if p.get_gid() == "needed-accuracy"]
    trials = next(c for c in run.candidates if c.trained).record.last.metrics.confusion.sum()
    assert band.get_y() == _REQUIREMENTS["min_accuracy"]  # from the minimum up to
    top = band.get_y() + band.get_height()  # the accuracy that clears its lower bound
    assert top == pytest.approx(needed_accuracy(0.6, int(trials), 0.95, "wilson"))
    assert top > _REQUIREMENTS["min_accuracy"]
