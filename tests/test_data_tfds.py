"""The `covidx` TFDS builder prepares the synthetic folder, without TensorFlow."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from covidnet_jax.data import DataConfig, load_data, write_synthetic_dataset
from covidnet_jax.data.tfds_covidx import find_prepared, prepare_covidx
from covidnet_jax.errors import DataError
from search.cli import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    synth = write_synthetic_dataset(root / "synth", per_class=10, image_size=40, seed=0)
    result = prepare_covidx(root / "synth", resolution=24, channels=3, data_dir=root / "tfds")
    return root, synth, result


def test_prepare_counts_shapes_and_no_tensorflow(prepared):
    _, synth, result = prepared
    assert result.name == "covidx/r24_c3"
    assert result.class_counts == synth.class_counts
    assert "tensorflow" not in sys.modules

    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(result.path))
    assert builder.info.features["label"].names == ["normal", "pneumonia", "COVID-19"]
    assert builder.info.file_format.value == "array_record"
    source = builder.as_data_source(split="test")
    assert len(source) == sum(synth.class_counts["test"].values())
    example = source[0]
    assert example["image"].shape == (24, 24, 3) and example["image"].dtype == np.uint8
    assert isinstance(example["patient_id"], (bytes, str))


def test_load_data_reads_prepared_data_like_the_folder(prepared):
    root, _, result = prepared
    from_tfds = load_data(
        DataConfig(
            tfds_data_dir=str(result.data_dir),
            resolution=24,
            channels=1,
            cache_dir=str(root / "cache"),
        ),
        seed=0,
    )
    from_folder = load_data(
        DataConfig(
            covidx_dir=str(root / "synth"), resolution=24, channels=1, cache_dir=str(root / "cache")
        ),
        seed=0,
    )
    assert from_tfds.class_names == from_folder.class_names
    assert from_tfds.report.counts == from_folder.report.counts
    for split in ("validation", "test"):
        a = np.concatenate([b["image"] for b in from_tfds.eval_batches(split, 8)])
        b = np.concatenate([b["image"] for b in from_folder.eval_batches(split, 8)])
        np.testing.assert_array_equal(a, b)  # same preprocessing, same pixels
    assert "tensorflow" not in sys.modules


def test_missing_resolution_and_cli(prepared, capsys):
    root, _, result = prepared
    with pytest.raises(DataError, match="covidnet data prepare --covidx-dir DIR --resolution 99"):
        find_prepared(result.data_dir, resolution=99)
    code = main(
        [
            "data",
            "prepare",
            "--covidx-dir",
            str(root / "synth"),
            "--resolution",
            "24",
            "--data-dir",
            str(result.data_dir),
        ]
    )  # already prepared: reused
    assert code == 0
    out = capsys.readouterr().out
    assert "covidx/r24_c3" in out and "COVID-19" in out
    assert main(["data", "prepare", "--covidx-dir", str(root), "--resolution", "24"]) == 2
    assert "not a COVIDx folder" in capsys.readouterr().err
    assert main(["data", "prepare", "--covidx-dir", str(root / "synth"), "--resolution", "3"]) == 2
    assert "resolution 3 is out of range" in capsys.readouterr().err


def test_prepare_refuses_stale_data(prepared):
    root, _, result = prepared
    lines = (root / "synth" / "train.txt").read_text().splitlines()
    (root / "synth" / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    try:
        with pytest.raises(DataError, match="already prepared from different data"):
            prepare_covidx(root / "synth", resolution=24, channels=3, data_dir=result.data_dir)
    finally:
        (root / "synth" / "train.txt").write_text("\n".join(lines) + "\n")
