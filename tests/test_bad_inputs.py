"""Bad inputs give exit status 2 and one line on stderr naming the culprit, not a traceback:
a decompression bomb among the images, a tampered export.json, a read-only workdir, a full
disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from covidnet_jax import export
from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec, StemSpec
from covidnet_jax.checkpointing import Checkpoints
from covidnet_jax.data import DataConfig, load_data, write_synthetic_dataset
from covidnet_jax.data import cache as cache_lib
from covidnet_jax.data.preprocess import decode_image
from covidnet_jax.disk import (
    DiskError,
    disk_failure,
    ensure_writable,
    quiet_disk_failures,
)
from covidnet_jax.errors import DataError
from covidnet_jax.models import build_model
from search.cli import main

# A one-module PEPX design: builds and exports in a second.
SMALL = ArchSpec(
    input_size=16,
    input_channels=1,
    class_names=("a", "b"),
    stem=StemSpec(channels=4, kernel_size=3, stride=2, pool_size=0),
    stages=(StageSpec(stride=1, modules=(ModuleSpec(4, 8, 4, 8),)),),
)
BOMB_SIDE = 20000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid 1-bit all-black PNG of side x side pixels: ~50 KB on disk, 400 MB decoded
    (written directly, in a fraction of the second PIL takes)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The command's stderr, asserted to be one `covidnet COMMAND: error:` line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"covidnet {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "covidx"
    write_synthetic_dataset(out, per_class=4, image_size=32, seed=0)
    (out.parent / "small.json").write_text(SMALL.to_json())
    return out


def write_train_config(data_dir: Path, where: Path, **data: object) -> Path:
    """A training experiment on `data_dir` with the SMALL design, caches under `where`."""
    config = {
        "model": {"arch": str(data_dir.parent / "small.json")},
        "data": {
            "covidx_dir": str(data_dir),
            "resolution": 16,
            "channels": 1,
            "cache_dir": str(where / "cache"),
            **data,
        },
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2},
        "compile_cache_dir": str(where / "compile_cache"),
    }
    path = where / "train.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    model = build_model(SMALL, rngs=nnx.Rngs(0))
    card = export.ModelCard(
        title="small", spec_summary=SMALL.summary(), class_names=("a", "b"), params=1, macs=1
    )
    out = tmp_path_factory.mktemp("export") / "export"
    return export.write_export(model, SMALL, out, card=card, platforms=("cpu",))


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48), np.uint8)).save(path)
    return path


# -- 1. decompression bombs --------------------------------------------------------------


def test_bomb_in_a_data_set_names_file_size_and_key(data_dir, bomb, tmp_path, capsys):
    folder = tmp_path / "covidx"
    shutil.copytree(data_dir, folder)
    victim = sorted((folder / "train").glob("*.png"))[0]
    shutil.copyfile(bomb, victim)
    config = write_train_config(data_dir, tmp_path, covidx_dir=str(folder))
    argv = ["train", "--config", str(config), "--workdir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = one_error_line(capsys, "train")
    assert f"{victim}: image of 20000 x 20000 = 400,000,000 pixels" in err
    assert "over the limit of 89,478,485" in err and "raise data.max_image_pixels" in err
    assert main(argv) == 2, "the cache must not hide the bomb"
    assert str(victim) in one_error_line(capsys, "train")


def test_max_image_pixels_is_a_data_key(data_dir, tmp_path, monkeypatch, capsys):
    base = {"covidx_dir": str(data_dir), "resolution": 16, "channels": 1}
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"over the limit of 500 .*data\.max_image_pixels"):
        load_data(DataConfig(**base, cache_dir=cache, max_image_pixels=500), seed=0)
    # Raised, the same files load (the refusal above is not served from the cache).
    data = load_data(DataConfig(**base, cache_dir=cache, max_image_pixels=10_000), seed=0)
    assert data.num_examples("test") > 0 and not data.report.skipped
    config = write_train_config(data_dir, tmp_path)
    argv = ["train", "--config", str(config), "--set", "data.max_image_pixels=0"]
    assert main(argv) == 2
    assert "data.max_image_pixels: expected a value >= 1, got 0" in one_error_line(capsys, "train")
    # PIL's process-wide limit neither stops a file under ours nor is changed by it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    png = sorted((data_dir / "test").glob("*.png"))[0]
    assert decode_image(png, max_pixels=10_000).size > 100
    assert Image.MAX_IMAGE_PIXELS == 100


def test_bomb_in_predict_and_explain_names_the_option(export_dir, bomb, image, tmp_path, capsys):
    assert main(["predict", "--model", str(export_dir), str(bomb)]) == 2
    err = one_error_line(capsys, "predict")
    assert f"{bomb}: image of 20000 x 20000 = 400,000,000 pixels" in err
    assert "raise --max-image-pixels" in err
    argv = ["predict", "--model", str(export_dir), str(image), "--max-image-pixels"]
    assert main([*argv, "100"]) == 2
    assert "48 x 40 = 1,920 pixels is over the limit of 100" in one_error_line(capsys, "predict")
    assert main([*argv, "0"]) == 2
    assert "--max-image-pixels: expected a pixel count >= 1" in one_error_line(capsys, "predict")
    out = tmp_path / "heat.png"
    assert main(["explain", str(bomb), "--model", str(export_dir), "--out", str(out)]) == 2
    assert "raise --max-image-pixels" in one_error_line(capsys, "explain")


# -- 2. a tampered export.json -------------------------------------------------------------


def _set(key: str, value: object):
    def change(manifest: dict) -> None:
        node = manifest
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value

    return change


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_set("class_names", [1, 2]), "class_names: expected a list of two or more distinct"),
        (_set("class_names", "a,b"), "class_names: expected a list of two or more distinct"),
        (
            _set("class_names", ["a", "b", "c"]),
            "class_names: expected 2 names, one per output of model.jax_export",
        ),
        (_set("input.shape", ["batch", 16, 8, 1]), 'input.shape: expected ["batch", H, H, C]'),
        (_set("input.shape", "16x16"), 'input.shape: expected ["batch", H, H, C]'),
        (
            _set("input.shape", ["batch", 32, 32, 1]),
            'input.shape: expected the input of model.jax_export, ["batch", 16, 16, 1]',
        ),
        (lambda m: m.pop("input"), 'input: expected an object with "shape"'),
        (lambda m: m.pop("version"), "version: expected a format version number, got nothing"),
        ("{not json", "export.json: not valid JSON (Expecting property name"),
        ("[1, 2]", "export.json: expected a JSON object, got [1, 2]"),
    ],
    ids=[
        "classes-not-strings",
        "classes-not-a-list",
        "class-count",
        "shape-not-square",
        "shape-not-a-list",
        "shape-disagrees",
        "input-missing",
        "version-missing",
        "invalid-json",
        "not-an-object",
    ],
)
def test_tampered_export_json_names_the_key(export_dir, image, tmp_path, capsys, tamper, expected):
    tampered = tmp_path / "export"
    shutil.copytree(export_dir, tampered)
    manifest_path = tampered / "export.json"
    if isinstance(tamper, str):
        manifest_path.write_text(tamper)
    else:
        manifest = json.loads(manifest_path.read_text())
        tamper(manifest)
        manifest_path.write_text(json.dumps(manifest))
    assert main(["predict", "--model", str(tampered), str(image)]) == 2
    err = one_error_line(capsys, "predict")
    assert f"{manifest_path}: " in err and expected in err, err


def test_untampered_export_still_predicts(export_dir, image, capsys):
    assert main(["predict", "--model", str(export_dir), str(image), "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
    assert set(prediction["probabilities"]) == {"a", "b"}


# -- 3. read-only workdirs and a full disk -------------------------------------------------

# Runs `covidnet` commands as an unprivileged user: as root (for whom permissions do not
# stop writes) it drops to uid/gid 65534 first, after importing what the commands import
# (the interpreter may live where that user cannot read). Prints [[status, stderr], ...].
_AS_UNPRIVILEGED = textwrap.dedent(
    """
    import contextlib, io, json, os, sys
    import covidnet_jax.checkpointing, covidnet_jax.config, covidnet_jax.evaluate
    import covidnet_jax.disk, covidnet_jax.train, search.cli
    search.cli.build_parser()  # imports every command module
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = search.cli.main(argv)
        results.append([status, err.getvalue()])
    print(json.dumps(results))
    """
)

_SEARCH_EXPERIMENT = {
    "model": {"arch": "tiny"},
    "data": {"covidx_dir": "covidx", "resolution": 32, "channels": 1},
    "train": {"batch_size": 4, "eval_every": 2},
    "search": {
        "space": {"stage_depths": [[1, 2], [1, 1]]},
        "requirements": {"min_accuracy": 0.0},
        "strategy": {"name": "random"},
        "budget": {"max_trials": 2, "rungs": [2], "final_steps": 2},
    },
}


@pytest.fixture()
def shared_dir():
    """A folder an unprivileged user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="covidnet-bad-inputs-"))
    path.chmod(0o755)
    yield path
    for sub, _dirs, _files in os.walk(path):
        os.chmod(sub, 0o755)
    shutil.rmtree(path)


