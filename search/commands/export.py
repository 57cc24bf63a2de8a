"""`covidnet export`: package a design of a finished search for use outside this project.

    covidnet export --workdir runs/quickstart                 # the best design -> runs/quickstart/export
    covidnet export --workdir runs/quickstart --trial 7 --out exports/trial7

The export folder holds spec.json, an Orbax checkpoint of the inference state, the StableHLO
artifact of the whole inference function (`model.jax_export`: preprocessed batch in, class
probabilities out, any batch size; it runs where only jax is installed),
preprocessing.json and model_card.md. Use it with `covidnet predict --model DIR IMAGE...`,
`covidnet explain --model DIR IMAGE`, or `covidnet_jax.export.predict(DIR, images)`.
TensorFlow SavedModel/TFLite conversion (jax2tf) is not offered.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from covidnet_jax.errors import ConfigError, UserError
from covidnet_jax.export import RequirementCheck, export_training_run
from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.typed_yaml import from_dict
from search.config import RequirementsConfig
from search.ledger.requirements import final_verdicts

BEST_DIR = "best"
LEADERBOARD_JSON = "leaderboard.json"


class ExportCommandError(UserError):
    """A search workdir or trial that cannot be exported."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a design: spec, Orbax checkpoint, StableHLO, preprocessing, model card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, metavar="DIR", help="a search workdir")
    parser.add_argument(
        "--trial",
        default="best",
        metavar="ID|best",
        help="a trained trial number, or best (default): the search's best design at full "
        "fidelity, with its test metrics",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="export folder (default: DIR/export, DIR/export-trial-ID)"
    )
    parser.add_argument(
        "--storage", metavar="URL", help="trial store URL of a search that did not use a journal"
    )
    parser.set_defaults(func=_run_export)


def requirement_checks(
    requirements: Mapping[str, Any],
    *,
    macs: int | None,
    params: int | None,
    activation_bytes: int | None,
    validation: Mapping[str, Any],
    test: Mapping[str, Any] | None = None,
) -> list[RequirementCheck]:
    """The search's requirements with the design's values and whether each holds.

    Outcome requirements are judged as the search judged them (`search.ledger.requirements`: the
    decision rule, its confidence and interval method), with the test split's estimate and
    verdict beside them when it was scored.

    Args:
        requirements: `search.config.RequirementsConfig` as plain data.
        macs, params, activation_bytes: the analytic cost (activation memory at the search's
            training batch size).
        validation: validation metrics (`EvalMetrics.to_dict()`).
        test: test metrics of the declared design, or None.

    Returns:
        One check per stated requirement.
    """
    try:
        reqs = from_dict(RequirementsConfig, dict(requirements), path="requirements")
    except ConfigError as err:
        raise ExportCommandError(f"{LEADERBOARD_JSON}: {err}") from None
    checks = []
    for key, label, value in (
        ("max_macs", "MACs", macs),
        ("max_params", "params", params),
        ("max_activation_bytes", "activation bytes (training)", activation_bytes),
    ):
        limit = requirements.get(key)
        if limit is not None:
            met = None if value is None else value <= limit
            checks.append(RequirementCheck(f"{label} <= {limit:.4g}", value, met, "cost model"))
    val = EvalMetrics.from_dict(dict(validation))
    tested = None if test is None else EvalMetrics.from_dict(dict(test))
    rule = "lower bound" if reqs.decision == "lower_bound" else "point estimate"
    for report in final_verdicts(reqs, val, tested):
        kind, _, class_name = report.name.partition(":")
        label = "accuracy" if not class_name else f"{class_name} {kind.replace('ppv', 'PPV')}"
        checks.append(
            RequirementCheck(
                f"{label} >= {report.minimum:.4g}",
                report.validation.value,
                report.holds_on_validation,
                f"validation ({reqs.confidence:.0%} {rule})",
                interval=(report.validation.low, report.validation.high),
                test="" if report.test is None else report.test.format(),
                verdict=report.verdict,
            )
        )
    return checks


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportCommandError(f"{path}: unreadable ({err})") from None


def _check_search_workdir(workdir: Path, storage: str | None) -> None:
    from search.ledger import store

    if not workdir.is_dir():
        raise ExportCommandError(f"{workdir}: no such folder; pass a search workdir")
    if storage is None and not store.journal_path(workdir).is_file():
        raise ExportCommandError(
            f"{workdir}: not a search workdir (no {store.JOURNAL_NAME}); run `covidnet search` "
            "first, or export a training run with covidnet_jax.export.export_training_run"
        )


