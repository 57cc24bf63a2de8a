"""The input pipeline: `DataConfig` -> `load_data` -> `Data` -> batches.

`load_data` reads a COVIDx folder (or a prepared TFDS `covidx` data set), preprocesses every
image once into an on-disk cache per resolution, keeps the uint8 arrays in memory, carves a
patient-wise validation split from train and returns a `Data`. `Data.train_batches` is an
infinite iterator whose batch at step s depends only on (seed, s): per-epoch seeded shuffles,
COVID-style re-balancing and the paper's augmentations. With `augment_on: device` (the
default) the host only picks indices, gathers uint8 images and draws transform parameters; a
background thread puts two batches ahead on the devices, where one jitted function
(`device_augment.model_batch`) augments and converts them. `Data.eval_batches` yields
fixed-shape, padded batches with a mask.

Example (the `data:` section of an experiment file):

```yaml
data:
  covidx_dir: data/synth
  synth: {per_class: 300, image_size: 128, seed: 0}   # write it first if it is absent
  resolution: 64
  channels: 1
  rebalance_class: COVID-19
  rebalance_fraction: 0.3
  class_weights: balanced
```

```python
data = load_data(config, seed=0)
for step, batch in enumerate(data.train_batches(32, seed=0, start_step=resume_step)):
    batch["image"]  # float32 32x64x64x1 in [0, 1] (a jax.Array on the devices by default)
    batch["label"]  # int32 32
```
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from covidnet_jax import parallel
from covidnet_jax.data import cache as cache_lib
from covidnet_jax.data.augment import AugmentParams, apply_augment, sample_augment_params
from covidnet_jax.data.covidx import (
    KNOWN_LABELS,
    CovidxFolder,
    open_covidx_folder,
    order_class_names,
    shared_patients_message,
    unknown_labels_message,
)
from covidnet_jax.data.device_augment import AUGMENT_KEY, model_batch, pack_params
from covidnet_jax.data.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PREPROCESS_VERSION,
    check_resolution,
    crop_and_resize,
    decode_image,
)
from covidnet_jax.data.synth import (
    SYNTH_VERSION,
    read_synth_settings,
    write_synthetic_dataset,
)
from covidnet_jax.errors import ConfigError, DataError
from covidnet_jax.typed_yaml import bounded

log = logging.getLogger(__name__)

Split = Literal["train", "validation", "test"]


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings of the synthetic data set written when `covidx_dir` does not exist yet.

    Attributes:
        per_class: images per class over both splits.
        image_size: image height in pixels before preprocessing.
        seed: generator seed (the data set is a pure function of these three values).
    """

    per_class: int = bounded(300, ge=4, le=100_000)
    image_size: int = bounded(128, ge=32, le=1024)
    seed: int = bounded(0, ge=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of an experiment file.

    Exactly one source: `covidx_dir` (a COVIDx folder; with `synth` set it is written first
    if absent) or `tfds_data_dir` (a data dir holding a `covidx` TFDS data set prepared by
    `covidnet data prepare` at this resolution).

    Attributes:
        covidx_dir: COVIDx folder holding train/, test/ and the split files.
        tfds_data_dir: TFDS data dir with a prepared `covidx` data set.
        synth: write the synthetic data set into `covidx_dir` if it does not exist.
        train_split_file: train split file relative to `covidx_dir` (default train.txt, or
            the single train*.txt).
        test_split_file: likewise for test.
        resolution: model input side in pixels.
        channels: 1 (grey) or 3 (grey repeated, for 3-channel stems).
        classes: class names in label-index order; default: from the data (known COVIDx
            labels in their usual order, others alphabetical).
        validation_fraction: fraction of train images (whole patients) held out for
            validation; the split depends on patient ids only, never on the seed.
        validation_draw: which patient-disjoint validation split (0: the default; another
            number draws other patients by another hash order).
        augment: apply the paper's augmentations to training batches.
        augment_on: where train batches are augmented and made float32: "device" (the
            host gathers uint8 images and draws the transform parameters, the devices warp
            them in one jitted function, two batches prefetched by a background thread) or
            "host" (NumPy in the calling thread or in Grain `workers`). Both apply the same
            transforms (images equal to about 1e-6); "device" was faster at every measured
            size (bench/README.md, "Augmentation on the device").
        rebalance_class: class of which a fixed fraction of every train batch is drawn (the
            paper's COVID-19 re-balancing); None for plain shuffling.
        rebalance_fraction: that fraction; max(int(batch * fraction), 1) slots per batch.
        class_weights: "none", "balanced" (N / (K * n_k) over the train split) or a mapping
            class -> weight (classes left out get 1.0).
        workers: processes that preprocess images and, with `augment_on: host`, build
            train batches in parallel (Grain); 0 builds them in the calling thread.
        skip_corrupt: skip unreadable images and list them in `Data.report` instead of
            failing on the first one.
        cache_dir: where preprocessed arrays are cached; default `<covidx_dir>/.covidnet_cache`
            (or ~/.cache/covidnet_jax if that is read-only).
        max_image_pixels: largest image (width x height) decoded; a larger one is refused
            from its header, before decoding, as a possible decompression bomb (an error
            naming the file and its size, or a skipped file with `skip_corrupt`). The default
            is PIL's default limit, 89,478,485 pixels (about 9459 x 9459); raise it for
            genuinely larger scans. PIL's own process-wide limit is left alone.
        allow_shared_patients: load data whose train and test splits share patients
            (patient-level leakage, e.g. `ANON191` in COVIDx6 and 7B) and list them as a
            warning in `Data.report`; by default that is an error naming the patients.
        drop_exact_duplicates: drop split-file lines that repeat an earlier line exactly
            (COVIDx v1 has 2,961), counted in `Data.report`; by default they are an error.
            Lines that list an image twice with different fields are always an error.
    """

    covidx_dir: str | None = None
    tfds_data_dir: str | None = None
    synth: SynthConfig | None = None
    train_split_file: str | None = None
    test_split_file: str | None = None
    resolution: int = bounded(224, ge=16, le=2048)
    channels: Literal[1, 3] = 3
    classes: tuple[str, ...] | None = None
    validation_fraction: float = bounded(0.1, ge=0.0, lt=1.0)
    validation_draw: int = bounded(0, ge=0)
    augment: bool = True
    augment_on: Literal["device", "host"] = "device"
    rebalance_class: str | None = None
    rebalance_fraction: float = bounded(0.3, gt=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    workers: int = bounded(0, ge=0, le=256)
    skip_corrupt: bool = False
    cache_dir: str | None = None
    max_image_pixels: int = bounded(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    allow_shared_patients: bool = False
    drop_exact_duplicates: bool = False

    def __post_init__(self) -> None:
        if (self.covidx_dir is None) == (self.tfds_data_dir is None):
            raise ConfigError(
                "covidx_dir: set exactly one of covidx_dir (a COVIDx folder) and tfds_data_dir "
                "(a prepared TFDS data dir)"
            )
        if self.synth is not None and self.covidx_dir is None:
            raise ConfigError(
                "synth: needs covidx_dir (the folder the synthetic set is written to)"
            )
        if self.classes is not None:
            if len(self.classes) < 2:
                raise ConfigError(f"classes: need at least two classes, got {list(self.classes)}")
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"classes: names repeat in {list(self.classes)}")
            if self.rebalance_class is not None and self.rebalance_class not in self.classes:
                raise ConfigError(
                    f"rebalance_class: {self.rebalance_class!r} is not one of {list(self.classes)}"
                )
        if isinstance(self.class_weights, Mapping):
            for name, weight in self.class_weights.items():
                if not weight > 0:
                    raise ConfigError(f"class_weights.{name}: expected a weight > 0, got {weight}")
                if self.classes is not None and name not in self.classes:
                    raise ConfigError(
                        f"class_weights.{name}: not one of the classes {list(self.classes)}"
                    )


@dataclasses.dataclass(frozen=True)
class DataReport:
    """What `load_data` found, for logs and the run's report.

    Attributes:
        source: the folder or data dir read.
        cache: the cache entry used.
        counts: images per class for "train", "validation" and "test".
        patients: number of patients per split.
        skipped: {image path: reason} for unreadable images skipped with `skip_corrupt`.
        shared_patients: patient ids present in both train(+validation) and test (only
            possible with `data.allow_shared_patients: true`).
        dropped_duplicates: {split: number of exact duplicate split-file lines dropped} with
            `data.drop_exact_duplicates: true` (splits that had none are left out).
    """

    source: str
    cache: str
    counts: dict[str, dict[str, int]]
    patients: dict[str, int]
    skipped: dict[str, str]
    shared_patients: tuple[str, ...]
    dropped_duplicates: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the console: counts, skipped files, dropped lines, shared patients."""
        lines = [f"data: {self.source}"]
        for split, counts in self.counts.items():
            parts = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(
                f"  {split:<10} {sum(counts.values()):>6} images, "
                f"{self.patients[split]:>5} patients ({parts})"
            )
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable image(s):")
            lines.extend(f"    {p}: {why}" for p, why in sorted(self.skipped.items()))
        if self.dropped_duplicates:
            parts = ", ".join(f"{s} {n}" for s, n in self.dropped_duplicates.items())
            lines.append(
                f"  dropped {sum(self.dropped_duplicates.values())} exact duplicate split-file "
                f"line(s) ({parts}; data.drop_exact_duplicates)"
            )
        if self.shared_patients:
            n = len(self.shared_patients)
            shown = ", ".join(repr(p) for p in self.shared_patients[:5])
            more = f" and {n - 5} more" if n > 5 else ""
            lines.append(
                f"  warning: {n} patient(s) appear in both train and test (allowed by "
                f"data.allow_shared_patients): {shown}{more}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Reading sources into the cache


def _preprocess_one(
    path: str, resolution: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[np.ndarray | None, str]:
    """Decodes and preprocesses one file; returns (grey HxW or None, error message)."""
    try:
        return crop_and_resize(decode_image(path, max_pixels=max_pixels), resolution), ""
    except DataError as err:
        return None, str(err)


def _preprocess_files(
    paths: list[Path], resolution: int, workers: int, desc: str, max_pixels: int
) -> list[tuple[np.ndarray | None, str]]:
    from tqdm.auto import tqdm

    show = len(paths) >= 2000
    if workers > 0 and len(paths) >= 256:
        # Spawned, not forked: the caller may hold JAX's threads (a fork of a
        # multithreaded process can deadlock).
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            results = pool.map(
                _preprocess_one,
                map(str, paths),
                itertools.repeat(resolution),
                itertools.repeat(max_pixels),
                chunksize=64,
            )
            return list(tqdm(results, total=len(paths), desc=desc, disable=not show))
    return [
        _preprocess_one(str(p), resolution, max_pixels)
        for p in tqdm(paths, desc=desc, disable=not show)
    ]


def _cache_from_covidx(
    folder: CovidxFolder, config: DataConfig, resolution: int
) -> cache_lib.CacheEntry:
    splits = {"train": folder.train, "test": folder.test}
    key_parts: dict[str, Any] = {
        "source": "covidx",
        "root": str(folder.root.resolve()),
        "resolution": resolution,
        "preprocess": PREPROCESS_VERSION,
    }
    if config.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS:
        # Which files are refused depends on it; the default keeps existing entries valid.
        key_parts["max_image_pixels"] = config.max_image_pixels
    dropped = {name: len(split.dropped_lines) for name, split in splits.items()}
    if any(dropped.values()):
        # Only when lines were dropped (which needs data.drop_exact_duplicates): otherwise the
        # arrays are the same and existing entries stay valid.
        key_parts["dropped_duplicates"] = dropped
    for name, split in splits.items():
        key_parts[f"{name}_split"] = hashlib.sha256(split.split_file.read_bytes()).hexdigest()
        key_parts[f"{name}_files"] = cache_lib.file_fingerprint(split.image_paths())
    root = Path(config.cache_dir) if config.cache_dir else cache_lib.default_cache_root(folder.root)
    path = root / f"covidx-r{resolution}-{cache_lib.cache_key(key_parts)}"
    entry = cache_lib.load_entry(path)
    if entry is None:
        arrays: dict[str, cache_lib.SplitArrays] = {}
        skipped: dict[str, str] = {}
        for name, split in splits.items():
            paths = split.image_paths()
            results = _preprocess_files(
                paths, resolution, config.workers, f"preprocess {name}", config.max_image_pixels
            )
            keep = []
            for entry_, path_, (image, error) in zip(split.entries, paths, results, strict=True):
                if image is None:
                    skipped[str(path_)] = error
                else:
                    keep.append((entry_, image))
            images = (
                np.stack([im for _, im in keep])
                if keep
                else np.zeros((0, resolution, resolution), np.uint8)
            )
            arrays[name] = cache_lib.SplitArrays(
                images,
                tuple(e.label for e, _ in keep),
                tuple(e.patient_id for e, _ in keep),
                tuple(e.filename for e, _ in keep),
            )
        entry = cache_lib.write_entry(path, arrays, skipped)
    if entry.skipped and not config.skip_corrupt:
        _first, why = next(iter(sorted(entry.skipped.items())))
        more = f" ({len(entry.skipped) - 1} more unreadable)" if len(entry.skipped) > 1 else ""
        raise DataError(f"{why}{more}; fix or remove it, or set data.skip_corrupt: true")
    return entry


def _cache_from_tfds(config: DataConfig, resolution: int) -> cache_lib.CacheEntry:
    from covidnet_jax.data.tfds_covidx import read_prepared

    assert config.tfds_data_dir is not None
    return read_prepared(config.tfds_data_dir, resolution=resolution, cache_dir=config.cache_dir)


# ---------------------------------------------------------------------------------------
# Splits and batches


def _patient_rank(patient_id: str, draw: int = 0) -> str:
    """A seed-independent, stable pseudo-random order of patients (one order per draw)."""
    key = patient_id if draw == 0 else f"{draw}:{patient_id}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_validation(
    labels: np.ndarray, patient_ids: tuple[str, ...], fraction: float, *, draw: int = 0
) -> np.ndarray:
    """Chooses validation images by patient, stratified by class, independent of any seed.

    Patients are grouped by their most frequent label; within each group they are taken in
    the order of a hash of their id until `fraction` of that group's images is reached (at
    least one patient per group that has two or more).

    Args:
        labels: int label per train image, shape (N,).
        patient_ids: patient id per train image.
        fraction: the fraction of images to hold out, in [0, 1).
        draw: which hash order picks the patients; 0 is the default split, and each other
            draw is another patient-disjoint split of the same images (the search's
            confirmation runs use them to judge a design on patients it was not chosen on).

    Returns:
        bool (N,), True for validation images. No patient has images on both sides.
    """
    n = len(patient_ids)
    is_val = np.zeros(n, dtype=bool)
    if fraction <= 0 or n == 0:
        return is_val
    images_of: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        images_of.setdefault(pid, []).append(i)
    by_class: dict[int, list[str]] = {}
    for pid, idx in images_of.items():
        majority = int(np.bincount(labels[idx]).argmax())
        by_class.setdefault(majority, []).append(pid)
    for _, pids in sorted(by_class.items()):
        if len(pids) < 2:
            continue
        total = sum(len(images_of[p]) for p in pids)
        target = fraction * total
        taken = 0
        for pid in sorted(pids, key=lambda p: _patient_rank(p, draw))[
            :-1
        ]:  # always leave one patient in train
            if taken >= target:
                break
            is_val[images_of[pid]] = True
            taken += len(images_of[pid])
    return is_val


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, pool: int, epoch: int, n: int) -> np.ndarray:
    # Cached: consecutive batches of an epoch share it (at COVIDx size, drawing it again
    # for every batch cost more than gathering the images). Read-only for callers.
    permutation = np.random.default_rng([seed, pool, epoch]).permutation(n)
    permutation.flags.writeable = False
    return permutation


def _stream(seed: int, pool: int, members: np.ndarray, start: int, count: int) -> np.ndarray:
    """Items start..start+count of the infinite stream of per-epoch shuffles of `members`."""
    n = len(members)
    epoch, offset = divmod(start, n)
    if offset + count <= n:  # inside one epoch: a slice (most batches)
        perm = _epoch_permutation(seed, pool, epoch, n)
        return members[perm[offset : offset + count]]
    positions = np.arange(start, start + count)
    out = np.empty(count, dtype=members.dtype)
    for epoch in np.unique(positions // n):
        sel = positions // n == epoch
        perm = _epoch_permutation(seed, pool, int(epoch), n)
        out[sel] = members[perm[positions[sel] % n]]
    return out


@dataclasses.dataclass(frozen=True)
class TrainBatchMaker:
    """Builds train batch `step` from the cached arrays: a pure function of (seed, step).

    Picklable for Grain worker processes: large memory-mapped arrays travel as their cache
    path and are re-opened in the worker.

    Attributes:
        images: uint8 NxHxW train images.
        labels: int32 (N,) labels.
        batch_size: images per batch.
        seed: the shuffle and augmentation seed.
        channels: output channels (grey repeated).
        augment: apply the augmentations.
        target_class: the re-balancing class index, or -1.
        target_count: slots per batch drawn from the target class.
    """

    images: np.ndarray
    labels: np.ndarray
    batch_size: int
    seed: int
    channels: int
    augment: bool
    target_class: int
    target_count: int

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap):
            state["images"] = ("memmap", str(self.images.filename))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["images"], tuple):
            state["images"] = np.load(state["images"][1], mmap_mode="r")
        self.__dict__.update(state)

    @functools.cached_property
    def _members(self) -> tuple[np.ndarray, np.ndarray]:
        # (target, rest) indices, or (all, empty) without re-balancing; once per maker.
        if self.target_class < 0:
            return np.arange(len(self.labels)), np.empty(0, np.int64)
        is_target = self.labels == self.target_class
        return np.flatnonzero(is_target), np.flatnonzero(~is_target)

    def indices(self, step: int) -> np.ndarray:
        """int64 (B,) train-image indices of batch `step` (shuffled, re-balanced)."""
        step = int(step)
        if self.target_class < 0:
            members, _ = self._members
            return _stream(self.seed, 0, members, step * self.batch_size, self.batch_size)
        target, rest = self._members
        n_rest = self.batch_size - self.target_count
        index = np.empty(self.batch_size, dtype=np.int64)
        slots = np.random.default_rng([self.seed, 3, step]).permutation(self.batch_size)
        index[slots[: self.target_count]] = _stream(
            self.seed, 1, target, step * self.target_count, self.target_count
        )
        index[slots[self.target_count :]] = _stream(self.seed, 2, rest, step * n_rest, n_rest)
        return index

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """The device path's host work for batch `step`: indexing, a gather, a parameter draw.

        Returns:
            {"image": uint8 BxHxWx1, "label": int32 B} and, with augmentation,
            {`AUGMENT_KEY`: float32 Bx7} (`device_augment.pack_params`): the transforms
            the host path applies to the same batch.
        """
        index = self.indices(step)
        batch = {
            "image": np.asarray(self.images[index])[..., None],
            "label": self.labels[index].astype(np.int32),
        }
        if self.augment:
            batch[AUGMENT_KEY] = pack_params(self._augment_params(step))
        return batch

    def _augment_params(self, step: int) -> AugmentParams:
        rng = np.random.default_rng([self.seed, 4, int(step)])
        return sample_augment_params(rng, self.batch_size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """The batch at `step` built on the host.

        Returns:
            {"image": float32 BxHxWxC in [0, 1], "label": int32 B}.
        """
        index = self.indices(step)
        grey_BxHxWx1 = np.asarray(self.images[index])[..., None]
        if self.augment:
            image = apply_augment(grey_BxHxWx1, self._augment_params(step))
        else:
            image = grey_BxHxWx1.astype(np.float32) * np.float32(1.0 / 255.0)
        if self.channels > 1:
            image = np.repeat(image, self.channels, axis=3)
        return {"image": image, "label": self.labels[index].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class DeviceBatchMaker:
    """Train batch `step` augmented on the devices: a pure function of (seed, step).

    Attributes:
        host: the host side (indices, gather, transform parameters).
        sharding: where batches go (split along the batch axis over the local devices).
    """

    host: TrainBatchMaker
    sharding: jax.sharding.Sharding

    def put(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Sends a `TrainBatchMaker.host_batch` to the devices and augments it there.

        Returns:
            {"image": float32 BxHxWxC in [0, 1], "label": int32 B}, asynchronously computed.
        """
        on_device = jax.device_put(dict(host_batch), self.sharding)
        return model_batch(on_device, channels=self.host.channels)

    def __call__(self, step: int) -> dict[str, jax.Array]:
        """The batch at `step`: {"image": float32 BxHxWxC in [0, 1], "label": int32 B}."""
        return self.put(self.host.host_batch(step))


class _Raised:
    """An exception from the prefetch thread, re-raised where the consumer reaches it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetched_batches(
    make: DeviceBatchMaker, start_step: int, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Device batches from `start_step` on, `depth` of them prepared ahead by one thread.

    The thread gathers on the host and dispatches the transfer and the augmentation, so the
    train step finds its next batch on the devices; it stops when the iterator is closed or
    collected.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        step = start_step
        while not stop.is_set():
            try:
                item: Any = make(step)
            except BaseException as error:  # handed to the consumer, raised there
                item = _Raised(error)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Raised):
                return
            step += 1

    thread = threading.Thread(target=produce, name="covidnet-prefetch", daemon=True)
    thread.start()
    _PREFETCHING[thread] = stop
    try:
        while True:
            item = ready.get()
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10.0)
        _PREFETCHING.pop(thread, None)


_PREFETCHING: dict[threading.Thread, threading.Event] = {}
"""Live prefetch threads and their stop events."""


@atexit.register
def _stop_prefetching() -> None:
    # An iterator still open at exit: stop its thread before the interpreter (and JAX's
    # runtime) shuts down under it.
    for thread, stop in list(_PREFETCHING.items()):
        stop.set()
        thread.join(timeout=10.0)


def _grain_batches(
    make: TrainBatchMaker, start_step: int, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches from `workers` Grain processes, in step order; workers stop with the iterator."""
    import grain
    from absl import flags

    # Grain reads one of its absl flags in the prefetch thread; outside an absl app the flags
    # are never parsed and that read raises, so accept the defaults explicitly.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    steps = grain.MapDataset.range(start_step, start_step + 2**40)
    dataset = steps.map(make).to_iter_dataset()
    iterator = iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
    try:
        yield from iterator
    finally:
        iterator.close()


class Data:
    """Preprocessed COVIDx-format data in memory, with train and eval batch iterators.

    Attributes:
        class_names: class names in label-index order.
        resolution: image side in pixels.
        channels: channels of the batches.
        report: counts, skipped files and warnings from loading.
    """

    def __init__(
        self,
        *,
        config: DataConfig,
        class_names: tuple[str, ...],
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        report: DataReport,
        seed: int,
    ) -> None:
        self.config = config
        self.class_names = class_names
        self.resolution = config.resolution
        self.channels = config.channels
        self.report = report
        self.seed = seed
        self._splits = splits
        self._target = class_names.index(config.rebalance_class) if config.rebalance_class else -1

    def num_examples(self, split: Split) -> int:
        """Number of images in "train", "validation" or "test"."""
        return len(self._split(split)[1])

    def labels(self, split: Split) -> np.ndarray:
        """int32 labels of a split, in the order `eval_batches` yields them."""
        return self._split(split)[1].copy()

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._splits:
            raise ValueError(f"split must be one of {sorted(self._splits)}, got {split!r}")
        return self._splits[split]

    def class_weights(self) -> np.ndarray:
        """Per-class loss weights, float32 (K,), from `config.class_weights`.

        "balanced" gives N / (K * n_k) over the train split (a class with no images gets 1).
        """
        k = len(self.class_names)
        spec = self.config.class_weights
        if spec == "none":
            return np.ones(k, np.float32)
        if spec == "balanced":
            counts = np.bincount(self._splits["train"][1], minlength=k).astype(np.float64)
            weights = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 1.0)
            return weights.astype(np.float32)
        return np.array([spec.get(name, 1.0) for name in self.class_names], np.float32)

    def batch_maker(
        self, batch_size: int, *, seed: int | None = None
    ) -> TrainBatchMaker | DeviceBatchMaker:
        """The pure function step -> train batch used by `train_batches`.

        A `DeviceBatchMaker` with `augment_on: device` (its `.host` is the host side), else
        a `TrainBatchMaker`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images, labels = self._splits["train"]
        target_count = 0
        if self._target >= 0:
            target_count = max(int(batch_size * self.config.rebalance_fraction), 1)
            if target_count >= batch_size:
                raise DataError(
                    f"batch size {batch_size} leaves no room besides the "
                    f"{self.config.rebalance_class!r} slots; use a batch size >= 2"
                )
        host = TrainBatchMaker(
            images=images,
            labels=labels,
            batch_size=batch_size,
            seed=self.seed if seed is None else seed,
            channels=self.channels,
            augment=self.config.augment,
            target_class=self._target,
            target_count=target_count,
        )
        if self.config.augment_on == "host":
            return host
        return DeviceBatchMaker(host=host, sharding=_train_sharding(batch_size))

    def train_batches(
        self, batch_size: int, *, seed: int | None = None, start_step: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Infinite train batches; the batch at step s depends only on (seed, s).

        Args:
            batch_size: images per batch.
            seed: shuffle/augmentation seed (default: the seed given to `load_data`).
            start_step: the first step to yield (a resumed run passes its step).

        Yields:
            {"image": float32 BxHxWxC in [0, 1], "label": int32 B}: NumPy arrays with
            `augment_on: host`; with `augment_on: device`, jax.Arrays split along the batch
            axis over the local devices (the trainer's mesh), two batches prepared ahead.
            Close the iterator (or drop it) to stop the prefetch thread.
        """
        make = self.batch_maker(batch_size, seed=seed)
        if isinstance(make, DeviceBatchMaker):
            return _prefetched_batches(make, start_step)
        if self.config.workers == 0:
            return map(make, itertools.count(start_step))
        return _grain_batches(make, start_step, self.config.workers)

    def eval_batches(self, split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-shape batches over "validation" or "test" ("train" also works), in order.

        The last batch is padded with zero images; `mask` marks the real examples.

        Yields:
            {"image": float32 BxHxWxC, "label": int32 B, "mask": bool B}.
        """
        if split == "validation" and self.num_examples("validation") == 0:
            raise DataError(
                "the validation split is empty; set data.validation_fraction > 0 (e.g. 0.1)"
            )
        images, labels = self._split(split)
        n = len(labels)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            real = stop - start
            image = np.zeros(
                (batch_size, self.resolution, self.resolution, self.channels), np.float32
            )
            grey = np.asarray(images[start:stop], dtype=np.float32) * np.float32(1.0 / 255.0)
            image[:real] = grey[..., None]
            label = np.zeros(batch_size, np.int32)
            label[:real] = labels[start:stop]
            mask = np.zeros(batch_size, bool)
            mask[:real] = True
            yield {"image": image, "label": label, "mask": mask}


def _train_sharding(batch_size: int) -> jax.sharding.Sharding:
    """The trainer's batch sharding (all local devices), or one device if B does not split."""
    mesh = parallel.make_mesh()
    if batch_size % mesh.devices.size == 0:
        return parallel.batch_sharding(mesh)
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _ensure_synthetic(config: DataConfig) -> None:
    assert config.covidx_dir is not None and config.synth is not None
    folder = Path(config.covidx_dir)
    wanted = {
        "per_class": config.synth.per_class,
        "image_size": config.synth.image_size,
        "seed": config.synth.seed,
    }
    if folder.exists() and any(folder.iterdir()):
        found = read_synth_settings(folder)
        if found is not None and any(found.get(k) != v for k, v in wanted.items()):
            raise DataError(
                f"{folder}: holds a synthetic data set written with {found}, but data.synth "
                f"asks for {wanted}; delete the folder or match data.synth"
            )
        if found is None or found.get("version") == SYNTH_VERSION:
            return
        # Our own output from an older generator: rewrite it, or results would silently
        # depend on which version happened to write the folder first.
        log.warning(
            "%s: synthetic data of generator version %s; rewriting it with version %d",
            folder,
            found.get("version"),
            SYNTH_VERSION,
        )
    log.info("writing the synthetic data set to %s", folder)
    write_synthetic_dataset(folder, overwrite=True, **wanted)


def load_data(config: DataConfig, *, seed: int) -> Data:
    """Loads (preprocessing once, then from the cache) and checks a data set.

    Args:
        config: the data section of the experiment.
        seed: the default seed of `Data.train_batches` (the splits never depend on it).

    Returns:
        The data set, with train / validation / test arrays in memory.

    Raises:
        DataError: one line naming the file (and line) at fault and the fix: a folder that is
            not COVIDx-shaped, a bad split file, missing or unreadable images, image paths
            outside the folder, duplicate lines, leakage of files or of patients between
            train and test, labels outside the COVIDx classes without data.classes, an empty
            split, a class without images.
    """
    check_resolution(config.resolution, config.channels)
    dropped: dict[str, int] = {}
    if config.tfds_data_dir is not None:
        entry = _cache_from_tfds(config, config.resolution)
        source = config.tfds_data_dir
        # A folder is checked with file:line before any image is read; a prepared data set
        # is checked here, by example, with the same rules and keys.
        _check_prepared_labels(entry, source, config)
        _check_prepared_patients(entry, source, config)
    else:
        assert config.covidx_dir is not None
        if config.synth is not None:
            _ensure_synthetic(config)
        folder = open_covidx_folder(
            config.covidx_dir,
            classes=config.classes,
            train_split_file=config.train_split_file,
            test_split_file=config.test_split_file,
            allow_shared_patients=config.allow_shared_patients,
            drop_exact_duplicates=config.drop_exact_duplicates,
        )
        entry = _cache_from_covidx(folder, config, config.resolution)
        source = str(folder.root)
        dropped = {
            s.name: len(s.dropped_lines) for s in (folder.train, folder.test) if s.dropped_lines
        }

    train, test = entry.splits["train"], entry.splits["test"]
    if config.classes is not None:
        class_names = tuple(config.classes)
        unknown = sorted((set(train.labels) | set(test.labels)) - set(class_names))
        if unknown:
            raise DataError(
                f"{source}: labels {unknown} are not in data.classes {list(class_names)}; "
                "add them or remove those images"
            )
    else:
        class_names = order_class_names(train.labels + test.labels)
    index = {name: i for i, name in enumerate(class_names)}
    for name, arrays in (("train", train), ("test", test)):
        if len(arrays) == 0:
            raise DataError(
                f"{source}: the {name} split has no readable images; check its split file"
            )
    if config.rebalance_class is not None and config.rebalance_class not in index:
        raise DataError(
            f"data.rebalance_class {config.rebalance_class!r} is not a class of {source} "
            f"({list(class_names)})"
        )
    if isinstance(config.class_weights, Mapping):
        extra = sorted(set(config.class_weights) - set(class_names))
        if extra:
            raise DataError(
                f"data.class_weights names unknown classes {extra}; "
                f"the classes are {list(class_names)}"
            )

    train_labels = np.array([index[x] for x in train.labels], np.int32)
    test_labels = np.array([index[x] for x in test.labels], np.int32)
    is_val = split_validation(
        train_labels, train.patient_ids, config.validation_fraction, draw=config.validation_draw
    )
    fit = np.flatnonzero(~is_val)
    val = np.flatnonzero(is_val)
    if {train.patient_ids[i] for i in fit} & {train.patient_ids[i] for i in val}:
        raise AssertionError("split_validation put a patient on both sides")  # a bug, not data
    if config.rebalance_class is not None and not np.any(
        train_labels[fit] == index[config.rebalance_class]
    ):
        raise DataError(
            f"{source}: no train images of the re-balancing class "
            f"{config.rebalance_class!r}; unset data.rebalance_class or add images"
        )
    # Contiguous copies: batches gather from these arrays thousands of times.
    splits = {
        "train": (_take(train.images, fit), train_labels[fit]),
        "validation": (_take(train.images, val), train_labels[val]),
        "test": (test.images, test_labels),
    }
    pids = {
        "train": {train.patient_ids[i] for i in fit},
        "validation": {train.patient_ids[i] for i in val},
        "test": set(test.patient_ids),
    }
    report = DataReport(
        source=source,
        cache=str(entry.path),
        counts={
            s: {c: int(np.sum(lab == i)) for i, c in enumerate(class_names)}
            for s, (_, lab) in splits.items()
        },
        patients={s: len(p) for s, p in pids.items()},
        skipped=dict(entry.skipped),
        shared_patients=tuple(sorted((pids["train"] | pids["validation"]) & pids["test"])),
        dropped_duplicates=dropped,
    )
    if report.skipped:
        log.warning(
            "skipped %d unreadable image(s): %s",
            len(report.skipped),
            ", ".join(sorted(report.skipped)),
        )
    if report.shared_patients:
        log.warning(
            "%s: %d patient(s) in both train and test, allowed by data.allow_shared_patients: %s",
            source,
            len(report.shared_patients),
            ", ".join(report.shared_patients[:5]),
        )
    return Data(config=config, class_names=class_names, splits=splits, report=report, seed=seed)


def _check_prepared_labels(entry: cache_lib.CacheEntry, source: str, config: DataConfig) -> None:
    """Without data.classes, every label of a prepared data set must be a COVIDx label."""
    if config.classes is not None:
        return  # load_data checks the labels against data.classes
    count: dict[str, int] = {}
    first: dict[str, str] = {}
    for name in ("train", "test"):
        arrays = entry.splits[name]
        for i, (label, filename) in enumerate(zip(arrays.labels, arrays.filenames, strict=True)):
            if label not in KNOWN_LABELS:
                count[label] = count.get(label, 0) + 1
                first.setdefault(label, f"{name} example {i} ({filename})")
    if count:
        unknown = [(label, count[label], first[label]) for label in sorted(count)]
        raise DataError(unknown_labels_message(source, unknown))


def _check_prepared_patients(entry: cache_lib.CacheEntry, source: str, config: DataConfig) -> None:
    """Patients in both train and test of a prepared data set: an error unless allowed."""
    if config.allow_shared_patients:
        return
    train, test = entry.splits["train"], entry.splits["test"]
    first_test: dict[str, str] = {}
    for pid, filename in zip(test.patient_ids, test.filenames, strict=True):
        first_test.setdefault(pid, filename)
    first_train: dict[str, str] = {}
    for pid, filename in zip(train.patient_ids, train.filenames, strict=True):
        if pid in first_test:
            first_train.setdefault(pid, filename)
    if first_train:
        shared = [
            (pid, f"train {first_train[pid]}", f"test {first_test[pid]}")
            for pid in sorted(first_train)
        ]
        raise DataError(shared_patients_message(source, shared))


def _take(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    if (
        isinstance(images, np.memmap)
        and len(index) == len(images)
        and np.all(index == np.arange(len(images)))
    ):
        return images
    if isinstance(images, np.memmap):
        # Keep large data sets on disk: a sorted fancy index of a memmap copies into memory,
        # so write the selection to a sibling file once and map that instead.
        path = Path(images.filename).with_suffix(
            f".sel-{hashlib.sha256(index.tobytes()).hexdigest()[:12]}.npy"
        )
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(index), *images.shape[1:])
            )
            for start in range(0, len(index), 1024):
                out[start : start + 1024] = images[index[start : start + 1024]]
            out.flush()
            del out
            os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    return np.ascontiguousarray(images[index])
