"""`covidnet compare`: tables, plots and the offline HTML report over two small searches."""

from __future__ import annotations

import base64
import csv
import json
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
    write_comparison,
)
from search.reporting.leaderboard import write_leaderboard

_REQUIREMENTS = {
    "max_macs": 4.0e5,
    "min_accuracy": 0.6,
    "classes": {"COVID-19": {"min_sensitivity": 0.5}},
    "decision": "point",  # the surrogate's metrics are exact, not samples
}


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
        # The training log format of covidnet_jax.train (metrics.jsonl events).
        with open(workdir / "trials" / str(r.number) / "metrics.jsonl", "w") as f:
            for step in (10, 20, 30, 40, 50):
                f.write(json.dumps({"event": "train", "step": step, "loss": 1.2 - step / 100}))
                f.write("\n")
            f.write(json.dumps({"event": "validation", "step": 50, "accuracy": 0.5}) + "\n")
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
    assert curve["loss"][0] == (10, pytest.approx(1.1)) and len(curve["loss"]) == 5
    assert curve["val_accuracy"] == [(50, 0.5)]
    assert read_training_curve(two_runs[0] / "nowhere") == {"loss": [], "val_accuracy": []}
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
