"""`covidnet search` end to end with real JAX training on a tiny synthetic data set."""

from __future__ import annotations

import json
import textwrap

import pytest

import search
from search.cli import main
from search.ledger.store import load_study, open_storage, read_records

EXPERIMENT = """\
seed: 0
model: {{arch: tiny}}
data:
  covidx_dir: {data}
  synth: {{per_class: 24, image_size: 64, seed: 0}}
  resolution: 32
  channels: 3
  validation_fraction: 0.25
  augment: false
optimizer: {{name: adam, learning_rate: 0.003}}
train: {{batch_size: 8, eval_every: 2, log_every: 2, keep_checkpoints: 1, keep_best: 1}}
search:
  space:
    stage_depths: [[1, 2], [1, 1]]
    connectivity: [dense, residual]
  requirements:
    max_macs: 4.5e+5
    min_accuracy: 0.0
  objective: min_macs
  strategy: {{name: random}}
  budget: {{max_trials: 5, rungs: [2, 4], reduction_factor: 2, final_steps: 6}}
"""


def write_experiment(tmp_path, **extra: str):
    path = tmp_path / "search.yaml"
    text = EXPERIMENT.format(data=tmp_path / "synth")
    for key, value in extra.items():
        text = text.replace(key, value)
    path.write_text(textwrap.dedent(text))
    return path


def test_config_errors_name_the_key_and_exit_2(tmp_path, capsys):
    path = write_experiment(tmp_path, **{"rungs: [2, 4]": "rungs: [4, 2]"})
    assert main(["search", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "search.budget.rungs[1]: expected ascending steps" in err
    assert "Traceback" not in err
    path = write_experiment(tmp_path, **{"min_accuracy: 0.0": "min_acuracy: 0.0"})
    assert main(["search", "--config", str(path)]) == 2
    assert "search.requirements.min_acuracy: unknown key" in capsys.readouterr().err
    path = write_experiment(tmp_path)
    assert main(["search", "--config", str(path), "--workers", "0"]) == 2
    assert "--workers: expected a count >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_search_command_trains_ranks_and_resumes(tmp_path, capsys):
    path = write_experiment(tmp_path)
    workdir = tmp_path / "run"
    args = ["search", "--config", str(path), "--workdir", str(workdir), "--no-live"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "proposed 5" in out and "best design: trial" in out
    assert "verdict on the test split:" in out and "accuracy >= 0.000" in out

    records = read_records(load_study(open_storage(workdir), "run"))
    assert len(records) == 5
    statuses = {r.status for r in records}
    assert statuses <= {"trained", "infeasible", "duplicate"}
    for r in records:
        if r.status == "infeasible":
            assert r.macs > 4.5e5 and not (workdir / "trials" / str(r.number)).exists()
        if r.status == "trained":
            assert r.rungs[0].steps == 2 and r.rungs[0].metrics.count > 0
            assert (workdir / r.attrs["checkpoint"]).is_dir()

    board = json.loads((workdir / "leaderboard.json").read_text())
    assert board["counts"]["proposed"] == 5
    assert [row["rank"] for row in board["rows"]] == list(range(1, len(board["rows"]) + 1))
    assert (workdir / "leaderboard.csv").read_text().startswith("rank,trial,spec_hash")
    best = json.loads((workdir / "best" / "metrics.json").read_text())
    assert best["trial"] == board["rows"][0]["trial"] and best["steps"] == 6
    assert best["test"]["count"] > 0 and best["validation"]["count"] > 0
    assert (workdir / "best" / "spec.json").exists()
    # Confirmed over two more seeds (the default), each on its own validation split.
    assert [(r["index"], r["validation_draw"]) for r in best["confirmation"]][-3:] == [
        (0, 0),
        (1, 1),
        (2, 2),
    ]
    assert best["verdict"] in ("met", "not met", "inconclusive")
    assert best["requirements"][0]["test"]["trials"] == best["test"]["count"]
    stamp = (workdir / "best" / "metrics.json").stat().st_mtime_ns

    # The same command again: nothing new is trained and the test split is not scored again.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already finished" in out
    assert "the search's budget is spent (5/5 proposals" in out and "nothing new" in out
    assert len(read_records(load_study(open_storage(workdir), "run"))) == 5
    assert (workdir / "best" / "metrics.json").stat().st_mtime_ns == stamp

    # The same search from Python: a result object instead of printed text.
    result = search.run(str(path), workdir)
    assert len(result.records) == 5 and result.counts["proposed"] == 5
    assert result.best.summary["trial"] == best["trial"]
    assert [r.name for r in result.best.reports] == ["accuracy"]
    assert result.leaderboard_json == workdir / "leaderboard.json"
    assert (workdir / "best" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_worker_trains_without_finishing_and_artifacts_live_under_the_root(tmp_path, capsys):
    path = write_experiment(tmp_path)
    workdir, shared = tmp_path / "run", tmp_path / "shared"
    args = [
        "search", "--config", str(path), "--workdir", str(workdir), "--no-live",
        "--set", "search.budget.max_trials=2", "--set", "search.confirm.seeds=0",
        "--set", f"search.artifact_root={shared}",
    ]  # fmt: skip
    assert main([*args, "--worker"]) == 0
    out = capsys.readouterr().out
    assert "worker done" in out and "best design" not in out
    records = read_records(load_study(open_storage(workdir), "run"))
    trained = [r for r in records if r.status == "trained"]
    assert trained and all((shared / r.checkpoint).is_dir() for r in trained)
    assert not (workdir / "trials").exists() and not (shared / "best").exists()

    assert main(args) == 0  # a plain invocation on the same study finishes it
    out = capsys.readouterr().out
    assert "best design: trial" in out and str(shared / "best" / "spec.json") in out
    assert (shared / "best" / "metrics.json").is_file() and (shared / "leaderboard.json").is_file()
    assert not (workdir / "best").exists()

    assert main(["compare", str(workdir), "--out", str(tmp_path / "cmp")]) == 0
    assert main(["export", "--workdir", str(workdir)]) == 0
    assert "exported best design" in capsys.readouterr().out
    assert (shared / "export" / "export.json").is_file()
