"""Input pipeline throughput: the host path against the device path, and what training sees.

Writes a small synthetic data set (512 px source images) and loads it through `load_data` at
each resolution (preprocessing is cached, so it is not timed). Three measurements, each with
its baseline from the same run:

1. **Host side** at 64, 224 and 480 px, augmentation and COVID-19 re-balancing on, one host
   thread: the host path (`augment_on: host`, NumPy augmentation; the baseline) against the
   device path's host work (indices, uint8 gather, parameter draw, `jax.device_put` waited
   for), and the device path's whole delivery (`Data.train_batches`: prefetch thread plus the
   jitted augmentation, waited for; on this CPU "device" is the same cores).
2. **Augmentation as a share of a training step** at 224 and 480 px: the jitted
   augmentation of one batch (already on the device) against one training step of `--arch`
   (the library's jitted, donated `train_step`) on a fixed batch.
3. **End to end**: training images/s fed real batches from `Data.train_batches` (device
   path) against the same compiled step fed one fixed device batch, in alternating windows
   so that load on a shared machine hits both alike: the ratio of the medians, the ratio of
   the best windows, and the spread of the fixed-batch windows (max / min), which says how
   much a shared machine moved them.

Prints Markdown tables for bench/README.md.

Usage:
    python bench/input_pipeline.py --seconds 3
    python bench/input_pipeline.py --seconds 2 --arch tiny --train-sizes 224:8 --no-host
    python bench/input_pipeline.py --workers 0 2 --no-train   # also Grain workers, host path
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidnet_jax.data import DataConfig, load_data, write_synthetic_dataset
from covidnet_jax.data.device_augment import model_batch

# (resolution, batch size, channels): the quickstart search, the paper's 224 px and 480 px,
# and the 480 px experiment's batch of 64.
SETTINGS = ((64, 32, 1), (224, 8, 3), (480, 4, 3), (480, 64, 3))


def rate(produce, batch: int, seconds: float) -> float:
    """Images per second of `produce()` (one batch per call) over about `seconds`."""
    for _ in range(2):
        produce()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        produce()
        count += 1
    return count * batch / (time.perf_counter() - started)


def host_side(data_host, data_device, batch: int, seconds: float, workers: list[int]):
    """Rows (path, images/s) for one setting; the first row is the baseline."""
    rows = []
    for w in workers:
        d = (
            data_host
            if w == 0
            else load_data(dataclasses.replace(data_host.config, workers=w), seed=0)
        )
        iterator = d.train_batches(batch, seed=0)
        rows.append((f"host path, NumPy, workers {w}", rate(iterator.__next__, batch, seconds)))
        if hasattr(iterator, "close"):
            iterator.close()
    maker = data_device.batch_maker(batch, seed=0)
    steps = iter(range(1 << 30))

    def host_work():
        sent = jax.device_put(maker.host.host_batch(next(steps)), maker.sharding)
        jax.block_until_ready(sent)

    rows.append(
        ("device path, host work (gather + draw + device_put)", rate(host_work, batch, seconds))
    )
    iterator = data_device.train_batches(batch, seed=0)
    rows.append(
        (
            "device path, delivered (prefetch + jitted augmentation)",
            rate(lambda: jax.block_until_ready(next(iterator)), batch, seconds),
        )
    )
    iterator.close()
    return rows


class Trainer:
    """One compiled train step of `arch` at a data set's resolution, and its inputs."""

    def __init__(self, data, arch: str, batch: int) -> None:
        from flax import nnx

        from covidnet_jax import parallel
        from covidnet_jax.models import build_model
        from covidnet_jax.presets import load_spec
        from covidnet_jax.steps import Hyper, StepFunctions, StepSettings

        spec = load_spec(arch).with_input_size(data.resolution)
        spec = spec.with_head_classes(tuple(data.class_names))
        model = build_model(spec, rngs=nnx.Rngs(0))
        self.mesh = parallel.make_mesh()
        self.shard = parallel.shard_batch
        fns = StepFunctions.for_model(
            model, key=(spec.content_hash(), "bench-input"), settings=StepSettings(), mesh=self.mesh
        )
        self.hyper = jax.device_put(
            Hyper.create(learning_rate=2e-4, weight_decay=0.0, class_weights=np.ones(3), seed=0),
            parallel.replicated(self.mesh),
        )
        self.state = fns.init_state(model)
        self.maker = data.batch_maker(batch, seed=0)
        self.sent = jax.device_put(self.maker.host.host_batch(0), self.maker.sharding)
        self.fixed = model_batch(self.sent, channels=data.channels)
        started = time.perf_counter()
        self.step, _ = fns.compile_train(self.state, self.fixed, self.hyper)
        self.compile_s = time.perf_counter() - started
        self.batch = batch

    def run(self, batches, steps: int) -> float:
        """Seconds for `steps` training steps on `next(batches)`, waited for at the end."""
        started = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(
                self.state, self.shard(next(batches), self.mesh), self.hyper
            )
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - started

    def augment_seconds(self, seconds: float) -> float:
        """Seconds per batch of the jitted augmentation alone (input already on the device)."""
        channels = self.fixed["image"].shape[-1]
        jax.block_until_ready(model_batch(self.sent, channels=channels))
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or count < 3:
            jax.block_until_ready(model_batch(self.sent, channels=channels))
            count += 1
        return (time.perf_counter() - started) / count


