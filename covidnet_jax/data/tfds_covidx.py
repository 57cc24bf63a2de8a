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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator
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
    """

    name: str
    data_dir: Path
    path: Path
    class_counts: dict[str, dict[str, int]]


def _tfds():
    # Imported lazily: TFDS takes a second to import and most commands never need it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow_datasets as tfds

    return tfds


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
                with ProcessPoolExecutor(max_workers=workers) as pool:
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


def prepare_covidx(
    covidx_dir: str | Path,
    *,
    resolution: int,
    channels: int = 3,
    data_dir: str | Path | None = None,
    train_split_file: str | None = None,
    test_split_file: str | None = None,
    show_progress: bool = False,
) -> PrepareResult:
    """Builds (or finds already built) the `covidx/r<res>_c<ch>` data set.

    Args:
        covidx_dir: the COVIDx folder (train/, test/ and split files), the manual dir.
        resolution: image side in pixels (16..2048).
        channels: 1 or 3.
        data_dir: TFDS data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
        train_split_file: train split file relative to `covidx_dir` (default train.txt).
        test_split_file: likewise for test.
        show_progress: show TFDS's progress bars.

    Returns:
        Where the data set is and its class counts per split.

    Raises:
        DataError: for a folder that is not COVIDx-shaped, bad split files, missing or
            unreadable images (naming the file), or a nonsense resolution.
    """
    check_resolution(resolution, channels)
    tfds = _tfds()
    folder = open_covidx_folder(
        covidx_dir, train_split_file=train_split_file, test_split_file=test_split_file
    )
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets"
    data_dir = Path(data_dir).expanduser()
    builder_cls = make_builder_class()
    config = next(
        (c for c in builder_cls.BUILDER_CONFIGS if c.name == config_name(resolution, channels)),
        None,
    ) or builder_cls.BUILDER_CONFIGS[0].__class__(resolution=resolution, channels=channels)
    builder = builder_cls(
        folder=folder, config=config, data_dir=str(data_dir), file_format="array_record"
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
        builder.download_and_prepare(download_config=download_config)
    finally:
        if not show_progress:
            tfds.enable_progress_bar()
    counts = {}
    for split in ("train", "test"):
        names = builder.info.features["label"].names
        source = builder.as_data_source(split=split)
        labels = [names[source[i]["label"]] for i in range(len(source))]
        counts[split] = {n: labels.count(n) for n in names}
    expected = {"train": folder.train.class_counts(), "test": folder.test.class_counts()}
    for split, wanted in expected.items():
        if {k: v for k, v in counts[split].items() if v} != wanted:
            raise DataError(
                f"{builder.data_dir}: already prepared from different data ({split}: "
                f"{counts[split]}, the folder now has {wanted}); delete that folder and run "
                "prepare again"
            )
    return PrepareResult(
        name=f"{DATASET_NAME}/{config.name}",
        data_dir=data_dir,
        path=Path(builder.data_dir),
        class_counts=counts,
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
