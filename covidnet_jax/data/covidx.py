"""COVIDx split files and folder checks.

A COVIDx folder holds flat image folders `train/` and `test/` and one split file per split;
each line of a split file is `<patient_id> <filename> <label> [<source>]`, whitespace
separated. Older releases have 3 fields; one release has patient ids that contain a space
(`COVID 1 COVID(1).png COVID-19 sirm`), so lines are parsed from the right: the label is the
last token unless the last token is a known source, the filename is the token before the
label, and everything before the filename is the patient id.

Nothing here assumes three classes: class names come from the data or from the config. Without
configured classes, every label must be one of `KNOWN_LABELS` (the labels of the public
releases), so a typo such as `COVID19` is an error instead of a new class.

`open_covidx_folder` refuses, each in one line naming the split file and line: malformed
lines, images listed twice (exact duplicate lines can be dropped instead), image paths that
resolve outside the split's image folder (`..`, absolute paths, symlinks out), missing images,
the same image in train and test, unknown labels and patients with images in both splits
(patient-level leakage; `allow_shared_patients` loads anyway and reports them).

Example:
    >>> entries = parse_split_file("covidx/train.txt", classes=("normal", "COVID-19"))
    >>> entries[0].patient_id, entries[0].filename, entries[0].label
"""

from __future__ import annotations

import dataclasses
import os
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
# Labels accepted without `data.classes`: those of the public COVIDx releases.
KNOWN_LABELS: frozenset[str] = frozenset(_CONVENTIONAL_ORDER)
_SHOWN = 5  # items listed in a message before "and N more"
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
        dropped_lines: line numbers dropped as exact duplicates of an earlier line.
    """

    name: str
    split_file: Path
    image_dir: Path
    entries: tuple[SplitEntry, ...]
    dropped_lines: tuple[int, ...] = ()

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
        shared_patients: patient ids with images in both splits (only non-empty when
            `open_covidx_folder` was called with `allow_shared_patients=True`).
    """

    root: Path
    class_names: tuple[str, ...]
    train: CovidxSplit
    test: CovidxSplit
    shared_patients: tuple[str, ...] = ()


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


def find_shared_patients(
    train: Sequence[SplitEntry], test: Sequence[SplitEntry]
) -> list[tuple[str, SplitEntry, SplitEntry]]:
    """Patients with images in both splits (patient-level leakage).

    Args:
        train: the train entries.
        test: the test entries.

    Returns:
        (patient id, its first train entry, its first test entry), sorted by patient id.
    """
    first_test: dict[str, SplitEntry] = {}
    for e in test:
        first_test.setdefault(e.patient_id, e)
    first_train: dict[str, SplitEntry] = {}
    for e in train:
        if e.patient_id in first_test:
            first_train.setdefault(e.patient_id, e)
    return [(pid, first_train[pid], first_test[pid]) for pid in sorted(first_train)]


def shared_patients_message(where: str, shared: Sequence[tuple[str, str, str]]) -> str:
    """The one-line error for patients in both train and test.

    Args:
        where: the folder or data set, the message's prefix.
        shared: (patient id, where in train, where in test) per shared patient.

    Returns:
        The message, naming the count, the first few patients and the opt-out key.
    """
    shown = ", ".join(f"{pid!r} ({a}, {b})" for pid, a, b in shared[:_SHOWN])
    return (
        f"{where}: {len(shared)} patient(s) have images in both train and test "
        f"(patient-level leakage): {shown}{_more(len(shared))}; move each patient's images "
        "to one split, or set data.allow_shared_patients: true to load anyway"
    )


def find_unknown_labels(
    splits: Sequence[CovidxSplit], known: Iterable[str] = KNOWN_LABELS
) -> list[tuple[str, int, str]]:
    """Labels outside `known`: (label, number of lines, "file:line" of the first), by label."""
    allowed = set(known)
    count: Counter[str] = Counter()
    first: dict[str, str] = {}
    for split in splits:
        for e in split.entries:
            if e.label not in allowed:
                count[e.label] += 1
                first.setdefault(e.label, f"{split.split_file}:{e.line}")
    return [(label, count[label], first[label]) for label in sorted(count)]


