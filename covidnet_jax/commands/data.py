"""`covidnet data synth` and `covidnet data prepare`: write and prepare data sets."""

from __future__ import annotations

import argparse
import time

from covidnet_jax.data.synth import DEFAULT_IMAGE_SIZE, DEFAULT_PER_CLASS

_SYNTH_EPILOG = """\
examples:
  covidnet data synth --out data/synth
  covidnet data synth --out data/synth-big --per-class 2000 --image-size 256 --seed 1

The folder gets train/ and test/ PNG files, train.txt and test.txt (COVIDx split files:
<patient_id> <filename> <label> <source>), masks/<filename> lesion masks (255 = lesion) and
synth.json with the settings. The same settings always give the same files.
"""

_PREPARE_EPILOG = """\
examples:
  covidnet data prepare --covidx-dir data/synth --resolution 64
  covidnet data prepare --covidx-dir ~/covidx --resolution 480 --channels 3 --data-dir ~/tfds

  covidnet data prepare --covidx-dir ~/covidx-v1 --resolution 224 --drop-exact-duplicates
  covidnet data prepare --covidx-dir ~/covidx --resolution 480 --data-dir ~/tfds --rebuild

Builds the TFDS data set `covidx/r<RES>_c<CH>` (uint8 arrays in ArrayRecord files, no
TensorFlow needed) from a COVIDx folder holding train/, test/ and their split files. Use it in
an experiment with `data: {tfds_data_dir: DIR, resolution: RES, channels: CH}`.

A data set already prepared there is reused only if the split files and images (names, sizes,
modification times) are unchanged; otherwise prepare refuses, and --rebuild replaces it.
Patients with images in both train and test are stored and reported; runs on the data set
refuse them unless `data.allow_shared_patients: true`.
"""


def _run_synth(args: argparse.Namespace) -> int:
    from covidnet_jax.data.synth import write_synthetic_dataset

    started = time.perf_counter()
    summary = write_synthetic_dataset(
        args.out,
        per_class=args.per_class,
        image_size=args.image_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - started
    print(f"wrote {summary.out_dir} in {elapsed:.1f} s")
    for split, counts in summary.class_counts.items():
        parts = ", ".join(f"{name} {n}" for name, n in counts.items())
        print(
            f"  {split:<5} {sum(counts.values()):>6} images, {summary.patients[split]:>5} "
            f"patients ({parts})"
        )
    print(f"  lesion masks in {summary.out_dir / 'masks'}")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from covidnet_jax.data.tfds_covidx import prepare_covidx

    result = prepare_covidx(
        args.covidx_dir,
        resolution=args.resolution,
        channels=args.channels,
        data_dir=args.data_dir,
        train_split_file=args.train_split_file,
        test_split_file=args.test_split_file,
        classes=args.classes,
        drop_exact_duplicates=args.drop_exact_duplicates,
        rebuild=args.rebuild,
        show_progress=True,
        log=lambda line: print(line, flush=True),
    )
    done = "already prepared" if result.reused else "prepared"
    print(f"{done} {result.name} in {result.data_dir} ({result.path})")
    for split, counts in result.class_counts.items():
        parts = ", ".join(f"{name} {n}" for name, n in counts.items())
        print(f"  {split:<5} {sum(counts.values()):>6} images ({parts})")
    return 0


def _class_list(text: str) -> tuple[str, ...]:
    """Parses --classes: comma-separated class names in label order."""
    names = tuple(n.strip() for n in text.split(","))
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected two or more distinct comma-separated class names, got {text!r}"
        )
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `data synth` and `data prepare` to the `covidnet` command."""
    data = subparsers.add_parser(
        "data",
        help="write the synthetic data set; prepare a COVIDx folder as a TFDS data set",
        description="Write the synthetic COVIDx-format data set or prepare a COVIDx folder.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])

    synth = commands.add_parser(
        "synth",
        help="write the procedural synthetic chest X-ray data set (COVIDx format)",
        description="Write the procedural synthetic chest X-ray data set in COVIDx format.",
        epilog=_SYNTH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    synth.add_argument(
        "--per-class",
        type=int,
        default=DEFAULT_PER_CLASS,
        metavar="N",
        help=f"images per class, train and test together (default {DEFAULT_PER_CLASS})",
    )
    synth.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        metavar="S",
        help=f"image height in pixels; width is 8%% larger (default {DEFAULT_IMAGE_SIZE})",
    )
    synth.add_argument("--seed", type=int, default=0, metavar="K", help="seed (default 0)")
    synth.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists and is not empty"
    )
    synth.set_defaults(func=_run_synth)

    prepare = commands.add_parser(
        "prepare",
        help="build the TFDS `covidx` data set (ArrayRecord) from a COVIDx folder",
        description="Preprocess a COVIDx folder into the TFDS `covidx` data set "
        "(drop top 8% of rows, centre square crop, resize; uint8 in ArrayRecord).",
        epilog=_PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument(
        "--covidx-dir", required=True, metavar="DIR", help="COVIDx folder (train/, test/, splits)"
    )
    prepare.add_argument(
        "--resolution", type=int, required=True, metavar="N", help="image side, e.g. 64/224/480"
    )
    prepare.add_argument(
        "--channels", type=int, choices=(1, 3), default=3, help="1 (grey) or 3 (default 3)"
    )
    prepare.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="TFDS data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    prepare.add_argument(
        "--train-split-file", default=None, metavar="FILE", help="default train.txt"
    )
    prepare.add_argument("--test-split-file", default=None, metavar="FILE", help="default test.txt")
    prepare.add_argument(
        "--classes",
        type=_class_list,
        default=None,
        metavar="A,B,...",
        help="class names in label order (default: from the data; only COVIDx labels: normal, "
        "pneumonia, COVID-19, negative, positive, level1, level2)",
    )
    prepare.add_argument(
        "--drop-exact-duplicates",
        action="store_true",
        help="drop split-file lines that repeat an earlier line exactly (COVIDx v1 has 2,961)",
    )
    prepare.add_argument(
        "--rebuild",
        action="store_true",
        help="delete a data set already prepared at this resolution in DIR and build it again "
        "(needed when the split files or images changed since)",
    )
    prepare.set_defaults(func=_run_prepare)
