"""The `covidx` TensorFlow Datasets builder: a COVIDx folder as preprocessed uint8 arrays.

The builder reads a COVIDx folder that the user downloaded (TFDS's "manual download" case),
applies the paper's preprocessing (`preprocess_image`: drop the top 8% of rows, centre square
crop, resize) and stores each image as a uint8 `Tensor` feature in ArrayRecord files. Tensor
features are serialised with TFDS's own protobuf and NumPy code, and ArrayRecord is read by
`array_record`, so preparing and reading need no TensorFlow (checked in the tests, where
TensorFlow is not installed). Statistics computation, which would need TensorFlow, is
skipped.

Builder configs are named `r<resolution>_c<channels>`; the usual ones are listed in
`BUILDER_CONFIGS` (64, 128, 224, 480 px; 1 or 3 channels) and any other resolution in
16..2048 works too. Features: `image` uint8 RxRxC, `label` (ClassLabel, names from the
data), `patient_id` and `filename` (text).

Example:
    >>> result = prepare_covidx("data/synth", resolution=64, channels=1, data_dir="data/tfds")
    >>> result.class_counts["test"]
    {'normal': 61, 'pneumonia': 61, 'COVID-19': 60}

Reading without this module's code: `tfds.builder_from_directory(result.path)
.as_data_source()["train"][i]` returns a dict of NumPy values.

Each prepared data set holds `covidnet_source.json`, a fingerprint of what it was built from:
the SHA-256 of both split files' bytes, the name, size and modification time of every image
(`cache.file_fingerprint`, the same rule as the array cache), the class list, the dropped
duplicate lines and the preprocessing version. Preparing into a folder whose fingerprint
differs (or that has none) is refused with a one-line error; `rebuild=True`
(`covidnet data prepare --rebuild`) deletes that data set and builds it again. Sizes and
times rather than image bytes: about 11 ms per 1000 images against 70 ms per 1000 small
(18 KB) PNGs, and minutes for a full-resolution COVIDx release, on every `prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from covidnet_jax.data import cache as cache_lib
from covidnet_jax.data.covidx import CovidxFolder, CovidxSplit, open_covidx_folder
from covidnet_jax.data.preprocess import PREPROCESS_VERSION, check_resolution, preprocess_image
from covidnet_jax.errors import DataError

DATASET_NAME = "covidx"
STANDARD_RESOLUTIONS = (64, 128, 224, 480)
SOURCE_RECORD = "covidnet_source.json"
_RECORD_FORMAT = 1
# What each fingerprint part covers, for the message when a prepared data set is stale.
_PART_NAMES = {
    "train_split_file": "the train split file",
    "test_split_file": "the test split file",
    "train_images": "train image files (names, sizes or modification times)",
    "test_images": "test image files (names, sizes or modification times)",
    "classes": "the class list",
    "dropped_duplicates": "the dropped duplicate lines (--drop-exact-duplicates)",
    "preprocess": "the preprocessing version",
}

_MANUAL_INSTRUCTIONS = """\
Download COVIDx (https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md) or
write the synthetic set with `covidnet data synth --out DIR`, then pass the folder holding
train/, test/, train.txt and test.txt as the manual dir (`covidnet data prepare --covidx-dir
DIR --resolution N`).
"""


def config_name(resolution: int, channels: int) -> str:
    """The builder config name of a resolution and channel count, e.g. "r64_c1"."""
    return f"r{resolution}_c{channels}"


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What `prepare_covidx` built.

    Attributes:
        name: "covidx/<config>".
        data_dir: the TFDS data dir.
        path: the prepared data set's folder (data_dir/covidx/<config>/<version>).
        class_counts: images per class per split.
        reused: True if an unchanged data set prepared before was kept.
        shared_patients: patient ids with images in both splits (stored as they are; runs
            refuse them unless `data.allow_shared_patients: true`).
        dropped_duplicates: {split: exact duplicate lines dropped} (non-zero splits only).
    """

    name: str
    data_dir: Path
    path: Path
    class_counts: dict[str, dict[str, int]]
    reused: bool = False
    shared_patients: tuple[str, ...] = ()
    dropped_duplicates: dict[str, int] = dataclasses.field(default_factory=dict)


def _tfds():
    # Imported lazily: TFDS takes a second to import and most commands never need it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow_datasets as tfds

    return tfds


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hides TFDS's absl log lines (the builder-config dump, "Reusing dataset") for a call.

    Only the `absl` logger's level is changed, and restored afterwards; errors still show.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _preprocess_path(args: tuple[str, int, int]) -> np.ndarray:
    path, resolution, channels = args
    return preprocess_image(path, resolution=resolution, channels=channels)


