"""Orbax checkpoints: round trip with optimizer state, retention, crash safety (kills during
saves and deletions, half-deleted steps), copying a run, errors."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from covidnet_jax import checkpointing, parallel
from covidnet_jax.checkpointing import (
    TRASH_DIRNAME,
    Checkpoints,
    copy_finished,
    find_checkpoint_dir,
    finished_steps,
    is_finished_step,
)
from covidnet_jax.errors import CheckpointError
from covidnet_jax.steps import StepFunctions, StepSettings


class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def _trained_state():
    # A state as after some training, without compiling a step: distinct non-zero Adam
    # moments and step count, so a round trip that dropped them would show.
    model = Net(rngs=nnx.Rngs(0))
    mesh = parallel.make_mesh()
    fns = StepFunctions.for_model(model, key="ckpt-net", settings=StepSettings(), mesh=mesh)
    state = fns.init_state(model)
    rng = np.random.default_rng(0)
    # optax.tree.set/get find the Adam moments inside optax's nested optimizer state.
    moments = optax.tree.set(
        state.opt_state,
        mu=jax.tree.map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
            optax.tree.get(state.opt_state, "mu"),
        ),
        nu=jax.tree.map(
            lambda x: jnp.asarray(rng.random(size=x.shape), x.dtype),
            optax.tree.get(state.opt_state, "nu"),
        ),
    )._replace(count=jnp.int32(3))
    return model, fns, state.replace(step=jnp.int32(3), opt_state=moments)


def test_round_trip_includes_optimizer_state_and_metadata(tmp_path):
    model, fns, state = _trained_state()
    state = state.replace(lr_scale=jnp.float32(0.49))
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(3, state, metadata={"spec_hash": "abc", "plateau": {"num_bad": 2}})
    restored, meta = Checkpoints.open_existing(tmp_path).restore(fns.abstract_state(model))
    assert meta == {"spec_hash": "abc", "plateau": {"num_bad": 2}}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu = jax.tree.leaves(optax.tree.get(restored.opt_state, "mu"))
    assert any(float(jnp.abs(x).sum()) > 0 for x in mu), "Adam moments were not saved"
    assert int(restored.opt_state.count) == 3 and int(restored.step) == 3
    assert float(restored.lr_scale) == pytest.approx(0.49)


def test_keeps_latest_and_best(tmp_path):
    state = {"x": jnp.zeros(3)}
    with Checkpoints(tmp_path, keep_latest=2, keep_best=1) as ckpts:
        for step, value in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, 0.3)]:
            ckpts.save(step, state, metadata={}, metrics={"selection": value})
        ckpts.wait()
        assert ckpts.steps() == [2, 4, 5]
        assert ckpts.best_step() == 2 and ckpts.latest_step() == 5
        assert ckpts.metrics(2) == {"selection": 0.9}


def test_no_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpoints.open_existing(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such directory"):
        find_checkpoint_dir(tmp_path / "missing")
    with Checkpoints(tmp_path / "one") as ckpts:
        ckpts.save(1, {"x": jnp.zeros(1)}, metadata={})
    with pytest.raises(CheckpointError, match="no checkpoint at step 7; finished steps: 1"):
        Checkpoints.open_existing(tmp_path / "one").read_metadata(7)


def test_half_written_save_is_ignored_and_cleaned(tmp_path):
    target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpoints(tmp_path) as ckpts:
        ckpts.save(1, {"x": jnp.full(4, 1.0)}, metadata={"step": 1})
        ckpts.save(2, {"x": jnp.full(4, 2.0)}, metadata={"step": 2})
    # What a process killed in the middle of saving step 3 leaves behind.
    partial = tmp_path / "3.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00truncated")
    reader = Checkpoints.open_existing(tmp_path)
    assert reader.latest_step() == 2
    state, meta = reader.restore(target)
    np.testing.assert_array_equal(np.asarray(state["x"]), np.full(4, 2.0))
    assert meta == {"step": 2}
    with Checkpoints(tmp_path) as writer:  # a resumed run saves step 3 again
        writer.save(3, {"x": jnp.full(4, 3.0)}, metadata={"step": 3})
    assert not partial.exists()
    state, meta = Checkpoints.open_existing(tmp_path).restore(target)
    assert meta == {"step": 3} and float(state["x"][0]) == 3.0


_SAVER = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from covidnet_jax.checkpointing import Checkpoints
    ckpts = Checkpoints(sys.argv[1], keep_latest=3, keep_best=0, async_save=False)
    for step in range(1, 1000):
        print("saving", step, flush=True)
        ckpts.save(step, {"x": jnp.full((4_000_000,), float(step))}, metadata={"step": step})
    """
)


