"""On-disk cache of preprocessed images, so every image is decoded and resized once.

A cache entry is a folder named by a key that covers everything the arrays depend on (the
split files' bytes, every image file's size and modification time, the resolution and the
preprocessing version). It holds `<split>_images.npy` (uint8 NxHxW, grey) and `meta.json`
(labels, patient ids, file names, skipped files). Entries are written to a temporary folder
and renamed into place, so a crash or a concurrent writer never leaves a half-written entry.

Loaded arrays are also kept in a small in-process table, so a search that calls `load_data`
for many trials reads them from disk once.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

# Arrays larger than this are memory-mapped rather than read into memory.
_MMAP_BYTES = 1 << 30
_MEMORY_ENTRIES = 4


@dataclasses.dataclass(frozen=True)
class SplitArrays:
    """The preprocessed images of one split, with their metadata.

    Attributes:
        images: uint8 NxHxW grey images (channels are added when batches are made).
        labels: the label string of each image.
        patient_ids: the patient id of each image.
        filenames: the file name of each image.
    """

    images: np.ndarray
    labels: tuple[str, ...]
    patient_ids: tuple[str, ...]
    filenames: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A loaded cache entry.

    Attributes:
        path: the entry's folder.
        splits: "train" and "test" arrays.
        skipped: {path: reason} of images left out because they could not be read.
    """

    path: Path
    splits: dict[str, SplitArrays]
    skipped: dict[str, str]


_memory: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()
_memory_lock = threading.Lock()


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hex key of a JSON-serialisable description."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_fingerprint(paths: list[Path]) -> str:
    """A hash of the names, sizes and modification times of `paths` (missing files count)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = path.stat()
            digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.name}\0missing\n".encode())
    return digest.hexdigest()


def load_entry(path: Path) -> CacheEntry | None:
    """Loads a cache entry, from memory if it was loaded before; None if absent or damaged."""
    key = str(path)
    with _memory_lock:
        if key in _memory:
            _memory.move_to_end(key)
            return _memory[key]
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        splits = {}
        for name, info in meta["splits"].items():
            file = path / f"{name}_images.npy"
            mmap = "r" if file.stat().st_size > _MMAP_BYTES else None
            images = np.load(file, mmap_mode=mmap, allow_pickle=False)
            if images.shape[0] != len(info["labels"]):
                return None
            splits[name] = SplitArrays(
                images,
                tuple(info["labels"]),
                tuple(info["patient_ids"]),
                tuple(info["filenames"]),
            )
        entry = CacheEntry(path, splits, dict(meta.get("skipped", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _remember(key, entry)
    return entry


def _remember(key: str, entry: CacheEntry) -> None:
    with _memory_lock:
        _memory[key] = entry
        _memory.move_to_end(key)
        while len(_memory) > _MEMORY_ENTRIES:
            _memory.popitem(last=False)


def write_entry(path: Path, splits: dict[str, SplitArrays], skipped: dict[str, str]) -> CacheEntry:
    """Writes a cache entry atomically (temporary folder, then rename) and returns it.

    If another process wrote the same entry first, its copy is kept and loaded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        meta: dict[str, Any] = {"splits": {}, "skipped": skipped}
        for name, arrays in splits.items():
            np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(arrays.images))
            meta["splits"][name] = {
                "labels": list(arrays.labels),
                "patient_ids": list(arrays.patient_ids),
                "filenames": list(arrays.filenames),
            }
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = load_entry(path)
    if entry is None:
        raise OSError(f"{path}: cache entry unreadable right after writing it")
    return entry


def default_cache_root(source_dir: Path) -> Path:
    """`<source>/.covidnet_cache` if the source folder is writable, else the user cache."""
    if os.access(source_dir, os.W_OK):
        return source_dir / ".covidnet_cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "covidnet_jax"
