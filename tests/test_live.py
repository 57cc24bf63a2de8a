"""What people watch: the training status line and bar, and the search's live panel."""

from __future__ import annotations

import io
import sys
import time

import pytest
from rich.console import Console
from search_support import fast_tmp, run, settings

from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec, StemSpec
from covidnet_jax.config import TrainConfig
from covidnet_jax.data import write_synthetic_dataset
from covidnet_jax.metrics import compute_metrics
from covidnet_jax.train import train_and_evaluate
from covidnet_jax.typed_yaml import from_dict
from search.config import BudgetConfig
from search.execution.runner import _PublishedProgress
from search.execution.surrogate import SurrogateEvaluator
from search.ledger import store
from search.ledger.records import RungResult, TrialProgress, TrialRecord, rank_key
from search.reporting.live import differing_parts, render

__all__ = ["fast_tmp"]

# The trainer's tests --------------------------------------------------------------------

SMALL = ArchSpec(
    input_size=16,
    stem=StemSpec(channels=4, kernel_size=3, stride=2, pool_size=0),
    stages=(StageSpec(stride=1, modules=(ModuleSpec(4, 8, 4, 8),)),),
)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> TrainConfig:
    root = tmp_path_factory.mktemp("live")
    data_dir = root / "covidx"
    write_synthetic_dataset(data_dir, per_class=8, image_size=32, seed=0)
    (root / "small.json").write_text(SMALL.to_json())
    return from_dict(
        TrainConfig,
        {
            "model": {"arch": str(root / "small.json")},
            "data": {"covidx_dir": str(data_dir), "resolution": 16, "validation_fraction": 0.25},
            "train": {"steps": 6, "batch_size": 8, "log_every": 2, "eval_every": 4},
            "compile_cache_dir": str(root / "cache"),
        },
    )


