"""The end of a search: the best feasible design at full fidelity, test metrics once, leaderboard.

Files written in the workdir (see docs/CONTRACTS.md):

- `best/spec.json`: the chosen design (`covidnet_jax.arch.spec_from_json` reads it).
- `best/train/`: its training run continued from its trial checkpoint to the full-fidelity
  step budget (a `covidnet train` style workdir with Orbax checkpoints).
- `best/metrics.json`: `{"trial", "spec_hash", "summary", "macs", "params", "steps",
  "validation" (EvalMetrics.to_dict()), "test" (likewise), "feasible", "violations"}`. The
  test split is scored here and nowhere else in the search; when this file already exists
  for the same design, a re-run reuses it instead of scoring the test split again.
- `leaderboard.csv` / `leaderboard.json` (see `search.leaderboard`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidnet_jax.arch import spec_from_json
from search.config import SearchSettings
from search.evaluation import EvalFailure, EvalRequest, Evaluator
from search.leaderboard import ranked
from search.records import TrialRecord
from search.requirements import Cost, cost_violations, is_feasible, outcome_violations

BEST_DIR = "best"


@dataclasses.dataclass(frozen=True)
class BestDesign:
    """The outcome of `finish_best`.

    Attributes:
        summary: the content of `best/metrics.json` (None when no design is feasible).
        message: one line for the user.
    """

    summary: Mapping[str, Any] | None
    message: str


def best_record(records: Sequence[TrialRecord], settings: SearchSettings) -> TrialRecord | None:
    """The best trained design that meets every requirement (None if there is none)."""
    for record in ranked(records, settings.objective):
        if record.feasible:
            return record
    return None


def finish_best(
    workdir: str | Path,
    records: Sequence[TrialRecord],
    settings: SearchSettings,
    evaluator: Evaluator,
) -> BestDesign:
    """Trains the best feasible design to full fidelity and scores it on the test split once.

    Args:
        workdir: the search's working directory.
        records: every trial's record.
        settings: the `search:` section.
        evaluator: trains and tests.

    Returns:
        The best design's summary, or a message saying why there is none.
    """
    workdir = Path(workdir)
    best = best_record(records, settings)
    if best is None:
        return BestDesign(None, "no design met the requirements")
    best_dir = workdir / BEST_DIR
    summary_path = best_dir / "metrics.json"
    if summary_path.exists():
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
        if previous.get("spec_hash") == best.spec_hash:
            return BestDesign(previous, f"best design: trial {best.number} (already finished)")
    spec = spec_from_json(best.attrs["spec"])
    train_dir = best_dir / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)
    best_dir.mkdir(parents=True, exist_ok=True)
    source = workdir / "trials" / str(best.number)
    if source.exists():
        shutil.copytree(source, train_dir)
    steps = max(settings.budget.full_fidelity_steps, best.last.steps)
    request = EvalRequest(spec=spec, steps=steps, workdir=train_dir, init_from=None, rung=-1)
    outcome = evaluator.train(request)
    if isinstance(outcome, EvalFailure):
        return BestDesign(
            None, f"full-fidelity training of trial {best.number} failed: {outcome.reason}"
        )
    test = evaluator.test(request)
    cost = Cost(best.macs or 0, best.params_count or 0, int(best.attrs.get("activation_bytes", 0)))
    violations = {
        **cost_violations(settings.requirements, cost),
        **outcome_violations(settings.requirements, outcome.metrics),
    }
    summary = {
        "trial": best.number,
        "spec_hash": best.spec_hash,
        "summary": best.attrs.get("summary", ""),
        "macs": best.macs,
        "params": best.params_count,
        "steps": steps,
        "checkpoint": os.path.relpath(outcome.checkpoint or train_dir, workdir),
        "validation": outcome.metrics.to_dict(),
        "test": test.to_dict(),
        "feasible": is_feasible(violations),
        "violations": violations,
    }
    (best_dir / "spec.json").write_text(spec.to_json() + "\n", encoding="utf-8")
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, summary_path)
    return BestDesign(summary, f"best design: trial {best.number}")
