"""One rank for the whole search: the leaderboard, `covidnet compare` and the finish agree."""

from __future__ import annotations

import csv
import json

from search_support import run, settings

from covidnet_jax.typed_yaml import from_dict
from search.config import SearchSettings
from search.execution.finish import feasible_ranked
from search.reporting.compare import comparison_rows, load_run
from search.reporting.compare_report import write_comparison
from search.reporting.leaderboard import write_leaderboard


def test_leaderboard_comparison_and_finish_rank_alike(tmp_path):
    # Without the cost pre-filter over-budget designs are trained too, so the fixture holds
    # feasible designs, designs that miss an outcome requirement and over-budget designs.
    data = settings(
        **{
            "budget.max_trials": 20,
            "budget.cost_prefilter": False,
            "strategy.name": "random",
            "requirements.max_macs": 2.0e6,
        }
    )
    records, _ = run(tmp_path, "rank", data)
    workdir = tmp_path / "rank"
    search = from_dict(SearchSettings, data, path="search")
    trained = [r for r in records if r.is_trained]
    over = [r for r in trained if r.violations.get("macs", 0) > 0]
    missing = [r for r in trained if not r.feasible and not r.violations.get("macs", 0)]
    feasible = [r for r in trained if r.feasible]
    assert over and missing and feasible, "the fixture needs all three kinds"

    write_leaderboard(
        workdir,
        records,
        study=workdir.name,
        objective=search.objective,
        requirements_data=data["requirements"],
        best=None,
    )
    board = [row["trial"] for row in json.loads((workdir / "leaderboard.json").read_text())["rows"]]
    with open(workdir / "leaderboard.csv", newline="") as f:
        board_csv = [int(row["trial"]) for row in csv.DictReader(f)]
    compared = [row["trial"] for row in comparison_rows([load_run(workdir)]) if row["rank"]]
    paths = write_comparison([load_run(workdir)], tmp_path / "compare")
    with open(paths["csv"], newline="") as f:
        compared_csv = [int(row["trial"]) for row in csv.DictReader(f) if row["rank"]]
    finish = [r.number for r in feasible_ranked(records, search)]

    assert board == board_csv == compared == compared_csv
    assert finish == [t for t in board if t in {r.number for r in feasible}]
    # Feasible first, then over-budget by how far over, then by the outcome shortfall.
    kinds = ["ok" if t in finish else "other" for t in board]
    assert kinds == sorted(kinds, key=lambda k: k != "ok")