class _Terminal(io.StringIO):
    """Captured stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_on_progress_follows_the_phases_at_log_steps_only(config, tmp_path):
    calls = []
    result = train_and_evaluate(
        config,
        tmp_path / "run",
        show_progress=False,
        on_progress=lambda phase, step, total: calls.append((phase, step, total)),
    )
    assert result.ok
    assert calls[:2] == [("loading", 0, 0), ("compiling", 0, 6)]
    # Training at the log steps (2, 4, 6) only; a validation at eval steps and the end.
    assert [c for c in calls if c[0] == "training" and c[1] > 0] == [
        ("training", 2, 6),
        ("training", 4, 6),
        ("training", 4, 6),  # back to training after the validation at step 4
        ("training", 6, 6),
    ]
    assert [c for c in calls if c[0] == "evaluating"] == [
        ("evaluating", 4, 6),
        ("evaluating", 6, 6),
    ]


@pytest.mark.slow
def test_status_line_and_validation_metrics_only_on_a_terminal(config, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert train_and_evaluate(config, tmp_path / "tty").ok
    shown = terminal.getvalue()
    assert "loading data (16 px)" in shown
    assert "compiling the train and validation steps" in shown
    assert "val_acc=" in shown  # the bar carries the validation metrics

    log = io.StringIO()  # not a terminal: no status line, and the bar still has val_acc
    monkeypatch.setattr(sys, "stderr", log)
    assert train_and_evaluate(config, tmp_path / "log").ok
    assert "compiling" not in log.getvalue() and "loading data" not in log.getvalue()
    assert "val_acc=" in log.getvalue()

    quiet = _Terminal()  # show_progress=False: nothing at all, terminal or not
    monkeypatch.setattr(sys, "stderr", quiet)
    assert train_and_evaluate(config, tmp_path / "quiet", show_progress=False).ok
    assert quiet.getvalue() == ""


# The search's panel ---------------------------------------------------------------------

CLASSES = ("Normal", "Pneumonia", "COVID-19")


def _design(width: int, kernel: int = 3) -> ArchSpec:
    # Designs that differ in the second stage only, as a search around a prototype makes.
    return ArchSpec(
        input_size=64,
        stem=StemSpec(channels=16, kernel_size=7, stride=2),
        stages=(
            StageSpec(stride=1, modules=(ModuleSpec(8, 16, 8, 32),)),
            StageSpec(stride=2, modules=(ModuleSpec(width, 2 * width, width, 64, kernel),)),
            StageSpec(stride=2, modules=(ModuleSpec(16, 32, 16, 64),)),
        ),
        class_names=CLASSES,
    )


def _record(number, status, *, width=None, correct=0, macs=0, feasible=True, state=None, **kw):
    attrs = {"status": status, "reason": kw.pop("reason", "")}
    rungs = ()
    if width is not None:
        attrs.update(summary=_design(width).summary(), macs=macs, params=macs // 10)
    if status == "trained":
        confusion = [[correct, 10 - correct, 0], [0, 10, 0], [0, 0, 10]]
        metrics = compute_metrics(confusion, CLASSES)
        attrs.update(feasible=feasible, violations={"accuracy": 0.0 if feasible else 0.1})
        rungs = (RungResult(0, 100, metrics, 1.0, 2.0, "trials/x/checkpoints"),)
    return TrialRecord(
        number=number,
        state=state or ("RUNNING" if status == "running" else "COMPLETE"),
        status=status,
        params={},
        attrs=attrs,
        rungs=rungs,
        heartbeat=None,
        **kw,
    )


RECORDS = [
    _record(0, "trained", width=16, correct=10, macs=2_000_000),
    _record(1, "trained", width=12, correct=2, macs=1_500_000),
    _record(2, "trained", width=8, correct=10, macs=900_000, feasible=False, reason="accuracy"),
    _record(3, "infeasible", reason="MACs 9.1M > 5M"),
    _record(
        4,
        "running",
        width=24,
        macs=4_000_000,
        progress=TrialProgress(rung=0, phase="training", step=120, total=400),
    ),
    _record(
        5,
        "running",
        width=20,
        macs=3_500_000,
        progress=TrialProgress(rung=1, phase="compiling", step=100, total=400),
    ),
]


def _panel_text(objective: str, records=RECORDS) -> str:
    console = Console(record=True, width=150)
    budget = BudgetConfig(max_trials=20, max_wall_time_s=600)
    console.print(render(records, budget, 12.0, rows=12, objective=objective))
    return console.export_text()


def _best_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "best so far" in line]
    return line


@pytest.mark.parametrize("objective", ["min_macs", "max_netscore"])
def test_best_so_far_is_the_design_rank_key_puts_first(objective):
    trained = [r for r in RECORDS if r.is_trained]
    best = min(trained, key=lambda r: rank_key(r, objective))
    line = _best_line(_panel_text(objective))
    assert f"trial {best.number} " in line
    assert f"val acc {best.last.metrics.accuracy:.3f}" in line
    # The fixture tells the objectives apart (so the line cannot pass by a fixed choice).
    others = {"min_macs": "max_netscore", "max_netscore": "min_macs"}
    assert best != min(trained, key=lambda r: rank_key(r, others[objective]))


def test_best_so_far_before_any_design_trained():
    assert "none trained yet" in _best_line(_panel_text("min_macs", RECORDS[3:]))


def test_design_column_shows_the_part_that_differs():
    text = _panel_text("min_macs")
    stem = "stem 16/7s2"  # shared by every design: said once, below the table
    rows = [line for line in text.splitlines() if line.startswith("│ │") and "│ trained " in line]
    assert len(rows) == 3
    for line, width in zip(rows, (16, 12, 8), strict=True):
        assert f"[{width}-{2 * width}-{width}-64k3]" in line, line
        assert stem not in line
    assert "all shown designs share:" in text and stem in text


def test_differing_parts_strips_shared_leading_and_trailing_parts():
    middles, lead, trail = differing_parts(["a | b | x | c", "a | b | y | z | c"])
    assert middles == ["… x …", "… y | z …"]
    assert (lead, trail) == ("a | b", "c")
    # One design (or identical ones): nothing to compare against, the whole summary shows.
    assert differing_parts(["a | b", "a | b"]) == (["a | b", "a | b"], "", "")


def test_running_trials_show_their_phase_and_step():
    text = _panel_text("min_macs")
    assert "r0 step 120/400" in _row(text, 4)
    assert "r1 compiling" in _row(text, 5)
    assert "0 (100)" in _row(text, 0)  # a finished trial shows its last rung


def _row(text: str, number: int) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"│ │ {number:>5} │")]
    return line


def test_progress_round_trips_through_the_store_at_the_heartbeat_pace(tmp_path):
    storage = store.open_storage(tmp_path)
    study = store.open_study(storage, "live", "min_macs")
    trial = study.ask()
    tid = store.trial_id(storage, study, trial.number)
    progress = _PublishedProgress()
    report = progress.reporter(rung=1)
    report("compiling", 0, 400)
    writes = []
    original = storage.set_trial_system_attr

    def counting(trial_id, key, value):
        writes.append(key)
        original(trial_id, key, value)

    storage.set_trial_system_attr = counting
    with store.heartbeat(storage, tid, 60.0, attrs=progress.unpublished):
        for step in range(1, 50):  # many reports between two heartbeats: no write each
            report("training", step, 400)
    assert writes.count("search:progress") == 1
    record = TrialRecord.from_trial(storage.get_trial(tid))
    assert record.progress == TrialProgress(rung=1, phase="compiling", step=0, total=400)
    # The next beat publishes the latest report, once.
    assert progress.unpublished()["search:progress"]["step"] == 49
    assert progress.unpublished() == {}


class _ReportingSurrogate(SurrogateEvaluator):
    """The surrogate, reporting progress as `TrainingEvaluator` does (through the request)."""

    def train(self, request):
        request.on_progress("compiling", 0, request.steps)
        time.sleep(0.1)  # a few heartbeats: the phase is published
        request.on_progress("training", request.steps, request.steps)
        time.sleep(0.1)
        return super().train(request)


def test_a_worker_publishes_its_evaluators_progress_in_the_trial(fast_tmp):
    changes = {"budget.max_trials": 2, "heartbeat.interval_s": 0.02, "requirements.max_macs": 1e9}
    data = settings(**changes)
    records, _ = run(fast_tmp, "progress", data, _ReportingSurrogate())
    trained = [r for r in records if r.is_trained]
    assert trained
    for r in trained:
        last = r.last
        assert r.progress == TrialProgress(last.rung, "training", last.steps, last.steps)


def test_the_table_fits_a_narrow_terminal():
    console = Console(record=True, width=90)
    budget = BudgetConfig(max_trials=20, max_wall_time_s=600)
    console.print(render(RECORDS, budget, 12.0, rows=12, objective="min_macs"))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│ │")]
    assert len(rows) == len(RECORDS)
    assert all(line.rstrip().endswith("│ │") for line in rows)  # not cropped at the edge