def training(data, arch: str, batch: int, seconds: float, rounds: int, window: int) -> dict:
    trainer = Trainer(data, arch, batch)
    fixed = iter(lambda: trainer.fixed, None)
    real = data.train_batches(batch, seed=0)
    trainer.run(fixed, 1)  # warm: first runs allocate
    trainer.run(real, 1)
    fixed_s, real_s = [], []
    for _ in range(rounds):
        fixed_s.append(trainer.run(fixed, window))
        real_s.append(trainer.run(real, window))
    real.close()
    step_s = statistics.median(fixed_s) / window
    return {
        "compile_s": trainer.compile_s,
        "augment_ms": 1000 * trainer.augment_seconds(seconds),
        "step_ms": 1000 * step_s,
        "fixed": window * batch / statistics.median(fixed_s),
        "real": window * batch / statistics.median(real_s),
        "best_ratio": min(fixed_s) / min(real_s),
        "spread": max(fixed_s) / min(fixed_s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="host-path workers")
    parser.add_argument("--arch", default="covidnet-c", help="preset trained in parts 2 and 3")
    parser.add_argument("--train-sizes", default="224:8,480:4", help="resolution:batch,...")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per size")
    parser.add_argument("--window", type=int, default=2, help="training steps per window")
    parser.add_argument("--no-train", action="store_true", help="host side only")
    parser.add_argument("--no-host", action="store_true", help="training parts only")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-input-"))
    write_synthetic_dataset(tmp / "synth", per_class=24, image_size=512, seed=0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f}, "
        f"Python {platform.python_version()}, JAX {jax.__version__} on {jax.devices()[0].platform}"
    )

    def data_at(resolution: int, channels: int, on: str):
        config = DataConfig(
            covidx_dir=str(tmp / "synth"),
            resolution=resolution,
            channels=channels,
            rebalance_class="COVID-19",
            cache_dir=str(tmp / "cache"),
            augment_on=on,
        )
        return load_data(config, seed=0)

    print("\n| resolution | batch | channels | path | images/s | x host path |")
    print("|---|---|---|---|---|---|")
    for resolution, batch, channels in () if args.no_host else SETTINGS:
        rows = host_side(
            data_at(resolution, channels, "host"),
            data_at(resolution, channels, "device"),
            batch,
            args.seconds,
            args.workers,
        )
        base = rows[0][1]
        for name, value in rows:
            print(
                f"| {resolution} | {batch} | {channels} | {name} | {value:,.0f} | "
                f"{value / base:.1f} |",
                flush=True,
            )

    if args.no_train:
        return 0
    print(
        f"\n| {args.arch} res x batch | compile (s) | step (ms) | augmentation (ms) | share "
        "| fixed batch img/s | real batches img/s | real / fixed (medians) | (best) | "
        "fixed spread |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for item in args.train_sizes.split(","):
        resolution, _, batch = item.partition(":")
        data = data_at(int(resolution), 3, "device")
        r = training(data, args.arch, int(batch), args.seconds, args.rounds, args.window)
        print(
            f"| {resolution} x {batch} | {r['compile_s']:.0f} | {r['step_ms']:,.0f} | "
            f"{r['augment_ms']:.1f} | {r['augment_ms'] / r['step_ms']:.1%} | {r['fixed']:.2f} | "
            f"{r['real']:.2f} | {r['real'] / r['fixed']:.3f} | {r['best_ratio']:.3f} | "
            f"{r['spread']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
