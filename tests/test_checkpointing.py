"""Orbax checkpoints: round trip with optimizer state, retention, crash safety, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covidnet_jax import parallel
from covidnet_jax.checkpointing import Checkpoints, find_checkpoint_dir
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
    moments = state.opt_state._replace(
        count=jnp.int32(3),
        mu=jax.tree.map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), state.opt_state.mu
        ),
        nu=jax.tree.map(
            lambda x: jnp.asarray(rng.random(size=x.shape), x.dtype), state.opt_state.nu
        ),
    )
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
    mu = jax.tree.leaves(restored.opt_state.mu)
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
    with pytest.raises(CheckpointError, match="no checkpoint at step 7; steps: 1"):
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