@functools.cache
def make_builder_class() -> type:
    """Defines the `Covidx` builder class once (after importing TFDS, which is slow to import)."""
    tfds = _tfds()

    class CovidxConfig(tfds.core.BuilderConfig):
        """A resolution and channel count of the preprocessed images."""

        def __init__(self, *, resolution: int, channels: int, **kwargs: Any) -> None:
            check_resolution(resolution, channels)
            super().__init__(
                name=config_name(resolution, channels),
                description=f"{resolution}x{resolution}x{channels} uint8, paper preprocessing "
                f"(version {PREPROCESS_VERSION})",
                **kwargs,
            )
            self.resolution = resolution
            self.channels = channels

    class Covidx(tfds.core.GeneratorBasedBuilder):
        """COVIDx chest radiographs, preprocessed as in the COVID-Net paper."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict[str, str]] = {
            "1.0.0": "uint8 tensors in ArrayRecord; labels from the split files."
        }
        MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
        BUILDER_CONFIGS: ClassVar[list] = [
            CovidxConfig(resolution=r, channels=c) for r in STANDARD_RESOLUTIONS for c in (1, 3)
        ]

        def __init__(self, *, folder: CovidxFolder, **kwargs: Any) -> None:
            self._folder = folder
            super().__init__(**kwargs)

        def _log_download_bytes(self) -> None:
            """Silences TFDS's "Downloading and preparing dataset ..." print."""

        def _log_download_done(self) -> None:
            """Silences TFDS's "Dataset covidx downloaded and prepared ..." print."""

        def _info(self):
            cfg = self.builder_config
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(
                            shape=(cfg.resolution, cfg.resolution, cfg.channels),
                            dtype=np.uint8,
                        ),
                        "label": tfds.features.ClassLabel(names=list(self._folder.class_names)),
                        "patient_id": tfds.features.Text(),
                        "filename": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
                # keep split-file order: reading back gives the same order as the folder
                disable_shuffling=True,
                homepage="https://github.com/lindawangg/COVID-Net",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # the folder was opened and checked in __init__
            return {
                "train": self._generate_examples(self._folder.train),
                "test": self._generate_examples(self._folder.test),
            }

        def _generate_examples(self, split: CovidxSplit) -> Iterator[tuple[str, dict]]:
            cfg = self.builder_config
            jobs = [(str(p), cfg.resolution, cfg.channels) for p in split.image_paths()]
            workers = min(os.cpu_count() or 1, 8)
            if workers > 1 and len(jobs) >= 256:
                # Spawned, not forked: the caller may hold JAX's threads (a fork of a
                # multithreaded process can deadlock).
                with ProcessPoolExecutor(
                    max_workers=workers, mp_context=multiprocessing.get_context("spawn")
                ) as pool:
                    images = pool.map(_preprocess_path, jobs, chunksize=32)
                    yield from self._examples(split, images)
            else:
                yield from self._examples(split, map(_preprocess_path, jobs))

        @staticmethod
        def _examples(split: CovidxSplit, images) -> Iterator[tuple[str, dict]]:
            for entry, image in zip(split.entries, images, strict=True):
                yield (
                    entry.filename,
                    {
                        "image": image,
                        "label": entry.label,
                        "patient_id": entry.patient_id,
                        "filename": entry.filename,
                    },
                )

    return Covidx


def source_fingerprint(folder: CovidxFolder) -> dict[str, Any]:
    """What a data set prepared from `folder` depends on, part by part (JSON-serialisable).

    Args:
        folder: the checked COVIDx folder.

    Returns:
        {part: value}: split-file SHA-256s, image fingerprints (names, sizes, modification
        times), class list, dropped duplicate lines per split, preprocessing version.
    """
    parts: dict[str, Any] = {}
    for split in (folder.train, folder.test):
        parts[f"{split.name}_split_file"] = hashlib.sha256(
            split.split_file.read_bytes()
        ).hexdigest()
        parts[f"{split.name}_images"] = cache_lib.file_fingerprint(split.image_paths())
    parts["classes"] = list(folder.class_names)
    parts["dropped_duplicates"] = {
        s.name: len(s.dropped_lines) for s in (folder.train, folder.test)
    }
    parts["preprocess"] = PREPROCESS_VERSION
    return parts