def test_kill_9_during_save_leaves_a_restorable_checkpoint(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={"JAX_PLATFORMS": "cpu", **_env()},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "saving 4":
                break
        time.sleep(0.05)  # inside the save of step 4 (16 MB)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    reader = Checkpoints.open_existing(tmp_path)
    latest = reader.latest_step()
    assert latest is not None and latest >= 3
    target = {"x": jax.ShapeDtypeStruct((4_000_000,), jnp.float32)}
    state, meta = reader.restore(target)
    assert meta == {"step": latest}
    assert float(state["x"][0]) == float(latest) and float(state["x"][-1]) == float(latest)


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_restore_into_a_different_model_is_a_checkpoint_error(tmp_path):
    with Checkpoints(tmp_path) as ckpts:
        ckpts.save(1, {"x": jnp.zeros(4)}, metadata={})
    with pytest.raises(CheckpointError, match="does not match this model"):
        Checkpoints.open_existing(tmp_path).restore({"x": jax.ShapeDtypeStruct((5,), jnp.float32)})


def test_readers_cannot_save(tmp_path):
    with Checkpoints(tmp_path) as ckpts:
        ckpts.save(1, {"x": jnp.zeros(1)}, metadata={})
    with pytest.raises(RuntimeError, match="read-only"):
        Checkpoints.open_existing(Path(tmp_path)).save(2, {"x": jnp.zeros(1)}, metadata={})


# --- finished steps, deletion through the trash, copying a run ---------------------------

_SIZE = 20_000  # floats per array: large enough for OCDBT to keep them in data files


def _arrays(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "w": jnp.asarray(rng.normal(size=_SIZE), jnp.float32),
        "b": {"c": jnp.full((7,), float(step), jnp.float32)},
    }


_TARGET = {
    "w": jax.ShapeDtypeStruct((_SIZE,), jnp.float32),
    "b": {"c": jax.ShapeDtypeStruct((7,), jnp.float32)},
}


def _save_steps(directory: Path, steps: list[int], **kwargs: Any) -> None:
    with Checkpoints(directory, keep_latest=10, keep_best=0, async_save=False, **kwargs) as c:
        for step in steps:
            c.save(step, _arrays(step), metadata={"step": step})


def _assert_restores(ckpts: Checkpoints, step: int) -> None:
    state, meta = ckpts.restore(_TARGET, step)
    assert meta == {"step": step}
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_arrays(step)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


# What a kill during an in-place deletion (older versions, or Orbax without todelete_subdir)
# can leave: any subset of a step's files. Each pattern names the files removed.
_HALF_DELETIONS = {
    "data files": lambda d: [p for p in _files(d) if p.parent.name == "d"],
    "one data file": lambda d: [max((p for p in _files(d) if p.parent.name == "d"), key=_size)],
    "ocdbt manifest": lambda d: [d / "state" / "manifest.ocdbt"],
    "tree metadata": lambda d: [d / "state" / "_METADATA"],
    "meta item": lambda d: [d / "meta" / "metadata"],
    "step metadata": lambda d: [d / "_CHECKPOINT_METADATA"],
    "all but step metadata": lambda d: [p for p in _files(d) if p.name != "_CHECKPOINT_METADATA"],
}


def _size(path: Path) -> int:
    return path.stat().st_size


@pytest.mark.parametrize("what", sorted(_HALF_DELETIONS))
def test_half_deleted_step_is_not_listed_is_removed_and_the_previous_restores(tmp_path, what):
    _save_steps(tmp_path, [1, 2])
    half = tmp_path / "2"
    assert is_finished_step(half)
    for path in _HALF_DELETIONS[what](half):
        path.unlink()
    assert not is_finished_step(half)
    assert finished_steps(tmp_path) == [1] and find_checkpoint_dir(tmp_path) == tmp_path
    with Checkpoints.open_existing(tmp_path) as reader:
        assert reader.steps() == [1] and reader.latest_step() == 1
        assert reader.selected_step() == 1
        _assert_restores(reader, 1)
    assert half.is_dir(), "a read-only open deleted something"
    with Checkpoints(tmp_path, keep_latest=3, keep_best=0) as writer:
        assert not half.exists() and not (tmp_path / TRASH_DIRNAME).exists()
        assert writer.steps() == [1]
        writer.save(2, _arrays(2), metadata={"step": 2})  # the step number is free again
    with Checkpoints.open_existing(tmp_path) as reader:
        assert reader.steps() == [1, 2]
        _assert_restores(reader, 2)


def test_unfinished_or_absent_step_is_a_one_line_error_also_for_evaluate(tmp_path):
    from covidnet_jax.evaluate import load_trained

    workdir = tmp_path / "run"
    _save_steps(workdir / "checkpoints", [1, 2, 3])
    (workdir / "checkpoints" / "2" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointError) as err:
        load_trained(workdir, step=2)  # the path of `covidnet evaluate --step 2`
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{workdir / 'checkpoints'}: step 2 is unfinished (half-written or half-deleted); "
        "finished steps: 1, 3"
    )
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 9; finished steps: 1, 3$"):
        load_trained(workdir, step=9)


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_renames_whole_steps_into_the_trash_and_empties_it(
    tmp_path, monkeypatch, async_save
):
    seen: list[tuple[str, bool]] = []  # (trash entry, complete step) at each emptying
    empty = checkpointing._empty_trash

    def recording(directory: Path) -> None:
        trash = directory / TRASH_DIRNAME
        if trash.exists():
            seen.extend((p.name, is_finished_step(p)) for p in sorted(trash.iterdir()))
        empty(directory)

    monkeypatch.setattr(checkpointing, "_empty_trash", recording)
    with Checkpoints(tmp_path, keep_latest=1, keep_best=0, async_save=async_save) as ckpts:
        for step in range(1, 5):
            ckpts.save(step, _arrays(step), metadata={"step": step})
        ckpts.wait()
        assert ckpts.steps() == [4] and not (tmp_path / TRASH_DIRNAME).exists()
    assert sorted(seen) == [("1", True), ("2", True), ("3", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]


def test_trash_and_temporary_saves_are_never_steps(tmp_path):
    _save_steps(tmp_path, [1])
    trash = tmp_path / TRASH_DIRNAME
    trash.mkdir()
    shutil.copytree(tmp_path / "1", trash / "5")  # a complete step, renamed away
    shutil.copytree(tmp_path / "1", tmp_path / "6.orbax-checkpoint-tmp-1234")
    (tmp_path / "7").write_text("not a directory")
    shutil.copytree(tmp_path / "1", tmp_path / "08")  # not a name Orbax writes
    for path in (trash, tmp_path / "6.orbax-checkpoint-tmp-1234", tmp_path / "7", tmp_path / "08"):
        assert not is_finished_step(path)
    assert finished_steps(tmp_path) == [1]
    with Checkpoints.open_existing(tmp_path) as reader:
        assert reader.steps() == [1]
        assert not {5, 6} & set(reader._manager.all_steps()), "Orbax lists trash or tmp"
    assert (trash / "5").is_dir()
    Checkpoints(tmp_path).close()  # a writable open empties the trash
    assert not trash.exists() and (tmp_path / "08").is_dir() and (tmp_path / "7").is_file()


def test_copy_finished_copies_finished_steps_only(tmp_path):
    src = tmp_path / "trials" / "3"
    ckpt = src / "checkpoints"
    _save_steps(ckpt, [1, 2, 3])
    (ckpt / "3" / "_CHECKPOINT_METADATA").unlink()  # half-deleted
    shutil.copytree(ckpt / "1", ckpt / "4.orbax-checkpoint-tmp-99")  # an unfinished save
    (ckpt / TRASH_DIRNAME).mkdir()
    shutil.copytree(ckpt / "1", ckpt / TRASH_DIRNAME / "0")
    (src / "metrics.jsonl").write_text("{}\n")
    (src / "checkpoint").mkdir()
    (src / "checkpoint" / "step").write_text("5")
    dst = tmp_path / "trials" / "8"
    stale = tmp_path / "trials" / ".8.copying"  # an interrupted earlier copy
    stale.mkdir()
    (stale / "junk").write_text("x")

    copy_finished(src, dst)

    assert not stale.exists()
    assert sorted(p.name for p in (dst / "checkpoints").iterdir()) == ["1", "2"]
    assert (dst / "metrics.jsonl").read_text() == "{}\n"
    assert (dst / "checkpoint" / "step").read_text() == "5"
    assert finished_steps(dst / "checkpoints") == [1, 2]
    with Checkpoints.open_existing(dst) as reader:
        _assert_restores(reader, 1)
        _assert_restores(reader, 2)
    with pytest.raises(FileExistsError):
        copy_finished(src, dst)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["1", "2", "3", "4.orbax-checkpoint-tmp-99", TRASH_DIRNAME]
    ), "the source changed"


