"""COVIDx split files and folder checks.

A COVIDx folder holds flat image folders `train/` and `test/` and one split file per split;
each line of a split file is `<patient_id> <filename> <label> [<source>]`, whitespace
separated. Older releases have 3 fields; one release has patient ids that contain a space
(`COVID 1 COVID(1).png COVID-19 sirm`), so lines are parsed from the right: the label is the
last token unless the last token is a known source, the filename is the token before the
label, and everything before the filename is the patient id.

Nothing here assumes three classes: class names come from the data or from the config.

Example:
    >>> entries = parse_split_file("covidx/train.txt", classes=("normal", "COVID-19"))
    >>> entries[0].patient_id, entries[0].filename, entries[0].label
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from covidnet_jax.errors import DataError

# Conventional order of the labels of public COVIDx releases (3-class, binary, severity).
# Only used to order class names that come from the data; unknown labels sort after these.
_CONVENTIONAL_ORDER: tuple[str, ...] = (
    "normal",
    "pneumonia",
    "COVID-19",
    "negative",
    "positive",
    "level1",
    "level2",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".dcm")


@dataclasses.dataclass(frozen=True)
class SplitEntry:
    """One line of a COVIDx split file.

    Attributes:
        patient_id: the patient identifier (may contain spaces).
        filename: the image file name, relative to the split's image folder.
        label: the class name as written in the file.
        source: the data source tag of 4-field lines, or "" for 3-field lines.
        line: the 1-based line number in the split file (for messages).
    """

    patient_id: str
    filename: str
    label: str
    source: str
    line: int


@dataclasses.dataclass(frozen=True)
class CovidxSplit:
    """A parsed split: its entries and where its images live.

    Attributes:
        name: "train" or "test".
        split_file: the split file path.
        image_dir: the folder holding the images.
        entries: the parsed lines, in file order.
    """

    name: str
    split_file: Path
    image_dir: Path
    entries: tuple[SplitEntry, ...]

    def image_paths(self) -> list[Path]:
        """The image path of every entry, in file order."""
        return [self.image_dir / e.filename for e in self.entries]

    def class_counts(self) -> dict[str, int]:
        """Number of images per label."""
        return dict(Counter(e.label for e in self.entries))


@dataclasses.dataclass(frozen=True)
class CovidxFolder:
    """A checked COVIDx folder.

    Attributes:
        root: the folder.
        class_names: class names in label-index order.
        train: the train split.
        test: the test split.
    """

    root: Path
    class_names: tuple[str, ...]
    train: CovidxSplit
    test: CovidxSplit


def _looks_like_image(token: str) -> bool:
    return token.lower().endswith(_IMAGE_SUFFIXES)


def parse_split_line(
    text: str, *, path: str | Path = "<split file>", line: int = 0
) -> SplitEntry | None:
    """Parses one split-file line from the right.

    Args:
        text: the line, with or without its line ending.
        path: the split file, for messages.
        line: the 1-based line number, for messages.

    Returns:
        The entry, or None for a blank line.

    Raises:
        DataError: "<file>:<line>: ...", quoting the line, if it has fewer than 3 fields or
            no image filename where one is expected.
    """
    tokens = text.split()
    if not tokens:
        return None
    where = f"{path}:{line}"
    if len(tokens) < 3:
        raise DataError(
            f"{where}: expected '<patient_id> <filename> <label> [<source>]', got {text.strip()!r}"
        )
    # 4-field form: ... <filename> <label> <source>; 3-field form: ... <filename> <label>.
    # The filename decides which one this is, so patient ids with spaces stay intact.
    if len(tokens) >= 4 and _looks_like_image(tokens[-3]):
        patient_tokens, filename, label, source = tokens[:-3], tokens[-3], tokens[-2], tokens[-1]
    elif _looks_like_image(tokens[-2]):
        patient_tokens, filename, label, source = tokens[:-2], tokens[-2], tokens[-1], ""
    else:
        raise DataError(
            f"{where}: no image filename (.png, .jpg, ...) before the label in {text.strip()!r}"
        )
    if not patient_tokens:
        raise DataError(f"{where}: missing patient id in {text.strip()!r}")
    return SplitEntry(" ".join(patient_tokens), filename, label, source, line)


def parse_split_file(
    path: str | Path, *, classes: Sequence[str] | None = None
) -> tuple[SplitEntry, ...]:
    """Parses a COVIDx split file.

    Handles 3- and 4-field lines, patient ids with spaces, CRLF endings, trailing blanks and
    blank lines.

    Args:
        path: the split file.
        classes: if given, every label must be one of these.

    Returns:
        The entries in file order.

    Raises:
        DataError: naming the file, the line number and the line, for a malformed line or a
            label outside `classes`; or naming the file if it cannot be read or is empty.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read split file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: split file is not UTF-8 text ({err.reason})") from None
    allowed = set(classes) if classes is not None else None
    entries = []
    # splitlines handles \n, \r\n and \r; the line numbers match what an editor shows.
    for number, line_text in enumerate(text.splitlines(), start=1):
        entry = parse_split_line(line_text, path=path, line=number)
        if entry is None:
            continue
        if allowed is not None and entry.label not in allowed:
            raise DataError(
                f"{path}:{number}: label {entry.label!r} is not one of the configured classes "
                f"{list(classes)} in {line_text.strip()!r}; add it to data.classes or fix the line"
            )
        entries.append(entry)
    if not entries:
        raise DataError(
            f"{path}: split file has no entries; expected lines "
            "'<patient_id> <filename> <label> [<source>]'"
        )
    return tuple(entries)