def _read_record(path: Path) -> dict[str, Any] | None:
    """The source record of a prepared data set, or None if absent or unreadable."""
    try:
        record = json.loads((path / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
        return None
    if not isinstance(record.get("parts"), dict) or not isinstance(
        record.get("class_counts"), dict
    ):
        return None
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path / f".{SOURCE_RECORD}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path / SOURCE_RECORD)


def _counts_text(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{split} " + ", ".join(f"{name} {n}" for name, n in c.items())
        for split, c in counts.items()
    )


def _stale_message(
    path: Path,
    stored: dict[str, Any] | None,
    parts: dict[str, Any],
    counts: dict[str, dict[str, int]],
) -> str:
    """The one-line refusal to reuse a prepared data set that no longer matches its folder."""
    fix = f"run prepare again with --rebuild to replace it, or delete {path}"
    if stored is None:
        return (
            f"{path}: holds a covidx data set without a readable {SOURCE_RECORD} (prepared by "
            f"an older covidnet, or interrupted), so it cannot be checked against the folder; "
            f"{fix}"
        )
    old = stored["parts"]
    changed = [_PART_NAMES.get(k, k) for k in parts if old.get(k) != parts[k]]
    changed += [_PART_NAMES.get(k, k) for k in old if k not in parts]
    return (
        f"{path}: already prepared from different data ({', '.join(changed)} changed; "
        f"stored: {_counts_text(stored['class_counts'])}; the folder now: "
        f"{_counts_text(counts)}); {fix}"
    )


def _class_counts(folder: CovidxFolder) -> dict[str, dict[str, int]]:
    counts = {}
    for split in (folder.train, folder.test):
        found = split.class_counts()
        counts[split.name] = {name: found.get(name, 0) for name in folder.class_names}
    return counts


def prepare_covidx(
    covidx_dir: str | Path,
    *,
    resolution: int,
    channels: int = 3,
    data_dir: str | Path | None = None,
    train_split_file: str | None = None,
    test_split_file: str | None = None,
    classes: Sequence[str] | None = None,
    drop_exact_duplicates: bool = False,
    rebuild: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Builds (or finds already built, from the same data) the `covidx/r<res>_c<ch>` data set.

    The folder is checked as `open_covidx_folder` does; patients shared by train and test
    are stored as they are and reported (runs refuse them unless
    `data.allow_shared_patients: true`). An existing data set is reused only if its
    `covidnet_source.json` fingerprint matches the folder now.

    Args:
        covidx_dir: the COVIDx folder (train/, test/ and split files), the manual dir.
        resolution: image side in pixels (16..2048).
        channels: 1 or 3.
        data_dir: TFDS data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
        train_split_file: train split file relative to `covidx_dir` (default train.txt).
        test_split_file: likewise for test.
        classes: class names in label order; default: from the data (COVIDx labels only).
        drop_exact_duplicates: drop split-file lines that repeat an earlier line exactly.
        rebuild: delete an existing data set of this config and version and build it again.
        show_progress: show TFDS's progress bars.
        log: called with a line for each step and warning (the CLI passes `print`).

    Returns:
        Where the data set is, its class counts per split and what was found.

    Raises:
        DataError: for a folder that is not COVIDx-shaped, bad split files, missing or
            unreadable images (naming the file), a nonsense resolution, or a data set
            already prepared there from other data (without `rebuild`).
    """
    say = log or (lambda _line: None)
    check_resolution(resolution, channels)
    tfds = _tfds()
    folder = open_covidx_folder(
        covidx_dir,
        classes=classes,
        train_split_file=train_split_file,
        test_split_file=test_split_file,
        allow_shared_patients=True,
        drop_exact_duplicates=drop_exact_duplicates,
    )
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets"
    data_dir = Path(data_dir).expanduser()
    builder_cls = make_builder_class()
    config = next(
        (c for c in builder_cls.BUILDER_CONFIGS if c.name == config_name(resolution, channels)),
        None,
    ) or builder_cls.BUILDER_CONFIGS[0].__class__(resolution=resolution, channels=channels)
    name = f"{DATASET_NAME}/{config.name}"
    path = data_dir / DATASET_NAME / config.name / str(builder_cls.VERSION)
    parts = source_fingerprint(folder)
    counts = _class_counts(folder)
    dropped = {k: n for k, n in parts["dropped_duplicates"].items() if n}
    if dropped:
        say(
            f"dropped {sum(dropped.values())} exact duplicate split-file line(s) ("
            + ", ".join(f"{k} {n}" for k, n in dropped.items())
            + ")"
        )
    if folder.shared_patients:
        shown = ", ".join(repr(p) for p in folder.shared_patients[:5])
        say(
            f"warning: {len(folder.shared_patients)} patient(s) have images in both train and "
            f"test ({shown}); runs on this data set need data.allow_shared_patients: true"
        )

    reused = False
    # Checked before TFDS sees the folder: its builder refuses other class names with a
    # ValueError, and would silently reuse a data set prepared from other split files.
    if path.exists():
        stored = _read_record(path) if (path / "dataset_info.json").is_file() else None
        if rebuild:
            say(f"removing {path} (--rebuild)")
            shutil.rmtree(path)
        elif stored is not None and stored["parts"] == parts:
            reused = True
        else:
            raise DataError(_stale_message(path, stored, parts, counts))
    n_images = {s: sum(c.values()) for s, c in counts.items()}
    if reused:
        say(f"reusing {name} in {path} (prepared from the same data)")
    else:
        say(
            f"preparing {name} from {folder.root}: {n_images['train']} train and "
            f"{n_images['test']} test images at {resolution}x{resolution}x{channels}"
        )
    download_config = tfds.download.DownloadConfig(
        manual_dir=str(folder.root),
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        # one output file per split: random access needs no sharding at these sizes
        num_shards=None,
    )
    if not show_progress:
        tfds.disable_progress_bar()
    try:
        with _quiet_tfds():
            builder = builder_cls(
                folder=folder, config=config, data_dir=str(data_dir), file_format="array_record"
            )
            if os.path.abspath(builder.data_dir) != os.path.abspath(path):
                raise AssertionError(f"TFDS writes {builder.data_dir}, expected {path}")
            if not reused:
                builder.download_and_prepare(download_config=download_config)
    finally:
        if not show_progress:
            tfds.enable_progress_bar()
    stored_sizes = {s: builder.info.splits[s].num_examples for s in ("train", "test")}
    if stored_sizes != n_images:
        raise DataError(
            f"{path}: holds {stored_sizes} examples, but its record and the folder list "
            f"{n_images}; run prepare again with --rebuild, or delete {path}"
        )
    if not reused:
        _write_record(
            path,
            {
                "format": _RECORD_FORMAT,
                "covidx_dir": str(folder.root.resolve()),
                "parts": parts,
                "class_counts": counts,
            },
        )
    return PrepareResult(
        name=name,
        data_dir=data_dir,
        path=path,
        class_counts=counts,
        reused=reused,
        shared_patients=folder.shared_patients,
        dropped_duplicates=dropped,
    )


def find_prepared(data_dir: str | Path, *, resolution: int, channels: int | None = None) -> Path:
    """The folder of a prepared `covidx` data set at `resolution` (newest version).

    Any channel count will do for training (images are grey); `channels` prefers one.

    Raises:
        DataError: if none is prepared there, with the command that prepares it.
    """
    base = Path(data_dir).expanduser() / DATASET_NAME
    preferred = [config_name(resolution, c) for c in ((channels,) if channels else ()) + (1, 3)]
    for name in preferred:
        versions = sorted(
            (p for p in (base / name).glob("*.*.*") if (p / "dataset_info.json").is_file()),
            key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()),
        )
        if versions:
            return versions[-1]
    raise DataError(
        f"{data_dir}: no prepared covidx data set at resolution {resolution}; run "
        f"`covidnet data prepare --covidx-dir DIR --resolution {resolution} --data-dir {data_dir}`"
    )


def read_prepared(
    data_dir: str | Path, *, resolution: int, cache_dir: str | None = None
) -> cache_lib.CacheEntry:
    """Reads a prepared data set into the array cache used by `load_data`.

    Reading goes through `tfds.builder_from_directory(...).as_data_source()` (ArrayRecord
    random access, NumPy decoding). The grey channel is kept; batches add channels again.

    Args:
        data_dir: the TFDS data dir.
        resolution: the wanted resolution.
        cache_dir: cache root (default: next to the prepared data set if writable).

    Returns:
        The cache entry with "train" and "test" arrays and label strings.
    """
    path = find_prepared(data_dir, resolution=resolution)
    info_bytes = (path / "dataset_info.json").read_bytes()
    key = cache_lib.cache_key(
        {
            "source": "tfds",
            "path": str(path.resolve()),
            "info": hashlib.sha256(info_bytes).hexdigest(),
            "files": cache_lib.file_fingerprint(sorted(path.glob("*array_record*"))),
        }
    )
    root = Path(cache_dir) if cache_dir else cache_lib.default_cache_root(path.parent.parent)
    entry_path = root / f"tfds-r{resolution}-{key}"
    entry = cache_lib.load_entry(entry_path)
    if entry is not None:
        return entry
    tfds = _tfds()
    with _quiet_tfds():
        builder = tfds.builder_from_directory(str(path))
    names = builder.info.features["label"].names
    arrays = {}
    for split in ("train", "test"):
        if split not in builder.info.splits:
            raise DataError(f"{path}: the prepared data set has no {split!r} split; prepare again")
        source = builder.as_data_source(split=split)
        n = len(source)
        images = np.zeros((n, resolution, resolution), np.uint8)
        labels, pids, files = [], [], []
        for i in range(n):
            example = source[i]
            images[i] = example["image"][:, :, 0]
            labels.append(names[int(example["label"])])
            pids.append(_text(example["patient_id"]))
            files.append(_text(example["filename"]))
        arrays[split] = cache_lib.SplitArrays(images, tuple(labels), tuple(pids), tuple(files))
    return cache_lib.write_entry(entry_path, arrays, skipped={})


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
