"""`covidnet train`, `covidnet evaluate`, `covidnet predict`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

_TRAIN_EPILOG = """\
examples:
  covidnet train --config experiments/smoke.yaml                 # writes runs/smoke/
  covidnet train --config experiments/smoke.yaml --set train.steps=400 --set seed=1
  covidnet train --config experiments/smoke.yaml                 # again: resumes

Running the same command again resumes from the latest checkpoint; a larger budget
continues a finished run. Metrics go to WORKDIR/metrics.jsonl.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `train`, `evaluate` and `predict` to the `covidnet` command."""
    train = subparsers.add_parser(
        "train",
        help="train one design (resumes from the workdir's latest checkpoint)",
        description="Trains one design from an experiment file, evaluating on the validation "
        "split and keeping the latest and best checkpoints.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", required=True, metavar="FILE", help="experiment YAML file")
    train.add_argument(
        "--workdir", metavar="DIR", help="run directory (default: runs/<config file name>)"
    )
    _add_set(train)
    train.add_argument(
        "--init-from",
        metavar="DIR",
        help="copy matching parameters from another run's best checkpoint (fresh runs only)",
    )
    train.add_argument(
        "--no-progress", action="store_true", help="hide the status line and the progress bar"
    )
    train.set_defaults(func=_run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="accuracy, per-class sensitivity/PPV, confusion matrix, NetScore",
        description="Evaluates the checkpoint a run hands on (the best by validation, or "
        "the last with train.select: last) on a split: accuracy, per-class sensitivity, PPV "
        "and specificity with confidence intervals (Wilson), per-class AUROC (DeLong "
        "interval) and calibration (ECE). Writes WORKDIR/evaluation/<split>.json, "
        "<split>_confusion.png and <split>_reliability.png.",
    )
    evaluate.add_argument("--workdir", required=True, metavar="DIR", help="a training run")
    evaluate.add_argument(
        "--split",
        choices=("validation", "test"),
        default="validation",
        help="validation (default) or test (the final report; never used for selection)",
    )
    evaluate.add_argument(
        "--step", type=int, help="a checkpoint step instead of the one the run hands on"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="LEVEL",
        help="coverage of the confidence intervals (default 0.95)",
    )
    _add_set(evaluate, what="the saved config, e.g. data.covidx_dir=/new/path")
    evaluate.set_defaults(func=_run_evaluate)

    predict = subparsers.add_parser(
        "predict",
        help="class probabilities of image files",
        description="Class probabilities per image from a run's best checkpoint (--workdir) "
        "or from an export (--model, see covidnet export), with the training preprocessing.",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", metavar="DIR", help="a training run")
    source.add_argument("--model", metavar="EXPORT", help="an export folder (covidnet export)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--step", type=int, help="a checkpoint step instead of the best")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    add_max_image_pixels(predict)
    predict.set_defaults(func=_run_predict)


def add_max_image_pixels(parser: argparse.ArgumentParser) -> None:
    """Adds `--max-image-pixels` (the largest image decoded) to a command reading images."""
    from covidnet_jax.data.preprocess import DEFAULT_MAX_IMAGE_PIXELS

    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help="largest image (width x height) decoded; larger files are refused as possible "
        f"decompression bombs (default {DEFAULT_MAX_IMAGE_PIXELS:,}, PIL's limit)",
    )


def check_max_image_pixels(value: int) -> int:
    """`--max-image-pixels` as given, or ConfigError for a count below 1."""
    if value < 1:
        from covidnet_jax.errors import ConfigError

        raise ConfigError(f"--max-image-pixels: expected a pixel count >= 1, got {value}")
    return value


def _add_set(parser: argparse.ArgumentParser, what: str = "the config") -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        dest="overrides",
        help=f"override a value of {what} (repeatable; VALUE is YAML)",
    )


@contextlib.contextmanager
def _starting(show: bool) -> Iterator[None]:
    """A status line while the command starts (importing JAX takes seconds), on a terminal
    only; `train_and_evaluate` shows its own from there on."""
    if not show or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True, highlight=False).status(
        "starting (importing JAX)...", spinner="dots"
    ):
        yield


def _run_train(args: argparse.Namespace) -> int:
    with _starting(show=not args.no_progress):
        from covidnet_jax.config import load_train_config
        from covidnet_jax.disk import ensure_writable
        from covidnet_jax.train import train_and_evaluate

        config = load_train_config(args.config, args.overrides)
        workdir = Path(args.workdir) if args.workdir else Path("runs") / Path(args.config).stem
        ensure_writable(workdir, "--workdir", create=False)  # fails now, not at the first save
    result = train_and_evaluate(
        config, workdir, init_from=args.init_from, show_progress=not args.no_progress
    )
    if not result.ok:
        kept = (
            f"; last good checkpoint: step {result.last_good_step}"
            if result.last_good_step is not None
            else "; no checkpoint was written"
        )
        print(
            f"covidnet train: failed at step {result.step} ({result.kind}): {result.reason}{kept}",
            file=sys.stderr,
        )
        return 1
    m = result.metrics
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    if result.resumed_from is not None and result.resumed_from >= result.step:
        print(
            f"{result.workdir} already holds a finished run of {result.step} steps; nothing "
            "trained (raise train.steps with --set to continue it)"
        )
    else:
        print(f"trained {result.step} steps in {result.workdir}{resumed}")
        print(
            f"compile {result.compile_s:.1f} s, train {result.train_s:.1f} s "
            f"({result.images_per_s:.0f} images/s), validation {result.eval_s:.1f} s"
        )
    if result.inherited:
        print(f"inherited {result.inherited} of {result.inheritable} parameter arrays")
    per_class = ", ".join(
        f"{n} {s:.3f}/{p:.3f}" for n, s, p in zip(m.class_names, m.sensitivity, m.ppv, strict=True)
    )
    print(
        f"best step {result.best_step} by {result.selection_metric} = "
        f"{result.selection_value:.4f}: validation accuracy {m.accuracy:.4f}; "
        f"sensitivity/PPV {per_class}"
    )
    for note in m.warnings():
        print(f"note: {note}")
    print(f"next: covidnet evaluate --workdir {result.workdir}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from covidnet_jax.checkpointing import find_checkpoint_dir
    from covidnet_jax.disk import ensure_writable
    from covidnet_jax.evaluate import evaluate_workdir, format_evaluation, write_evaluation

    if not 0.0 < args.confidence < 1.0:
        from covidnet_jax.errors import ConfigError

        raise ConfigError(f"--confidence: expected a level in (0, 1), got {args.confidence}")
    find_checkpoint_dir(args.workdir)  # CheckpointError for a folder that is not a run
    # The results go to WORKDIR/evaluation: a read-only workdir fails before the evaluation.
    out = Path(args.workdir) / "evaluation"
    ensure_writable(out if out.is_dir() else out.parent, "--workdir", create=False)
    evaluation = evaluate_workdir(
        args.workdir,
        split=args.split,
        step=args.step,
        overrides=args.overrides,
        level=args.confidence,
    )
    json_path, png = write_evaluation(evaluation, args.workdir)
    if args.json:
        print(json.dumps(evaluation.to_dict()))
    else:
        print(format_evaluation(evaluation))
        print(f"\nwrote {json_path} and {png}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from covidnet_jax.predict import format_predictions, predict_images

    max_pixels = check_max_image_pixels(args.max_image_pixels)
    if args.model is not None:
        from covidnet_jax.errors import ConfigError
        from covidnet_jax.export import predict_files

        if args.step is not None:
            raise ConfigError("--step selects a checkpoint of a --workdir run, not of an export")
        predictions = predict_files(
            args.model, args.images, max_pixels=max_pixels, limit_name="--max-image-pixels"
        )
    else:
        predictions = predict_images(
            args.workdir,
            args.images,
            step=args.step,
            max_pixels=max_pixels,
            limit_name="--max-image-pixels",
        )
    if args.json:
        print(json.dumps({"predictions": [p.to_dict() for p in predictions]}))
    else:
        print(format_predictions(predictions))
    return 0
