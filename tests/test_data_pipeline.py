"""load_data, the validation split, train/eval batches (host and device paths), re-balancing,
weights, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from covidnet_jax import parallel
from covidnet_jax.data import (
    DataConfig,
    load_data,
    preprocess_image,
    split_validation,
    write_synthetic_dataset,
)
from covidnet_jax.data.augment import sample_augment_params
from covidnet_jax.data.device_augment import AUGMENT_KEY, model_batch, pack_params
from covidnet_jax.data.pipeline import DeviceBatchMaker, _prefetched_batches
from covidnet_jax.errors import ConfigError, DataError
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings
from covidnet_jax.typed_yaml import from_dict


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "synth"
    write_synthetic_dataset(out, per_class=20, image_size=40, seed=0)
    return out


def _config(synth_dir, tmp_path, **changes) -> DataConfig:
    base = DataConfig(
        covidx_dir=str(synth_dir),
        resolution=32,
        channels=1,
        validation_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def data(synth_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = DataConfig(
        covidx_dir=str(synth_dir),
        resolution=32,
        channels=3,
        validation_fraction=0.2,
        rebalance_class="COVID-19",
        rebalance_fraction=0.3,
        cache_dir=str(cache),
    )
    return load_data(config, seed=0)


def test_config_from_yaml_mapping_and_errors():
    config = from_dict(
        DataConfig,
        {
            "covidx_dir": "data/synth",
            "synth": {},
            "resolution": 64,
            "channels": 1,
            "class_weights": {"COVID-19": 4.0},
        },
    )
    assert config.synth.per_class == 300 and config.class_weights["COVID-19"] == 4.0
    assert from_dict(DataConfig, {"tfds_data_dir": "x", "class_weights": "balanced"})
    with pytest.raises(ConfigError, match="exactly one of covidx_dir"):
        from_dict(DataConfig, {"covidx_dir": "a", "tfds_data_dir": "b"})
    with pytest.raises(ConfigError, match="exactly one of covidx_dir"):
        from_dict(DataConfig, {})
    with pytest.raises(ConfigError, match="channels: expected one of 1, 3, got 2"):
        from_dict(DataConfig, {"covidx_dir": "a", "channels": 2})
    with pytest.raises(ConfigError, match=r"resolution: expected a value >= 16, got 4"):
        from_dict(DataConfig, {"covidx_dir": "a", "resolution": 4})
    with pytest.raises(ConfigError, match="rebalance_class: 'covid' is not one of"):
        from_dict(
            DataConfig, {"covidx_dir": "a", "classes": ["n", "p"], "rebalance_class": "covid"}
        )


def test_shapes_counts_and_report(data):
    assert data.class_names == ("normal", "pneumonia", "COVID-19")
    counts = data.report.counts
    assert sum(sum(c.values()) for c in counts.values()) == 60
    assert all(counts["validation"][c] > 0 for c in data.class_names)
    batch = next(data.train_batches(8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    assert "validation" in data.report.summary()


def test_patient_wise_validation_has_no_overlap_and_ignores_seed(synth_dir, tmp_path):
    a = load_data(_config(synth_dir, tmp_path), seed=0)
    b = load_data(_config(synth_dir, tmp_path), seed=123)
    np.testing.assert_array_equal(a.labels("validation"), b.labels("validation"))
    # rebuild the split from the raw arrays: no patient on both sides
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2] * 5)
    pids = tuple(f"p{i // 2}" for i in range(50))
    is_val = split_validation(labels, pids, 0.3)
    val_p = {p for p, v in zip(pids, is_val, strict=True) if v}
    train_p = {p for p, v in zip(pids, is_val, strict=True) if not v}
    assert val_p and train_p and not val_p & train_p
    assert 0.15 < is_val.mean() < 0.45
    assert a.report.patients["validation"] > 0
    assert not split_validation(labels, pids, 0.0).any()
    # Another draw is another patient-disjoint split of the same size; draw 0 is the default.
    np.testing.assert_array_equal(split_validation(labels, pids, 0.3, draw=0), is_val)
    other = split_validation(labels, pids, 0.3, draw=1)
    assert not np.array_equal(other, is_val)
    other_p = {p for p, v in zip(pids, other, strict=True) if v}
    assert not other_p & {p for p, v in zip(pids, other, strict=True) if not v}
    assert abs(int(other.sum()) - int(is_val.sum())) <= 4  # whole patients of 2 images


@pytest.fixture(scope="module", params=["device", "host"])
def either(request, data):
    """The `data` fixture with each `augment_on`."""
    if request.param == "device":
        return data
    return load_data(dataclasses.replace(data.config, augment_on="host"), seed=0)


def test_train_batches_are_deterministic_and_resume_exactly(either):
    data = either
    first = [b for _, b in zip(range(6), data.train_batches(8, seed=5), strict=False)]
    again = [b for _, b in zip(range(6), data.train_batches(8, seed=5), strict=False)]
    resumed = next(data.train_batches(8, seed=5, start_step=4))
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(first[4]["image"], resumed["image"])
    np.testing.assert_array_equal(first[4]["label"], resumed["label"])
    other = next(data.train_batches(8, seed=6, start_step=4))
    assert not np.array_equal(first[4]["image"], other["image"])


def test_each_epoch_visits_every_train_image_once(synth_dir, tmp_path):
    d = load_data(_config(synth_dir, tmp_path, augment=False), seed=0)
    n = d.num_examples("train")
    batches = [b for _, b in zip(range(n), d.train_batches(1, seed=2), strict=False)]
    seen = np.stack([b["image"][0, :, :, 0] for b in batches])
    train = np.concatenate([b["image"][b["mask"], :, :, 0] for b in d.eval_batches("train", 16)])
    # every train image appears exactly once in the first epoch, in a shuffled order
    order = [int(np.flatnonzero(np.all(train == s, axis=(1, 2)))[0]) for s in seen]
    assert sorted(order) == list(range(n))
    assert order != list(range(n))
    second = [b for _, b in zip(range(n), d.train_batches(1, seed=2, start_step=n), strict=False)]
    assert not all(
        np.array_equal(x["image"], y["image"]) for x, y in zip(batches, second, strict=True)
    )


def test_rebalancing_fraction_over_many_batches(either):
    data = either
    target = data.class_names.index("COVID-19")
    labels = np.concatenate(
        [b["label"] for _, b in zip(range(200), data.train_batches(10, seed=1), strict=False)]
    )
    fraction = float(np.mean(labels == target))
    assert abs(fraction - 0.3) < 0.01  # 3 of every 10 slots
    natural = data.report.counts["train"]["COVID-19"] / data.num_examples("train")
    assert natural < 0.4
    others = [np.mean(labels == k) for k in range(3) if k != target]
    assert all(0.25 < o < 0.45 for o in others)  # the rest is drawn from the other classes
    small = next(data.train_batches(2, seed=0))  # max(int(2 * 0.3), 1) = 1 slot
    assert np.sum(small["label"] == target) >= 1


def test_eval_batches_are_padded_with_a_mask(data):
    n = data.num_examples("test")
    batches = list(data.eval_batches("test", 7))
    assert len(batches) == -(-n // 7)
    assert all(b["image"].shape == (7, 32, 32, 3) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and mask[:n].all()
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, data.labels("test"))
    assert np.all(batches[-1]["image"][~batches[-1]["mask"]] == 0)


def test_class_weights(synth_dir, tmp_path):
    counts = None
    for spec, check in (
        ("none", lambda w: np.all(w == 1)),
        ("balanced", None),
        ({"COVID-19": 5.0}, lambda w: list(w) == [1.0, 1.0, 5.0]),
    ):
        d = load_data(_config(synth_dir, tmp_path, class_weights=spec), seed=0)
        weights = d.class_weights()
        assert weights.shape == (3,) and weights.dtype == np.float32
        if check is None:
            counts = np.array([d.report.counts["train"][c] for c in d.class_names])
            np.testing.assert_allclose(weights, counts.sum() / (3 * counts), rtol=1e-6)
        else:
            assert check(weights)
    assert counts is not None


def test_cache_is_reused_and_invalidated_when_split_file_changes(synth_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(synth_dir, folder)
    config = _config(folder, tmp_path)
    first = load_data(config, seed=0)
    assert load_data(config, seed=0).report.cache == first.report.cache
    lines = (folder / "train.txt").read_text().splitlines()
    (folder / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    changed = load_data(config, seed=0)
    assert changed.report.cache != first.report.cache
    n_first = first.num_examples("train") + first.num_examples("validation")
    assert changed.num_examples("train") + changed.num_examples("validation") == n_first - 1


def _corrupt_copy(synth_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(synth_dir, folder)
    name = (folder / "train.txt").read_text().split()[1]
    data = (folder / "train" / name).read_bytes()
    (folder / "train" / name).write_bytes(data[: len(data) // 2])  # truncated PNG
    return folder, folder / "train" / name


def test_corrupt_image_error_names_the_file(synth_dir, tmp_path):
    folder, bad = _corrupt_copy(synth_dir, tmp_path)
    with pytest.raises(DataError) as err:
        load_data(_config(folder, tmp_path), seed=0)
    assert str(bad) in str(err.value)
    assert "skip_corrupt" in str(err.value)


def test_corrupt_image_skipped_and_reported(synth_dir, tmp_path):
    folder, bad = _corrupt_copy(synth_dir, tmp_path)
    d = load_data(_config(folder, tmp_path, skip_corrupt=True), seed=0)
    assert list(d.report.skipped) == [str(bad)]
    assert str(bad) in d.report.summary()
    total = sum(sum(c.values()) for c in d.report.counts.values())
    assert total == 59
    with pytest.raises(DataError, match="skip_corrupt"):  # the cache does not hide it
        load_data(_config(folder, tmp_path), seed=0)


def test_empty_split_and_bad_rebalance_class(synth_dir, tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(synth_dir, folder)
    (folder / "test.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test\.txt: split file has no entries"):
        load_data(_config(folder, tmp_path), seed=0)
    with pytest.raises(DataError, match="rebalance_class 'positive' is not a class"):
        load_data(_config(synth_dir, tmp_path, rebalance_class="positive"), seed=0)
    with pytest.raises(DataError, match="validation split is empty"):
        d = load_data(_config(synth_dir, tmp_path, validation_fraction=0.0), seed=0)
        next(d.eval_batches("validation", 4))


def test_synth_section_writes_the_folder_once(tmp_path):
    from covidnet_jax.data import SynthConfig

    config = DataConfig(
        covidx_dir=str(tmp_path / "auto"),
        synth=SynthConfig(per_class=6, image_size=32, seed=1),
        resolution=16,
        channels=1,
    )
    d = load_data(config, seed=0)
    assert (tmp_path / "auto" / "train.txt").is_file()
    assert d.num_examples("test") > 0
    other = dataclasses.replace(config, synth=SynthConfig(per_class=6, image_size=32, seed=2))
    with pytest.raises(DataError, match=r"match data\.synth"):
        load_data(other, seed=0)
    # A folder from an older generator version is rewritten, not silently reused.
    settings_file = tmp_path / "auto" / "synth.json"
    settings = json.loads(settings_file.read_text())
    stale = tmp_path / "auto" / "train" / "stale.png"
    stale.write_bytes(b"")
    settings_file.write_text(json.dumps({**settings, "version": settings["version"] - 1}))
    load_data(config, seed=0)
    assert json.loads(settings_file.read_text())["version"] == settings["version"]
    assert not stale.exists()


def test_preprocess_image_drops_top_rows_and_crops_centre(tmp_path):
    image = np.full((100, 140), 50, np.uint8)
    image[:8] = 255  # the top 8% (a text label)
    image[:, :20] = 0  # outside the centre square
    image[:, -20:] = 0
    out = preprocess_image(image, resolution=23, channels=3)
    assert out.shape == (23, 23, 3) and out.dtype == np.uint8
    assert np.all(out == 50)
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    np.testing.assert_array_equal(preprocess_image(path, resolution=23, channels=1), out[..., :1])
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(preprocess_image(rgb, resolution=23, channels=1), out[..., :1])
    with pytest.raises(DataError, match="resolution 5 is out of range"):
        preprocess_image(image, resolution=5, channels=1)
    with pytest.raises(DataError, match="not a readable image"):
        (tmp_path / "bad.png").write_bytes(b"not an image")
        preprocess_image(tmp_path / "bad.png", resolution=23, channels=1)


def test_grain_workers_give_the_same_batches(synth_dir, tmp_path):
    d0 = load_data(_config(synth_dir, tmp_path, augment_on="host"), seed=0)
    d1 = load_data(_config(synth_dir, tmp_path, augment_on="host", workers=1), seed=0)
    it = d1.train_batches(4, seed=3, start_step=2)
    for step in (2, 3):
        expected = d0.batch_maker(4, seed=3)(step)
        got = next(it)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_memory_mapped_cache_gives_the_same_batches(synth_dir, tmp_path, monkeypatch):
    from covidnet_jax.data import cache as cache_lib

    in_memory = load_data(_config(synth_dir, tmp_path, augment_on="host"), seed=0)
    cache_lib._memory.clear()
    monkeypatch.setattr(cache_lib, "_MMAP_BYTES", 0)  # treat every array as large
    mapped = load_data(_config(synth_dir, tmp_path, augment_on="host"), seed=0)
    maker = mapped.batch_maker(4, seed=1)
    assert isinstance(maker.images, np.memmap)
    import pickle

    revived = pickle.loads(pickle.dumps(maker))  # how Grain workers receive it
    assert isinstance(revived.images, np.memmap)
    expected = in_memory.batch_maker(4, seed=1)(3)
    for got in (maker(3), revived(3)):
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    cache_lib._memory.clear()


def test_shared_patients_refused_unless_allowed_then_reported(synth_dir, tmp_path):
    folder = tmp_path / "shared"
    shutil.copytree(synth_dir, folder)
    train_pid = (folder / "train.txt").read_text().splitlines()[0].split()[0]
    test_lines = (folder / "test.txt").read_text().splitlines()
    test_lines[1] = " ".join([train_pid, *test_lines[1].split()[1:]])
    (folder / "test.txt").write_text("\n".join(test_lines) + "\n")
    with pytest.raises(DataError) as err:
        load_data(_config(folder, tmp_path), seed=0)
    message = str(err.value)
    assert message.startswith(f"{folder}: 1 patient(s) have images in both train and test")
    assert f"{train_pid!r} (train.txt:1, test.txt:2)" in message
    assert message.endswith("set data.allow_shared_patients: true to load anyway")
    d = load_data(_config(folder, tmp_path, allow_shared_patients=True), seed=0)
    assert d.report.shared_patients == (train_pid,)
    assert (
        f"warning: 1 patient(s) appear in both train and test (allowed by "
        f"data.allow_shared_patients): {train_pid!r}" in d.report.summary()
    )


def test_exact_duplicates_dropped_and_counted_cache_key_unchanged_without_them(synth_dir, tmp_path):
    plain = load_data(_config(synth_dir, tmp_path), seed=0)
    # The key only changes what a run sees when lines are actually dropped.
    same = load_data(_config(synth_dir, tmp_path, drop_exact_duplicates=True), seed=0)
    assert same.report.cache == plain.report.cache and not same.report.dropped_duplicates
    folder = tmp_path / "dups"
    shutil.copytree(synth_dir, folder)
    lines = (folder / "train.txt").read_text().splitlines()
    (folder / "train.txt").write_text("\n".join([*lines, lines[0], lines[3]]) + "\n")
    n = len(lines)
    with pytest.raises(DataError, match=rf"train\.txt:{n + 1}: exact duplicate of line 1; 2 "):
        load_data(_config(folder, tmp_path), seed=0)
    d = load_data(_config(folder, tmp_path, drop_exact_duplicates=True), seed=0)
    assert d.report.dropped_duplicates == {"train": 2}
    assert d.report.counts == plain.report.counts
    assert "dropped 2 exact duplicate split-file line(s) (train 2;" in d.report.summary()


def test_validation_split_stays_patient_disjoint_in_load_data(synth_dir, tmp_path):
    from covidnet_jax.data import parse_split_file

    pids = [e.patient_id for e in parse_split_file(synth_dir / "train.txt")]
    assert len(set(pids)) < len(pids)  # some patients have several images
    for draw in (0, 1, 2):
        d = load_data(_config(synth_dir, tmp_path, validation_draw=draw), seed=0)
        p = d.report.patients
        assert p["validation"] > 0
        assert p["train"] + p["validation"] == len(set(pids))  # disjoint: no patient counted twice


# ---------------------------------------------------------------------------------------
# augment_on: device


def test_device_path_sends_uint8_and_the_host_paths_transforms(data):
    device = data.batch_maker(8, seed=4)
    assert isinstance(device, DeviceBatchMaker)
    host = device.host  # the same host side, called as the host path
    for step in (0, 1, 7):
        sent = device.host.host_batch(step)
        assert sent["image"].dtype == np.uint8 and sent["image"].shape == (8, 32, 32, 1)
        drawn = sample_augment_params(np.random.default_rng([4, 4, step]), 8)
        np.testing.assert_array_equal(sent[AUGMENT_KEY], pack_params(drawn))
        got, expected = device(step), host(step)
        assert isinstance(got["image"], jax.Array) and got["image"].shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(np.asarray(got["label"]), expected["label"])
        np.testing.assert_allclose(np.asarray(got["image"]), expected["image"], atol=2e-5)


def test_device_batches_are_a_pure_function_of_seed_and_step(data):
    stream = [b for _, b in zip(range(5), data.train_batches(8, seed=9), strict=False)]
    maker = data.batch_maker(8, seed=9)
    for step in (4, 2, 0):  # any order, a fresh maker: the same arrays, bit for bit
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(maker(step)[key]), stream[step][key])
    assert not np.array_equal(np.asarray(stream[0]["image"]), np.asarray(stream[1]["image"]))
    assert not np.array_equal(
        np.asarray(data.batch_maker(8, seed=10)(0)["image"]), np.asarray(stream[0]["image"])
    )


def test_prefetch_thread_stops_on_close_and_hands_on_errors_in_order(data):
    def running() -> int:
        return sum(t.name == "covidnet-prefetch" for t in threading.enumerate())

    before = running()
    batches = data.train_batches(4, seed=0)
    next(batches)
    assert running() == before + 1
    batches.close()
    assert running() == before

    class Failing:
        def __call__(self, step):
            if step == 2:
                raise KeyError("bad step 2")
            return {"step": step}

    stream = _prefetched_batches(Failing(), 0)
    assert [next(stream)["step"], next(stream)["step"]] == [0, 1]
    with pytest.raises(KeyError, match="bad step 2"):
        next(stream)
    assert running() == before


def test_jitted_step_on_device_batches_compiles_once(data):
    # The trainer's path: device batches into the memoised, compiled train step.
    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x_BxHxWxC):
            return self.head(nnx.relu(self.conv(x_BxHxWxC)).mean(axis=(1, 2)))

    mesh = parallel.make_mesh()
    fns = StepFunctions.for_model(
        Net(rngs=nnx.Rngs(0)), key="pipeline-device", settings=StepSettings(), mesh=mesh
    )
    state = fns.init_state(Net(rngs=nnx.Rngs(0)))
    hyper = Hyper.create(learning_rate=1e-3, weight_decay=0.0, class_weights=np.ones(3), seed=0)
    batches = data.train_batches(4, seed=0)
    first = parallel.shard_batch(next(batches), mesh)
    train, seconds = fns.compile_train(state, first, hyper)
    compiled_augment = model_batch._cache_size()
    for _, batch in zip(range(3), batches, strict=False):
        batch = parallel.shard_batch(batch, mesh)
        again, zero = fns.compile_train(state, batch, hyper)
        assert again is train and zero == 0.0
        state, metrics = train(state, batch, hyper)
    batches.close()
    assert seconds > 0 and bool(metrics["finite"])
    assert model_batch._cache_size() == compiled_augment