_RETAINER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np, jax.numpy as jnp
    from covidnet_jax.checkpointing import Checkpoints

    # Every file removal (Orbax's, ours) takes 3 ms: deletions last long enough for
    # random kills to land inside them (in place, this leaves half-deleted steps).
    _unlink = os.unlink
    def slow_unlink(*args, **kwargs):
        time.sleep(0.003)
        _unlink(*args, **kwargs)
    os.unlink = slow_unlink
    directory, async_save = sys.argv[1], sys.argv[2] == "async"
    ckpts = Checkpoints(directory, keep_latest=1, keep_best=0, async_save=async_save)
    start = (ckpts.latest_step() or 0) + 1
    print("ready", flush=True)
    for step in range(start, start + 10_000):
        rng = np.random.default_rng(step)
        state = {f"w{i}": jnp.asarray(rng.normal(size=20_000), jnp.float32) for i in range(8)}
        state["step"] = jnp.full((3,), float(step), jnp.float32)
        ckpts.save(step, state, metadata={"step": step})
        print("latest", ckpts.latest_step(), flush=True)  # the latest finished step
    """
)


def _retained(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    state = {f"w{i}": rng.normal(size=20_000).astype(np.float32) for i in range(8)}
    state["step"] = np.full((3,), float(step), np.float32)
    return state


def test_kill_9_during_retention_leaves_only_restorable_steps(tmp_path):
    # keep_latest=1: every save also deletes the previous step, so kills at random moments
    # land in saves, in Orbax's deletions and in the emptying of the trash.
    rng = random.Random(20240601)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _retained(1))
    latest_seen = 0
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _RETAINER, str(tmp_path), ("sync", "async")[round_ % 2]],
            stdout=subprocess.PIPE,
            text=True,
            env={"JAX_PLATFORMS": "cpu", **_env()},
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # from the first moment a finished step exists
                if line.startswith("latest ") and line.split()[1] != "None":
                    break
            time.sleep(rng.uniform(0.0, 1.0))
            proc.kill()
            finished = [int(w) for _, w in map(str.split, [line, *proc.stdout]) if w != "None"]
        finally:
            proc.wait(timeout=60)
        with Checkpoints(tmp_path, keep_latest=1, keep_best=0) as ckpts:  # a resumed run
            steps = ckpts.steps()
            assert steps and steps[-1] >= max(finished), f"round {round_}: finished step lost"
            for step in steps:
                state, meta = ckpts.restore(target, step)
                assert meta == {"step": step}
                for key, want in _retained(step).items():
                    np.testing.assert_array_equal(np.asarray(state[key]), want)
            latest_seen = steps[-1]
        names = sorted(p.name for p in tmp_path.iterdir())
        assert TRASH_DIRNAME not in names
        assert [n for n in names if n.isdigit()] == [str(s) for s in steps], names
    assert latest_seen >= 3, "the saver never got far enough to delete anything"