def order_class_names(labels: Iterable[str]) -> tuple[str, ...]:
    """Orders class names found in data: known COVIDx labels first, then alphabetical."""
    unique = set(labels)

    def key(name: str) -> tuple[int, str]:
        if name in _CONVENTIONAL_ORDER:
            return (_CONVENTIONAL_ORDER.index(name), "")
        return (len(_CONVENTIONAL_ORDER), name)

    return tuple(sorted(unique, key=key))


def find_leakage(train: Sequence[SplitEntry], test: Sequence[SplitEntry]) -> list[str]:
    """Filenames listed in both splits (the same image in train and test)."""
    test_names = {e.filename for e in test}
    return sorted({e.filename for e in train if e.filename in test_names})


def find_missing_images(split: CovidxSplit) -> list[Path]:
    """Paths of entries whose image file does not exist, in file order."""
    return [p for p in split.image_paths() if not p.is_file()]


def _resolve_split_file(root: Path, name: str, given: str | None) -> Path:
    if given is not None:
        path = Path(given)
        return path if path.is_absolute() else root / path
    default = root / f"{name}.txt"
    if default.is_file():
        return default
    # Public releases name their split files e.g. train_COVIDx9A.txt.
    candidates = sorted(root.glob(f"{name}*.txt"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise DataError(
            f"{root}: several {name} split files ({names}); choose one with data.{name}_split_file"
        )
    return default


def open_covidx_folder(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    train_split_file: str | None = None,
    test_split_file: str | None = None,
) -> CovidxFolder:
    """Parses and checks a COVIDx folder before any image is read.

    Args:
        root: the folder holding `train/`, `test/` and the split files.
        classes: the configured class names (label-index order), or None to take them from
            the data.
        train_split_file: the train split file (relative to `root`), or None for `train.txt`
            (or the single `train*.txt`).
        test_split_file: likewise for the test split.

    Returns:
        The parsed folder.

    Raises:
        DataError: one line, for a folder that is not COVIDx-shaped, a bad split file, images
            listed twice, missing images (all paths listed), or train/test leakage.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: COVIDx folder not found; pass a folder holding train/, test/, train.txt "
            "and test.txt (or write one with `covidnet data synth --out DIR`)"
        )
    splits = {}
    for name, given in (("train", train_split_file), ("test", test_split_file)):
        split_file = _resolve_split_file(root, name, given)
        image_dir = root / name
        if not split_file.is_file() or not image_dir.is_dir():
            found = sorted(p.name for p in root.iterdir())
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "") or "nothing"
            raise DataError(
                f"{root}: not a COVIDx folder: expected {name}/ and {split_file.name} "
                f"(found {shown}); point data.covidx_dir (--covidx-dir) at the folder "
                "holding them"
            )
        entries = parse_split_file(split_file, classes=classes)
        seen: dict[str, int] = {}
        for e in entries:
            if e.filename in seen:
                raise DataError(
                    f"{split_file}:{e.line}: {e.filename!r} is already listed on line "
                    f"{seen[e.filename]}; remove the duplicate"
                )
            seen[e.filename] = e.line
        splits[name] = CovidxSplit(name, split_file, image_dir, entries)

    missing = find_missing_images(splits["train"]) + find_missing_images(splits["test"])
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"{root}: {len(missing)} image(s) listed in the split files are missing: {shown}{more}"
        )
    leaked = find_leakage(splits["train"].entries, splits["test"].entries)
    if leaked:
        shown = ", ".join(leaked[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise DataError(
            f"{root}: {len(leaked)} file(s) appear in both train and test (leakage): "
            f"{shown}{more}; remove them from one split"
        )
    if classes is None:
        class_names = order_class_names(e.label for s in splits.values() for e in s.entries)
    else:
        class_names = tuple(classes)
    if len(class_names) < 2:
        raise DataError(
            f"{root}: found only the class {list(class_names)}; a classifier needs at least two"
        )
    return CovidxFolder(root, class_names, splits["train"], splits["test"])