def unknown_labels_message(where: str, unknown: Sequence[tuple[str, int, str]]) -> str:
    """The one-line error for labels outside `KNOWN_LABELS` when no classes are configured.

    Args:
        where: the folder or data set, the message's prefix.
        unknown: (label, count, where the first one is) per unknown label.

    Returns:
        The message, listing every unknown label with its count and first place.
    """
    shown = ", ".join(f"{label!r} ({n} line(s), first {at})" for label, n, at in unknown)
    known = ", ".join(_CONVENTIONAL_ORDER)
    return (
        f"{where}: label(s) outside the COVIDx classes ({known}): {shown}; fix the lines, "
        "or name every class in data.classes (covidnet data prepare: --classes)"
    )


def find_missing_images(split: CovidxSplit) -> list[Path]:
    """Paths of entries whose image file does not exist, in file order."""
    return [p for p in split.image_paths() if not p.is_file()]


def find_escaping_paths(split: CovidxSplit) -> list[tuple[SplitEntry, Path]]:
    """Entries whose image path resolves outside the split's image folder.

    A path escapes with `..`, as an absolute path, or through a symlink (of the file or of a
    folder on the way) that points outside. The image folder itself may be a symlink.

    Args:
        split: the split; its image folder must exist.

    Returns:
        (entry, resolved path) of each escaping entry, in file order.
    """
    base = os.path.realpath(split.image_dir)
    escaping = []
    for e in split.entries:
        candidate = os.path.join(base, e.filename)
        # Fast path (every public release): a plain name that is not a symlink stays inside.
        if "/" not in e.filename and os.sep not in e.filename and not os.path.islink(candidate):
            continue
        resolved = os.path.realpath(candidate)
        if os.path.commonpath([base, resolved]) != base or resolved == base:
            escaping.append((e, Path(resolved)))
    return escaping


def _more(n: int) -> str:
    return f" and {n - _SHOWN} more" if n > _SHOWN else ""


def _differences(entry: SplitEntry, earlier: SplitEntry) -> str:
    fields = (("patient", "patient_id"), ("label", "label"), ("source", "source"))
    parts = [
        f"{shown} {getattr(entry, f)!r} (there {getattr(earlier, f)!r})"
        for shown, f in fields
        if getattr(entry, f) != getattr(earlier, f)
    ]
    return ", ".join(parts)


def _same_line(a: SplitEntry, b: SplitEntry) -> bool:
    return (a.patient_id, a.filename, a.label, a.source) == (
        b.patient_id,
        b.filename,
        b.label,
        b.source,
    )


def dedupe_entries(
    split_file: Path, entries: Sequence[SplitEntry], *, drop_exact: bool = False
) -> tuple[tuple[SplitEntry, ...], tuple[int, ...]]:
    """Checks that each image is listed once; optionally drops exact duplicate lines.

    An exact duplicate repeats an earlier line's patient id, filename, label and source
    (whitespace and line endings aside). A line that lists an earlier image with another
    patient, label or source is always an error: which one is right is not ours to guess.

    Args:
        split_file: the split file, for messages.
        entries: its entries in file order.
        drop_exact: keep the first of each group of exact duplicates instead of failing.

    Returns:
        The kept entries and the line numbers dropped.

    Raises:
        DataError: "<file>:<line>: ..." for the first conflicting duplicate (with the count
            and the next lines), or for the first exact duplicate unless `drop_exact`.
    """
    first: dict[str, SplitEntry] = {}
    kept: list[SplitEntry] = []
    exact: list[tuple[SplitEntry, SplitEntry]] = []
    conflicts: list[tuple[SplitEntry, SplitEntry]] = []
    for e in entries:
        earlier = first.get(e.filename)
        if earlier is None:
            first[e.filename] = e
            kept.append(e)
        elif _same_line(e, earlier):
            exact.append((e, earlier))
        else:
            conflicts.append((e, earlier))
    if conflicts:
        e, earlier = conflicts[0]
        others = ""
        if len(conflicts) > 1:
            lines = ", ".join(str(c.line) for c, _ in conflicts[1 : 1 + _SHOWN])
            others = f"; {len(conflicts) - 1} more such line(s): {lines}{_more(len(conflicts) - 1)}"
        raise DataError(
            f"{split_file}:{e.line}: {e.filename!r} is already listed on line {earlier.line} "
            f"with {_differences(e, earlier)}{others}; keep one line per image"
        )
    if exact and not drop_exact:
        e, earlier = exact[0]
        lines = ", ".join(f"{d.line} (= {o.line})" for d, o in exact[:_SHOWN])
        raise DataError(
            f"{split_file}:{e.line}: exact duplicate of line {earlier.line}; {len(exact)} exact "
            f"duplicate line(s) in all, lines {lines}{_more(len(exact))}; remove them, or set "
            "data.drop_exact_duplicates: true (covidnet data prepare: --drop-exact-duplicates) "
            "to keep the first of each"
        )
    return tuple(kept), tuple(d.line for d, _ in exact)


