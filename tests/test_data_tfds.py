"""The `covidx` TFDS builder prepares the synthetic folder, without TensorFlow."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
        with pytest.raises(
            DataError,
            match=r"already prepared from different data \(the train split file, train image files",
        ):
            prepare_covidx(root / "synth", resolution=24, channels=3, data_dir=result.data_dir)
    finally:
        (root / "synth" / "train.txt").write_text("\n".join(lines) + "\n")


def _small_synth(path: Path) -> Path:
    write_synthetic_dataset(path, per_class=4, image_size=32, seed=0)
    return path


def _stored_labels(path: Path) -> dict[str, str]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    names = builder.info.features["label"].names
    source = builder.as_data_source(split="train")
    return {
        source[i]["filename"].decode(): names[int(source[i]["label"])] for i in range(len(source))
    }


def test_prepare_detects_changed_data_by_content_and_rebuilds(tmp_path):
    folder = _small_synth(tmp_path / "synth")
    data_dir = tmp_path / "tfds"
    first = prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir)
    path = first.path
    assert not first.reused and (path / "covidnet_source.json").is_file()
    assert prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir).reused
    # Swap the labels of two train lines: the counts stay the same, the data does not.
    lines = (folder / "train.txt").read_text().splitlines()
    i = 0
    j = next(k for k, line in enumerate(lines) if line.split()[2] != lines[i].split()[2])
    a, b = lines[i].split(), lines[j].split()
    a[2], b[2] = b[2], a[2]
    lines[i], lines[j] = " ".join(a), " ".join(b)
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    counts = "; ".join(
        f"{split} " + ", ".join(f"{name} {n}" for name, n in c.items())
        for split, c in first.class_counts.items()
    )
    assert counts.startswith("train normal ")  # stored names in label order
    with pytest.raises(DataError) as err:
        prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir)
    assert str(err.value) == (
        f"{path}: already prepared from different data (the train split file changed; "
        f"stored: {counts}; the folder now: {counts}); run prepare again with --rebuild to "
        f"replace it, or delete {path}"
    )
    rebuilt = prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir, rebuild=True)
    assert not rebuilt.reused and rebuilt.path == path
    stored = _stored_labels(path)
    assert (stored[a[1]], stored[b[1]]) == (a[2], b[2])  # the new labels, not the old ones
    assert prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir).reused
    # Another class order: the message names the stored classes from the record.
    with pytest.raises(DataError) as err:
        prepare_covidx(
            folder,
            resolution=16,
            channels=1,
            data_dir=data_dir,
            classes=("COVID-19", "pneumonia", "normal"),
        )
    train = rebuilt.class_counts["train"]
    stored_text = ", ".join(f"{k} {train[k]}" for k in ("normal", "pneumonia", "COVID-19"))
    now_text = ", ".join(f"{k} {train[k]}" for k in ("COVID-19", "pneumonia", "normal"))
    assert f"(the class list changed; stored: train {stored_text}; test " in str(err.value)
    assert f"; the folder now: train {now_text}; test " in str(err.value)
    # A rewritten image (new modification time) is a change too.
    image = folder / "train" / lines[0].split()[1]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"\(train image files \(names, sizes or modification"):
        prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir)
    # Data prepared without a record (older covidnet) is not trusted.
    (path / "covidnet_source.json").unlink()
    with pytest.raises(DataError, match=r"without a readable covidnet_source\.json .* --rebuild"):
        prepare_covidx(folder, resolution=16, channels=1, data_dir=data_dir)


def test_prepare_cli_is_quiet_and_load_checks_prepared_data(tmp_path, capfd, caplog):
    folder = _small_synth(tmp_path / "synth")
    train = (folder / "train.txt").read_text().splitlines()
    test = (folder / "test.txt").read_text().splitlines()
    pid, filename = train[0].split()[:2]
    test[0] = " ".join([pid, *test[0].split()[1:]])  # a patient in both splits
    (folder / "test.txt").write_text("\n".join(test) + "\n")
    (folder / "train.txt").write_text("\n".join([*train, train[1]]) + "\n")  # a duplicate
    data_dir = tmp_path / "tfds"
    args = ["data", "prepare", "--covidx-dir", str(folder), "--resolution", "16"]
    args += ["--channels", "1", "--data-dir", str(data_dir)]
    assert main(args) == 2
    assert "exact duplicate of line 2" in capfd.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*args, "--drop-exact-duplicates"]) == 0
    out, err = capfd.readouterr()
    assert "dropped 1 exact duplicate split-file line(s) (train 1)" in out
    assert f"warning: 1 patient(s) have images in both train and test ({pid!r})" in out
    assert f"preparing covidx/r16_c1 from {folder}: {len(train)} train and {len(test)} test" in out
    assert "prepared covidx/r16_c1 in" in out
    for noise in ("Downloading and preparing", "downloaded and prepared", "custom data config"):
        assert noise not in out and noise not in err
        assert not any(noise in r.getMessage() for r in caplog.records)
    assert logging.getLogger("absl").level != logging.ERROR  # the silence was scoped
    config = DataConfig(tfds_data_dir=str(data_dir), resolution=16, channels=1)
    with pytest.raises(DataError) as raised:
        load_data(config, seed=0)
    test_file = test[0].split()[1]
    assert str(raised.value).startswith(
        f"{data_dir}: 1 patient(s) have images in both train and test (patient-level "
        f"leakage): {pid!r} (train {filename}, test {test_file}); "
    )
    import dataclasses

    d = load_data(dataclasses.replace(config, allow_shared_patients=True), seed=0)
    assert d.report.shared_patients == (pid,)
    # Labels outside the COVIDx classes need --classes.
    (folder / "test.txt").write_text(test[0].replace(test[0].split()[2], "COVID19") + "\n")
    assert main([*args, "--drop-exact-duplicates", "--rebuild"]) == 2
    assert "label(s) outside the COVIDx classes" in capfd.readouterr().err
