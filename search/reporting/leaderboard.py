"""The leaderboard: trained candidates ranked by the search's objective, as CSV, JSON and a table.

Files written in the workdir (compare/export read them; see docs/CONTRACTS.md):

- `leaderboard.json`: `{"study", "objective", "requirements", "judged_on", "intervals",
  "counts", "rows", "best", "confirmation"}`. `counts` tallies trials by status plus
  `proposed`, `feasible`, `retried`, `unsettled` and `abandoned` (see `count_statuses`).
  Each row is one trained candidate (duplicates left out), best
  first: `rank, trial, spec_hash, summary, feasible, pareto, macs, params, activation_bytes,
  rung, steps, val_accuracy, val_count, sensitivity {class: value}, ppv {class: value},
  intervals {rate: [low, high]}, netscore, violations {name: shortfall}, reason, compile_s,
  train_s, checkpoint, parent, operator`. Every metric is that of the trial's last checkpoint
  at its last rung (`judged_on`); `intervals` are two-sided at `intervals.level`. `best` is
  the content of `best/metrics.json` (or null when no design was confirmed), `confirmation`
  every confirmation run of the finish (`search.execution.finish.ConfirmationRun.to_dict()`).
- `leaderboard.csv`: the same rows flattened: per-class `sensitivity:<class>` and
  `ppv:<class>` columns, intervals as `<rate>:low` and `<rate>:high`, violations as
  `name=value;...`.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.typed_yaml import from_dict
from search.config import Objective, RequirementsConfig
from search.ledger.records import TrialRecord, pareto_front, proposal_outcomes, rank_key
from search.ledger.requirements import describe_violations

CSV_NAME = "leaderboard.csv"
JSON_NAME = "leaderboard.json"


def ranked(records: Sequence[TrialRecord], objective: Objective) -> list[TrialRecord]:
    """Trained candidates (no duplicates), best first."""
    trained = [r for r in records if r.is_trained]
    return sorted(trained, key=lambda r: (rank_key(r, objective), r.number))


def count_statuses(records: Sequence[TrialRecord]) -> dict[str, int]:
    """Trials per status, plus the account of proposals: `proposed` (retries and abandoned
    asks excluded), `feasible` (trained ones), `retried` (trials that retry a lost or failed
    one), `unsettled` (proposals still running, waiting for a retry, or lost with none
    queued: a resume trains them) and `abandoned` (asks killed before their genome was
    drawn; the budget asked again)."""
    counts = Counter(r.status or "waiting" for r in records)
    result = dict(sorted(counts.items()))
    outcomes = proposal_outcomes(records)
    result["proposed"] = len(outcomes)
    result["feasible"] = sum(1 for r in records if r.is_trained and r.feasible)
    result["retried"] = sum(1 for r in records if r.retry_of is not None)
    result["unsettled"] = sum(1 for o in outcomes if not o.settled)
    result["abandoned"] = sum(1 for r in records if r.abandoned)
    return result


def _intervals(metrics: EvalMetrics, reqs: RequirementsConfig) -> dict[str, list[float]]:
    # The rates the rows show: accuracy, then sensitivity and PPV per class.
    found = {}
    for name in metrics.rate_names():
        if not name.startswith("specificity:"):
            estimate = metrics.estimate(name, level=reqs.confidence, method=reqs.interval)
            found[name] = [estimate.low, estimate.high]
    return found


def leaderboard_rows(
    records: Sequence[TrialRecord],
    objective: Objective,
    requirements: RequirementsConfig | None = None,
) -> list[dict[str, Any]]:
    """The leaderboard rows (see the module docstring).

    Args:
        records: every trial's record.
        objective: the search objective (the rank).
        requirements: sets the intervals' confidence and method (default 95%, Wilson).
    """
    reqs = requirements if requirements is not None else RequirementsConfig()
    front = {r.number for r in pareto_front(records)}
    rows = []
    for rank, r in enumerate(ranked(records, objective), start=1):
        metrics = r.last.metrics
        rows.append(
            {
                "rank": rank,
                "trial": r.number,
                "spec_hash": r.spec_hash,
                "summary": r.summary,
                "feasible": r.feasible,
                "pareto": r.number in front,
                "macs": r.macs,
                "params": r.params_count,
                "activation_bytes": r.activation_bytes,
                "rung": r.last.rung,
                "steps": r.last.steps,
                "val_accuracy": metrics.accuracy,
                "val_count": metrics.count,
                "sensitivity": dict(zip(metrics.class_names, metrics.sensitivity, strict=True)),
                "ppv": dict(zip(metrics.class_names, metrics.ppv, strict=True)),
                "intervals": _intervals(metrics, reqs),
                "netscore": r.netscore(),
                "violations": r.violations,
                "reason": describe_violations(r.violations, reqs),
                "compile_s": r.compile_s,
                "train_s": r.train_s,
                "checkpoint": r.checkpoint,
                "parent": r.parent,
                "operator": r.operator,
            }
        )
    return rows


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in row.items():
        if key in ("sensitivity", "ppv"):
            for name, v in value.items():
                flat[f"{key}:{name}"] = f"{v:.4f}"
        elif key == "intervals":
            for name, (low, high) in value.items():
                flat[f"{name}:low"] = f"{low:.4f}"
                flat[f"{name}:high"] = f"{high:.4f}"
        elif key == "violations":
            flat[key] = ";".join(f"{k}={v:.4g}" for k, v in value.items())
        elif isinstance(value, float):
            flat[key] = f"{value:.6g}"
        else:
            flat[key] = "" if value is None else value
    return flat


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_leaderboard(
    workdir: str | Path,
    records: Sequence[TrialRecord],
    *,
    study: str,
    objective: Objective,
    requirements_data: Mapping[str, Any],
    best: Mapping[str, Any] | None,
    confirmation: Sequence[Mapping[str, Any]] = (),
) -> tuple[Path, Path]:
    """Writes `leaderboard.csv` and `leaderboard.json` atomically.

    Args:
        workdir: the search's working directory.
        records: every trial's record.
        study: the study name.
        objective: the objective.
        requirements_data: the requirements as plain data (for the JSON).
        best: the best design's summary (`best/metrics.json`), or None.
        confirmation: every confirmation run of the finish (`ConfirmationRun.to_dict()`).

    Returns:
        The CSV and JSON paths.
    """
    workdir = Path(workdir)
    reqs = from_dict(RequirementsConfig, dict(requirements_data), path="requirements")
    rows = leaderboard_rows(records, objective, reqs)
    document = {
        "study": study,
        "objective": objective,
        "requirements": dict(requirements_data),
        "judged_on": "validation metrics of each trial's last checkpoint at its last rung",
        "intervals": {"level": reqs.confidence, "method": reqs.interval},
        "counts": count_statuses(records),
        "rows": rows,
        "best": None if best is None else dict(best),
        "confirmation": [dict(run) for run in confirmation],
    }
    json_path = workdir / JSON_NAME
    _atomic_write(json_path, json.dumps(document, indent=2) + "\n")
    flat = [_flatten(row) for row in rows]
    fields: list[str] = []
    for row in flat:
        fields.extend(k for k in row if k not in fields)
    csv_path = workdir / CSV_NAME
    tmp = csv_path.with_name(f".{CSV_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields or ["rank"])
        writer.writeheader()
        writer.writerows(flat)
    os.replace(tmp, csv_path)
    return csv_path, json_path


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters (with an ellipsis when cut)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def leaderboard_table(
    records: Sequence[TrialRecord],
    objective: Objective,
    *,
    requirements: RequirementsConfig | None = None,
    limit: int = 10,
    width: int = 30,
) -> Table:
    """The top of the leaderboard as a rich table (designs clipped to `width` characters)."""
    reqs = requirements if requirements is not None else RequirementsConfig()
    table = Table(title=f"Leaderboard ({objective}, best first)", expand=False, padding=(0, 1))
    val = f"val acc [{reqs.confidence:.0%} CI]"
    for name in ("trial", "ok", "MACs", "params", "rung", val, "NetScore"):
        table.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 5))
    table.add_column("design / why not feasible", no_wrap=True)
    for row in leaderboard_rows(records, objective, reqs)[:limit]:
        low, high = row["intervals"]["accuracy"]
        table.add_row(
            str(row["trial"]),
            "yes" if row["feasible"] else "no",
            format_count(row["macs"]),
            format_count(row["params"]),
            f"{row['rung']} ({row['steps']})",
            f"{row['val_accuracy']:.3f} [{low:.3f}, {high:.3f}]",
            f"{row['netscore']:.1f}",
            clip(row["summary"] if row["feasible"] else row["reason"], width),
        )
    return table


def format_count(value: int | None) -> str:
    """12_300_000 -> "12.3M"."""
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)
