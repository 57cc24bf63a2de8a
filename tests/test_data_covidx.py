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
    with pytest.raises(DataError, match=r"train\.txt:2: '1\.png' is already listed on line 1"):
        open_covidx_folder(root)


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