def test_read_only_workdir_fails_up_front_naming_it(shared_dir, data_dir):
    train_config = write_train_config(data_dir, shared_dir)
    search_config = shared_dir / "search.yaml"
    search_config.write_text(json.dumps(_SEARCH_EXPERIMENT))
    locked = shared_dir / "locked"
    run = locked / "run"
    with Checkpoints(run / "checkpoints", keep_latest=1, keep_best=0) as checkpoints:
        checkpoints.save(2, {"w": np.zeros(2, np.float32)}, metadata={})  # a run to evaluate
    for folder, _dirs, files in os.walk(locked):  # readable, not writable, by anyone
        os.chmod(folder, 0o555)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
    commands = [
        ["train", "--config", str(train_config), "--workdir", str(run), "--no-progress"],
        ["evaluate", "--workdir", str(run)],
        ["search", "--config", str(search_config), "--workdir", str(locked / "new")],
    ]
    env = {**os.environ, "HOME": str(shared_dir), "XDG_CACHE_HOME": str(shared_dir / "xdg")}
    result = subprocess.run(
        [sys.executable, "-c", _AS_UNPRIVILEGED, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=shared_dir,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (train, evaluate, search) = json.loads(result.stdout.splitlines()[-1])
    for (status, err), command in zip(
        (train, evaluate, search), ("train", "evaluate", "search"), strict=True
    ):
        assert status == 2 and err.count("\n") == 1, err
        assert err.startswith(f"covidnet {command}: error: "), err
        assert "--workdir is not writable" in err and "permission denied" in err, err
    assert f"{run}: --workdir is not writable (permission denied)" in train[1]
    assert f"{run}: --workdir is not writable (permission denied)" in evaluate[1]
    new = locked / "new"
    assert f"{new}: --workdir is not writable ({locked}: permission denied)" in search[1]
    assert [p.name for p in run.iterdir()] == ["checkpoints"], "nothing was written"


def test_ensure_writable_names_what_is_wrong(tmp_path, monkeypatch):
    assert ensure_writable(tmp_path / "a" / "b", "--workdir") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == [], "the probe is removed"
    assert ensure_writable(tmp_path / "c" / "d", "--workdir", create=False)
    assert not (tmp_path / "c").exists(), "create=False creates nothing"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiskError, match="file: --out is not a folder; choose another --out"):
        ensure_writable(tmp_path / "file", "--out")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(DiskError) as err:
        ensure_writable(tmp_path, "--workdir")
    assert str(err.value) == (
        f"{tmp_path}: --workdir is not writable (no space left on device); free some space "
        "or choose another --workdir"
    )


def disk_full_error(shape: str, checkpoints: Path) -> BaseException:
    """A full disk while Orbax writes step 4 into `checkpoints`, as each layer reports it."""
    step = checkpoints / "4.orbax-checkpoint-tmp"
    if shape == "oserror":
        return OSError(errno.ENOSPC, "No space left on device", str(step / "meta" / "metadata"))
    if shape == "chained":  # re-raised by a background thread's future
        wrapped = RuntimeError("Save Finalize thread (save_finalize) failed.")
        wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(step / "x"))
        return wrapped
    # TensorStore's error: the errno only in the text (as seen on a full tmpfs).
    db = step / "state.orbax-checkpoint-tmp" / "ocdbt.process_0"
    return ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{db}/": '
        f'Failed writing: "{db}/d/50638c": Failed to write 5378048 bytes to file 4: No space '
        "left on device [os_error_code='28']"
    )


