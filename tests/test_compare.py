"""`covidnet compare`: tables, plots and the offline HTML report over two small searches."""

from __future__ import annotations

import base64
import csv
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
from search.cli import main
from search.execution.runner import run_worker
from search.execution.surrogate import surrogate_job
from search.ledger import store
from search.reporting.compare import (
    CompareError,
    design_knobs,
    load_run,
    read_training_curve,
)
from search.reporting.compare_figures import (
    PAPER_REFERENCES,
    curves_figure,
    knob_label,
    knobs_figure,
    pareto_figure,
)
from search.reporting.compare_report import write_comparison
from search.reporting.leaderboard import write_leaderboard

_REQUIREMENTS = {
    "max_macs": 4.0e5,
    "min_accuracy": 0.6,
    "classes": {"COVID-19": {"min_sensitivity": 0.5}},
    "decision": "point",  # the surrogate's metrics are exact, not samples
}


def _train_loss(trial: int, step: int) -> float:
    """The fixture's training loss: falling, at a different pace per trial."""
    return 1.2 * math.exp(-step / (60 + 9 * trial))


def _search(workdir: Path, seed: int) -> Path:
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
        "requirements": _REQUIREMENTS,
        "objective": "min_macs",
        "strategy": {"name": "random"},
        "budget": {"max_trials": 12, "rungs": [50, 150]},
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
        requirements_data=_REQUIREMENTS,
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
    assert set(paths) == {"csv", "json", "pareto", "knobs", "curves", "html"}
    for name in ("pareto", "knobs", "curves"):
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


def test_html_embeds_every_plot(written):
    _, paths = written
    html = paths["html"].read_text()
    for name in ("pareto", "knobs", "curves"):
        encoded = base64.b64encode(paths[name].read_bytes()).decode()
        assert f'src="data:image/png;base64,{encoded}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must work offline"
    for table_id in ("runs", "leaderboard", "untrained"):
        assert f'<table id="{table_id}">' in html


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
  var marker = document.createElement("pre");
  marker.id = "render-check";
  marker.textContent = "IMAGES " + loaded + "/" + images.length + " TABLES " + tables.join(",");
  document.body.appendChild(marker);
});
</script>"""


def test_report_renders_in_headless_chromium(written, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium (CI sets COVIDNET_TEST_CHROMIUM)")
    runs, paths = written
    # A copy with a checking script: the report itself carries no script.
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
    match = re.search(r"IMAGES (\d+)/(\d+) TABLES ([\w:,]+)", result.stdout)
    assert match, f"no render marker; chromium said: {result.stderr[-1500:]}"
    loaded, total = int(match.group(1)), int(match.group(2))
    assert total == 3 and loaded == total
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


def _cells(html: str, table_id: str, css: str) -> list[list[str]]:
    """Per body row of one table, the text of its cells with class `css`."""
    table = html.split(f'<table id="{table_id}">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr( class=\"bad\")?>(.*?)</tr>", table.split("<tbody>", 1)[1])
    return [re.findall(rf'<td class="{css}">(.*?)</td>', row) for _, row in rows]


def test_html_rejected_rows_say_why_and_numbers_share_one_format(written):
    _, paths = written
    html = paths["html"].read_text()
    assert "max-width: 1200px" not in html  # wide tables are not cut off at 1200 px
    table = html.split('<table id="leaderboard">', 1)[1].split("</table>", 1)[0]
    heads = re.findall(r"<th>(.*?)</th>", table)
    # "why not" sits beside "feasible", not after the long design column.
    assert heads.index("why not") == heads.index("feasible") + 1 < heads.index("design")
    bad = re.findall(r'<tr class="bad">(.*?)</tr>', table)
    assert bad, "the fixture has infeasible trained designs"
    for row in bad:
        (why,) = re.findall(r'<td class="wrap">(.*?)</td>', row)
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