def _export_best(workdir: Path, artifacts: Path, out: Path) -> tuple[Path, str]:
    summary_path = artifacts / BEST_DIR / "metrics.json"
    board_path = artifacts / LEADERBOARD_JSON
    if not summary_path.is_file():
        board = _read_json(board_path) if board_path.is_file() else {}
        if board and board.get("best") is None:
            raise ExportCommandError(
                f"{workdir}: no design met the requirements, so there is no best design; "
                f"export a trained trial with --trial ID (see {board_path})"
            )
        raise ExportCommandError(
            f"{workdir}: the search has no finished best design yet (no {BEST_DIR}/metrics.json); "
            "let `covidnet search` finish, or export a trained trial with --trial ID"
        )
    best = _read_json(summary_path)
    requirements = _read_json(board_path).get("requirements", {}) if board_path.is_file() else {}
    checks = requirement_checks(
        requirements,
        macs=best.get("macs"),
        params=best.get("params"),
        activation_bytes=None,
        validation=best["validation"],
        test=best.get("test"),
    )
    train_dir = artifacts / best.get("checkpoint", f"{BEST_DIR}/train")
    trial = best.get("trial")
    path = export_training_run(
        train_dir,
        out,
        title=f"{workdir.name}: best design (trial {trial})",
        requirements=checks,
        metrics={"validation": best["validation"], "test": best["test"]},
        provenance={
            "search workdir": str(workdir),
            "trial": trial,
            "selected as": "best (confirmed)" if best.get("confirmation") else "best",
            "confirmation runs": len(best.get("confirmation", [])),
        },
    )
    return path, f"best design (trial {trial})"


def _export_trial(
    workdir: Path, artifacts: Path, number: int, storage: str | None, out: Path
) -> tuple[Path, str]:
    from search.ledger import store
    from search.reporting.compare import open_search_study

    study = open_search_study(workdir, storage, None)
    records = {r.number: r for r in store.read_records(study)}
    if not records:
        raise ExportCommandError(f"{workdir}: the search has no trials yet; run it first")
    record = records.get(number)
    if record is None:
        raise ExportCommandError(f"{workdir}: no trial {number}; trials are 0..{max(records)}")
    if not record.is_trained:
        why = record.reason or record.status or record.state.lower()
        raise ExportCommandError(f"{workdir}: trial {number} was not trained ({why})")
    board_path = artifacts / LEADERBOARD_JSON
    requirements = _read_json(board_path).get("requirements", {}) if board_path.is_file() else {}
    validation = record.last.metrics.to_dict()
    checks = requirement_checks(
        requirements,
        macs=record.macs,
        params=record.params_count,
        activation_bytes=record.activation_bytes,
        validation=validation,
    )
    path = export_training_run(
        artifacts / store.TRIALS_DIR / str(number),
        out,
        title=f"{workdir.name}: trial {number}",
        requirements=checks,
        metrics={"validation": validation},
        provenance={
            "search workdir": str(workdir),
            "trial": number,
            "fidelity rung": record.last.rung,
        },
    )
    return path, f"trial {number}"


def _run_export(args: argparse.Namespace) -> int:
    from search.ledger import store

    workdir = Path(args.workdir)
    _check_search_workdir(workdir, args.storage)
    artifacts = store.artifact_dir(workdir)  # the workdir unless search.artifact_root is set
    if args.trial == "best":
        out = Path(args.out) if args.out else artifacts / "export"
        path, what = _export_best(workdir, artifacts, out)
    else:
        try:
            number = int(args.trial)
        except ValueError:
            raise ExportCommandError(
                f"--trial {args.trial!r}: expected a trial number or best"
            ) from None
        out = Path(args.out) if args.out else artifacts / f"export-trial-{number}"
        path, what = _export_trial(workdir, artifacts, number, args.storage, out)
    print(f"exported {what} of {workdir} to {path}")
    for name in sorted(p.name for p in path.iterdir()):
        print(f"  {name}")
    print(f"next: covidnet predict --model {path} IMAGE...   covidnet explain --model {path} IMAGE")
    return 0