def _short(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it (for compact messages), else as given."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


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
    allow_shared_patients: bool = False,
    drop_exact_duplicates: bool = False,
) -> CovidxFolder:
    """Parses and checks a COVIDx folder before any image is read.

    Args:
        root: the folder holding `train/`, `test/` and the split files.
        classes: the configured class names (label-index order), or None to take them from
            the data (then every label must be one of `KNOWN_LABELS`).
        train_split_file: the train split file (relative to `root`), or None for `train.txt`
            (or the single `train*.txt`).
        test_split_file: likewise for the test split.
        allow_shared_patients: load a folder whose train and test share patients (they are
            returned in `CovidxFolder.shared_patients`) instead of failing.
        drop_exact_duplicates: drop lines that repeat an earlier line exactly (their line
            numbers are in `CovidxSplit.dropped_lines`) instead of failing.

    Returns:
        The parsed folder.

    Raises:
        DataError: one line, for a folder that is not COVIDx-shaped, a bad split file, images
            listed twice, image paths outside the image folder, missing images (all paths
            listed), the same file in train and test, labels outside `KNOWN_LABELS` without
            `classes`, or patients in both train and test.
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
        entries, dropped = dedupe_entries(
            split_file,
            parse_split_file(split_file, classes=classes),
            drop_exact=drop_exact_duplicates,
        )
        split = CovidxSplit(name, split_file, image_dir, entries, dropped)
        escaping = find_escaping_paths(split)
        if escaping:
            e, resolved = escaping[0]
            raise DataError(
                f"{split_file}:{e.line}: image path {e.filename!r} resolves to {resolved}, "
                f"outside {image_dir}/ ({len(escaping)} such line(s)); list files inside the "
                "split's image folder (no '..', absolute paths or symlinks pointing out)"
            )
        splits[name] = split

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
        unknown = find_unknown_labels(list(splits.values()))
        if unknown:
            raise DataError(unknown_labels_message(str(root), unknown))
        class_names = order_class_names(e.label for s in splits.values() for e in s.entries)
    else:
        class_names = tuple(classes)
    if len(class_names) < 2:
        raise DataError(
            f"{root}: found only the class {list(class_names)}; a classifier needs at least two"
        )
    shared = find_shared_patients(splits["train"].entries, splits["test"].entries)
    if shared and not allow_shared_patients:
        train_file = _short(splits["train"].split_file, root)
        test_file = _short(splits["test"].split_file, root)
        located = [(pid, f"{train_file}:{a.line}", f"{test_file}:{b.line}") for pid, a, b in shared]
        raise DataError(shared_patients_message(str(root), located))
    return CovidxFolder(
        root,
        class_names,
        splits["train"],
        splits["test"],
        shared_patients=tuple(pid for pid, _, _ in shared),
    )
