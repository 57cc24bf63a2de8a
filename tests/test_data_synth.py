"""The synthetic COVIDx-format data set: format, determinism, masks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from covidnet_jax.data import open_covidx_folder, parse_split_file, write_synthetic_dataset
from covidnet_jax.data import synth as synth_module
from covidnet_jax.errors import DataError
from search.cli import main


def _digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = write_synthetic_dataset(out, per_class=16, image_size=48, seed=3)
    return out, summary


def test_format_is_covidx(synth):
    out, summary = synth
    folder = open_covidx_folder(out)  # checks files exist, no leakage, parses lines
    assert folder.class_names == ("normal", "pneumonia", "COVID-19")
    for split in (folder.train, folder.test):
        for entry in split.entries:
            assert entry.source == "synth"
        assert split.class_counts() == summary.class_counts[split.name]
    total = {
        c: summary.class_counts["train"][c] + summary.class_counts["test"][c]
        for c in folder.class_names
    }
    assert total == dict.fromkeys(folder.class_names, 16)
    assert all(n > 0 for n in summary.class_counts["test"].values())
    image = Image.open(out / "train" / folder.train.entries[0].filename)
    assert image.mode == "L" and image.size == (52, 48)  # width 8% larger than height
    assert json.loads((out / "synth.json").read_text())["seed"] == 3


def test_patients_have_several_images_and_stay_in_one_split(synth):
    out, _ = synth
    train = parse_split_file(out / "train.txt")
    test = parse_split_file(out / "test.txt")
    train_patients = {e.patient_id for e in train}
    test_patients = {e.patient_id for e in test}
    assert not train_patients & test_patients
    per_patient = {}
    for e in train + test:
        per_patient.setdefault(e.patient_id, set()).add(e.label)
    assert all(len(labels) == 1 for labels in per_patient.values())
    assert len(train) + len(test) > len(per_patient)  # several images per patient
    assert any(" " in pid for pid in per_patient)  # ids with spaces, as in COVIDx8A


def test_masks_mark_lesions_only_in_disease(synth):
    out, _ = synth
    entries = parse_split_file(out / "train.txt") + parse_split_file(out / "test.txt")
    lesion_area = {"normal": [], "pneumonia": [], "COVID-19": []}
    for e in entries:
        mask = np.asarray(Image.open(out / "masks" / e.filename))
        image = Image.open(
            out / ("train" if (out / "train" / e.filename).exists() else "test") / e.filename
        )
        assert mask.shape == (image.size[1], image.size[0])
        assert set(np.unique(mask)) <= {0, 255}
        lesion_area[e.label].append(float((mask > 0).mean()))
    assert max(lesion_area["normal"]) == 0.0
    assert np.mean([a > 0 for a in lesion_area["pneumonia"]]) > 0.8
    assert np.mean([a > 0 for a in lesion_area["COVID-19"]]) > 0.8


def _lung_density(label: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`_lung_densities` for one label, with the same random draws for every label."""
    rng = np.random.default_rng(seed)
    anat = synth_module._anatomy(rng)
    frame = synth_module._make_frame(rng, 64, 70)
    centres = [
        (frame.cy - 0.02, frame.cx - anat["lung_dx"]),
        (frame.cy - 0.03, frame.cx + anat["lung_dx"]),
    ]
    lungs = np.zeros_like(frame.yy)
    for cy, cx in centres:
        box, lung = frame.ellipse(cy, cx, anat["lung_ry"], anat["lung_rx"], 0.12)
        lungs[box] = np.maximum(lungs[box], lung)
    return synth_module._lung_densities(rng, label, anat, frame, lungs, centres)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_disease_changes_texture_not_amount_of_lung_density(seed):
    # the calibration's premise: a linear model on pixels must not find the disease by
    # the amount of density; the finer detail (edges, texture) is what differs
    total, disease = {}, {}
    for label in synth_module.CLASS_NAMES:
        total[label], disease[label] = _lung_density(label, seed)
    amount = {label: float(t.sum()) for label, t in total.items()}
    detail = {label: float(np.abs(np.diff(t, axis=1)).sum()) for label, t in total.items()}
    assert max(amount.values()) / min(amount.values()) < 1.01
    assert detail["pneumonia"] > 1.2 * detail["normal"]
    assert detail["COVID-19"] > 1.2 * detail["normal"]
    assert disease["normal"].sum() == 0.0 and disease["COVID-19"].sum() > 0.0


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", per_class=6, image_size=32, seed=1).out_dir
    b = write_synthetic_dataset(tmp_path / "b", per_class=6, image_size=32, seed=1).out_dir
    c = write_synthetic_dataset(tmp_path / "c", per_class=6, image_size=32, seed=2).out_dir
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_refuses_to_overwrite_and_bad_sizes(tmp_path):
    out = tmp_path / "x"
    write_synthetic_dataset(out, per_class=4, image_size=32)
    with pytest.raises(DataError, match="--overwrite"):
        write_synthetic_dataset(out, per_class=4, image_size=32)
    with pytest.raises(DataError, match="--image-size 8"):
        write_synthetic_dataset(tmp_path / "y", per_class=4, image_size=8)
    with pytest.raises(DataError, match="--per-class 1"):
        write_synthetic_dataset(tmp_path / "y", per_class=1, image_size=32)
    assert not (tmp_path / "y").exists()


def test_cli_synth(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(tmp_path / "s"),
                "--per-class",
                "5",
                "--image-size",
                "32",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train" in printed and "masks" in printed
    assert (tmp_path / "s" / "train.txt").is_file()
    assert main(["data", "synth", "--out", str(tmp_path / "s")]) == 2
    assert "--overwrite" in capsys.readouterr().err
