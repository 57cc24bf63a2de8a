"""COVIDx split-file parsing and folder checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidnet_jax.data import open_covidx_folder, parse_split_file, parse_split_line
from covidnet_jax.data.covidx import find_leakage, order_class_names
from covidnet_jax.errors import DataError


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_four_field_line():
    entry = parse_split_line("3 SUB-001.png pneumonia cohen")
    assert (entry.patient_id, entry.filename, entry.label, entry.source) == (
        "3",
        "SUB-001.png",
        "pneumonia",
        "cohen",
    )


def test_three_field_line_has_no_source():
    entry = parse_split_line("8d7e COVID-19(12).jpg COVID-19")
    assert (entry.patient_id, entry.filename, entry.label, entry.source) == (
        "8d7e",
        "COVID-19(12).jpg",
        "COVID-19",
        "",
    )


def test_patient_id_with_spaces_is_parsed_from_the_right():
    entry = parse_split_line("COVID 1 COVID(1).png COVID-19 sirm")
    assert entry.patient_id == "COVID 1"
    assert entry.filename == "COVID(1).png"
    assert entry.label == "COVID-19"
    assert entry.source == "sirm"
    three = parse_split_line("COVID 1 COVID(1).png COVID-19")
    assert (three.patient_id, three.filename, three.label) == (
        "COVID 1",
        "COVID(1).png",
        "COVID-19",
    )


def test_crlf_trailing_blanks_and_blank_lines(tmp_path):
    path = _write(
        tmp_path / "train.txt",
        b"p1 a.png normal src  \r\n\r\np 2 b.png COVID-19\t \r\n   \r\np3 c.jpeg pneumonia x\r\n",
    )
    entries = parse_split_file(path)
    assert [e.filename for e in entries] == ["a.png", "b.png", "c.jpeg"]
    assert [e.patient_id for e in entries] == ["p1", "p 2", "p3"]
    assert [e.label for e in entries] == ["normal", "COVID-19", "pneumonia"]
    assert [e.line for e in entries] == [1, 3, 5]  # line numbers count blank lines


def test_malformed_line_error_names_file_line_and_text(tmp_path):
    path = _write(tmp_path / "test.txt", "p1 a.png normal\np2 onlytwo\n")
    with pytest.raises(DataError) as err:
        parse_split_file(path)
    message = str(err.value)
    assert f"{path}:2:" in message
    assert "p2 onlytwo" in message
    assert "\n" not in message


def test_line_without_image_filename_is_an_error(tmp_path):
    path = _write(tmp_path / "test.txt", "p1 a.png normal\np2 notes normal extra\n")
    with pytest.raises(DataError, match=r"test\.txt:2: no image filename"):
        parse_split_file(path)


def test_label_outside_configured_classes(tmp_path):
    path = _write(tmp_path / "train.txt", "p1 a.png negative\np2 b.png pneumonia x\n")
    with pytest.raises(DataError) as err:
        parse_split_file(path, classes=("negative", "positive"))
    assert f"{path}:2:" in str(err.value)
    assert "'pneumonia'" in str(err.value)


def test_empty_split_file(tmp_path):
    path = _write(tmp_path / "train.txt", "\n  \n")
    with pytest.raises(DataError, match="no entries"):
        parse_split_file(path)


def test_class_order_comes_from_data_and_is_not_three():
    assert order_class_names(["positive", "negative", "positive"]) == ("negative", "positive")
    assert order_class_names(["COVID-19", "normal", "pneumonia"]) == (
        "normal",
        "pneumonia",
        "COVID-19",
    )
    assert order_class_names(["b", "a", "normal"]) == ("normal", "a", "b")


def _make_folder(root: Path, train: str, test: str, images: dict[str, list[str]]) -> Path:
    for split, names in images.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(np.full((20, 24), 128, np.uint8)).save(root / split / name)
    _write(root / "train.txt", train)
    _write(root / "test.txt", test)
    return root


def test_binary_folder(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png negative x\nb 2.png positive x\n",
        "c 3.png positive x\n",
        {"train": ["1.png", "2.png"], "test": ["3.png"]},
    )
    folder = open_covidx_folder(root)
    assert folder.class_names == ("negative", "positive")
    assert folder.train.class_counts() == {"negative": 1, "positive": 1}


def test_missing_images_are_all_reported_with_paths(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png normal x\nb 2.png pneumonia x\nc 4.png pneumonia x\n",
        "c 3.png normal x\n",
        {"train": ["1.png"], "test": []},
    )
    with pytest.raises(DataError) as err:
        open_covidx_folder(root)
    message = str(err.value)
    assert "3 image(s)" in message
    for missing in ("train/2.png", "train/4.png", "test/3.png"):
        assert missing in message


def test_train_test_leakage_is_reported(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png normal x\nb 2.png pneumonia x\n",
        "c 2.png pneumonia x\n",
        {"train": ["1.png", "2.png"], "test": ["2.png"]},
    )
    with pytest.raises(DataError, match=r"both train and test \(leakage\): 2\.png"):
        open_covidx_folder(root)
    assert find_leakage([parse_split_line("a x.png n")], [parse_split_line("b x.png n")]) == [
        "x.png"
    ]


def test_duplicate_entry_names_both_lines(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png normal x\nb 1.png pneumonia x\n",
        "c 3.png normal x\n",
        {"train": ["1.png"], "test": ["3.png"]},
    )
    with pytest.raises(DataError) as err:
        open_covidx_folder(root)
    assert str(err.value) == (
        f"{root / 'train.txt'}:2: '1.png' is already listed on line 1 with patient 'b' "
        "(there 'a'), label 'pneumonia' (there 'normal'); keep one line per image"
    )
    # dropping exact duplicates does not make a conflicting one go away
    with pytest.raises(DataError, match=r"train\.txt:2: '1\.png' is already listed on line 1"):
        open_covidx_folder(root, drop_exact_duplicates=True)


def test_not_a_covidx_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"not a COVIDx folder: expected train/ and train\.txt"):
        open_covidx_folder(tmp_path)
    with pytest.raises(DataError, match="COVIDx folder not found"):
        open_covidx_folder(tmp_path / "nope")


def test_release_named_split_files_are_found(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png normal x\nb 2.png pneumonia x\n",
        "c 3.png normal x\n",
        {"train": ["1.png", "2.png"], "test": ["3.png"]},
    )
    (root / "train.txt").rename(root / "train_COVIDx9A.txt")
    (root / "test.txt").rename(root / "test_COVIDx9A.txt")
    folder = open_covidx_folder(root)
    assert folder.train.split_file.name == "train_COVIDx9A.txt"


def test_exact_duplicates_are_listed_and_can_be_dropped(tmp_path):
    train = "a 1.png normal x\nb 2.png pneumonia x\na 1.png normal x\n"
    train += "b  2.png pneumonia x\r\nc 5.png COVID-19 x\na 1.png normal x\n"
    root = _make_folder(
        tmp_path,
        train,
        "d 3.png normal x\ne 4.png COVID-19 x\n",
        {"train": ["1.png", "2.png", "5.png"], "test": ["3.png", "4.png"]},
    )
    with pytest.raises(DataError) as err:
        open_covidx_folder(root)
    message = str(err.value)
    assert message.startswith(f"{root / 'train.txt'}:3: exact duplicate of line 1; ")
    assert "3 exact duplicate line(s) in all, lines 3 (= 1), 4 (= 2), 6 (= 1);" in message
    assert "data.drop_exact_duplicates: true" in message and "\n" not in message
    folder = open_covidx_folder(root, drop_exact_duplicates=True)
    assert [e.line for e in folder.train.entries] == [1, 2, 5]
    assert folder.train.dropped_lines == (3, 4, 6) and folder.test.dropped_lines == ()


def test_many_exact_duplicates_show_the_count_and_first_few(tmp_path):
    train = "".join(f"p{i} {i}.png normal x\n" for i in range(8))
    train += "".join(f"p{i} {i}.png normal x\n" for i in range(8))
    root = _make_folder(
        tmp_path,
        train + "q 9.png pneumonia x\n",
        "r 10.png normal x\n",
        {"train": [f"{i}.png" for i in (*range(8), 9)], "test": ["10.png"]},
    )
    with pytest.raises(
        DataError,
        match=r"8 exact duplicate line\(s\) in all, lines 9 \(= 1\), "
        r"10 \(= 2\), 11 \(= 3\), 12 \(= 4\), 13 \(= 5\) and 3 more; ",
    ):
        open_covidx_folder(root)


def test_shared_patients_are_an_error_naming_them_and_their_lines(tmp_path):
    root = _make_folder(
        tmp_path,
        "ANON191 1.png pneumonia x\nb 2.png normal x\nc 5.png normal x\n",
        "d 3.png normal x\nANON191 4.png pneumonia x\nc 6.png normal x\n",
        {"train": ["1.png", "2.png", "5.png"], "test": ["3.png", "4.png", "6.png"]},
    )
    with pytest.raises(DataError) as err:
        open_covidx_folder(root)
    assert str(err.value) == (
        f"{root}: 2 patient(s) have images in both train and test (patient-level leakage): "
        "'ANON191' (train.txt:1, test.txt:2), 'c' (train.txt:3, test.txt:3); move each "
        "patient's images to one split, or set data.allow_shared_patients: true to load anyway"
    )
    folder = open_covidx_folder(root, allow_shared_patients=True)
    assert folder.shared_patients == ("ANON191", "c")
    assert len(folder.train.entries) == 3 and len(folder.test.entries) == 3


def test_unknown_labels_are_listed_with_counts_and_first_line(tmp_path):
    root = _make_folder(
        tmp_path,
        "a 1.png normal x\nb 2.png COVID19 x\nc 5.png COVID19 x\nd 7.png pneumonia x\n",
        "e 3.png normal x\nf 4.png pnuemonia x\ng 6.png COVID19 x\n",
        {"train": ["1.png", "2.png", "5.png", "7.png"], "test": ["3.png", "4.png", "6.png"]},
    )
    with pytest.raises(DataError) as err:
        open_covidx_folder(root)
    assert str(err.value) == (
        f"{root}: label(s) outside the COVIDx classes (normal, pneumonia, COVID-19, negative, "
        f"positive, level1, level2): 'COVID19' (3 line(s), first {root / 'train.txt'}:2), "
        f"'pnuemonia' (1 line(s), first {root / 'test.txt'}:2); fix the lines, or name every "
        "class in data.classes (covidnet data prepare: --classes)"
    )
    classes = ("normal", "pneumonia", "COVID19", "pnuemonia")
    assert open_covidx_folder(root, classes=classes).class_names == classes


def test_image_paths_must_stay_inside_the_image_folder(tmp_path):
    root = _make_folder(
        tmp_path / "covidx",
        "a 1.png normal x\nb 2.png pneumonia x\n",
        "c 3.png normal x\nd 4.png pneumonia x\n",
        {"train": ["1.png", "2.png"], "test": ["3.png", "4.png"]},
    )
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (root / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "sub" / "5.png")
    (root / "test" / "inside.png").symlink_to(root / "test" / "3.png")  # stays inside: fine
    (root / "test" / "nested").mkdir()
    (root / "test" / "nested" / "6.png").write_bytes((root / "test" / "3.png").read_bytes())
    (root / "test" / "link.png").symlink_to(outside)
    (root / "test" / "linkdir").symlink_to(root / "sub")
    good = "c 3.png normal x\nd 4.png pneumonia x\ne inside.png normal x\nf nested/6.png normal x\n"
    (root / "test.txt").write_text(good)
    assert len(open_covidx_folder(root).test.entries) == 4
    for bad, shown in (
        ("../../outside.png", str(outside)),
        (str(outside), str(outside)),
        ("link.png", str(outside)),
        ("../sub/5.png", str(root / "sub" / "5.png")),
        ("linkdir/5.png", str(root / "sub" / "5.png")),
    ):
        (root / "test.txt").write_text(good + f"g {bad} normal x\n")
        with pytest.raises(DataError) as err:
            open_covidx_folder(root)
        assert str(err.value) == (
            f"{root / 'test.txt'}:5: image path {bad!r} resolves to {shown}, outside "
            f"{root / 'test'}/ (1 such line(s)); list files inside the split's image folder "
            "(no '..', absolute paths or symlinks pointing out)"
        ), bad


def test_a_symlinked_image_folder_is_fine(tmp_path):
    real = _make_folder(
        tmp_path / "real",
        "a 1.png normal x\nb 2.png pneumonia x\n",
        "c 3.png normal x\n",
        {"train": ["1.png", "2.png"], "test": ["3.png"]},
    )
    root = tmp_path / "covidx"
    root.mkdir()
    for name in ("train", "test"):
        (root / name).symlink_to(real / name)
        (root / f"{name}.txt").write_bytes((real / f"{name}.txt").read_bytes())
    assert open_covidx_folder(root).class_names == ("normal", "pneumonia")
