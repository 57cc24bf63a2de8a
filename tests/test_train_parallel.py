"""Data parallelism: two forced host devices train like one (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from flax import nnx
    from covidnet_jax import parallel
    from covidnet_jax.steps import Hyper, StepFunctions, StepSettings


    class Net(nnx.Module):
        # Conv-BatchNorm-ReLU twice: BatchNorm statistics must be taken over the global
        # batch for two devices to match one. (No BatchNorm bias here feeds straight into
        # another BatchNorm: such a bias has zero exact gradient, and Adam turns the float
        # noise in it into full-size updates that differ between any two programs.)
        def __init__(self, *, rngs):
            self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
            self.norm1 = nnx.BatchNorm(8, rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs)
            self.norm2 = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.norm1(self.conv1(x)))
            x = nnx.relu(self.norm2(self.conv2(x)))
            return self.head(x.mean(axis=(1, 2)))

    final, losses, report = {}, {}, {"devices": len(jax.devices())}
    for n in (1, 2):
        mesh = parallel.make_mesh(jax.devices()[:n])
        model = Net(rngs=nnx.Rngs(0))
        model.train()
        fns = StepFunctions.for_model(model, key="net", settings=StepSettings(), mesh=mesh)
        state = fns.init_state(model)
        hyper = jax.device_put(
            Hyper.create(learning_rate=0.01, weight_decay=0.0, class_weights=np.ones(3), seed=0),
            parallel.replicated(mesh),
        )
        rng = np.random.default_rng(0)
        losses[n] = []
        for _ in range(3):
            host = {
                "image": rng.random((8, 16, 16, 3), dtype=np.float32),
                "label": rng.integers(0, 3, 8).astype(np.int32),
            }
            batch = parallel.shard_batch(host, mesh)
            state, metrics = fns.train_step(state, batch, hyper)
            losses[n].append(float(metrics["loss"]))
        report[f"batch_devices_{n}"] = len(batch["image"].sharding.device_set)
        report[f"param_devices_{n}"] = len(jax.tree.leaves(state.params)[0].sharding.device_set)
        report[f"param_replicated_{n}"] = jax.tree.leaves(state.params)[0].sharding.is_fully_replicated
        final[n] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
    report["max_abs_diff"] = max(
        float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(final[1], final[2])
    )
    report["max_rel_diff"] = max(
        float(np.max(np.abs(a.astype(np.float64) - b) / (np.abs(a) + 1e-3)))
        for a, b in zip(final[1], final[2])
    )
    report["losses"] = losses
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_two_devices_equal_one():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert report["batch_devices_2"] == 2 and report["batch_devices_1"] == 1
    assert report["param_devices_2"] == 2 and report["param_replicated_2"]
    one, two = report["losses"]["1"], report["losses"]["2"]
    assert one == pytest.approx(two, rel=1e-5)
    assert report["max_rel_diff"] < 1e-3, report