@pytest.mark.parametrize("shape", ["oserror", "chained", "tensorstore"])
def test_full_disk_while_writing_is_one_line(data_dir, tmp_path, monkeypatch, capsys, shape):
    checkpoints = tmp_path / "run" / "checkpoints"

    def full_disk(*args, **kwargs):
        raise disk_full_error(shape, checkpoints)

    # The first write of `covidnet train` (the preprocessed-image cache): no training needed.
    monkeypatch.setattr(cache_lib, "write_entry", full_disk)
    config = write_train_config(data_dir, tmp_path)
    argv = ["train", "--config", str(config), "--workdir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = one_error_line(capsys, "train")
    assert err.endswith(
        f": {checkpoints}: no space left on device; free some space or use another location\n"
    ), err


def test_other_os_errors_keep_their_traceback(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "somewhere")

    monkeypatch.setattr(cache_lib, "write_entry", broken)
    config = write_train_config(data_dir, tmp_path)
    with pytest.raises(OSError, match="Input/output error"):
        main(["train", "--config", str(config), "--workdir", str(tmp_path / "run")])


def test_failed_checkpoint_save_keeps_the_previous_step(tmp_path, caplog):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = tmp_path / "checkpoints"
    with Checkpoints(directory, keep_latest=2, keep_best=0) as checkpoints:
        checkpoints.save(2, {"w": jnp.arange(4.0)}, metadata={"step": 2})

    async def disk_full(self, item, path):  # the JSON item's write, in Orbax's thread
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "metadata"))

    handler = ocp.handlers.JsonCheckpointHandler
    assert hasattr(handler, "_save_fn"), "Orbax changed: find another write to fail"
    with (
        pytest.MonkeyPatch.context() as patch,
        quiet_disk_failures(),
        pytest.raises(OSError) as failed,
    ):
        patch.setattr(handler, "_save_fn", disk_full)
        with Checkpoints(directory, keep_latest=2, keep_best=0) as checkpoints:
            checkpoints.save(4, {"w": jnp.zeros(4)}, metadata={"step": 4})
            checkpoints.wait()
    message = disk_failure(failed.value)
    assert (
        message == f"{directory}: no space left on device; free some space or use another location"
    )
    noisy = [
        r for r in caplog.records if r.name in ("absl", "asyncio") and r.levelno >= logging.ERROR
    ]
    assert not noisy, "Orbax's reports of the failed write are dropped"
    with Checkpoints.open_existing(tmp_path) as checkpoints:
        assert checkpoints.steps() == [2]
        np.testing.assert_array_equal(checkpoints.restore_arrays()["w"], np.arange(4.0))
        assert checkpoints.read_metadata() == {"step": 2}


def test_disk_failure_leaves_other_errors_alone():
    assert disk_failure(ValueError("shapes (3,) and (4,) do not match")) is None
    assert disk_failure(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    read_only = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    assert disk_failure(read_only) == "/mnt/ro/run: read-only file system; use another location"
