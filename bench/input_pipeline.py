"""Input pipeline throughput: augmented train batches per second at 64, 224 and 480 px.

Writes a small synthetic data set (512 px source images), loads it through `load_data` at each
resolution (preprocessing is cached, so it is not timed) and times `Data.train_batches` with
augmentation and COVID-19 re-balancing, with workers=0 (batches built in the calling thread)
and with Grain worker processes. Prints a Markdown table for bench/README.md.

Usage:
    python bench/input_pipeline.py                  # 64/224/480 px, workers 0 and 2
    python bench/input_pipeline.py --seconds 10 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidnet_jax.data import DataConfig, load_data, write_synthetic_dataset

# (resolution, batch size, channels): the quickstart search, the paper's 224 px and 480 px.
SETTINGS = ((64, 32, 1), (224, 8, 3), (480, 4, 3))


def measure(data, batch: int, seconds: float) -> tuple[float, float, float]:
    """Returns (images per second, first-batch latency in s, batches timed)."""
    started = time.perf_counter()
    iterator = data.train_batches(batch, seed=0)
    next(iterator)
    first = time.perf_counter() - started
    for _ in range(2):  # let worker processes fill their buffers
        next(iterator)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(iterator)
        count += 1
    elapsed = time.perf_counter() - started
    if hasattr(iterator, "close"):
        iterator.close()
    return count * batch / elapsed, first, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-input-"))
    write_synthetic_dataset(tmp / "synth", per_class=24, image_size=512, seed=0)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}"
    )
    print()
    print("| resolution | batch | channels | workers | images/s | ms/batch | first batch (s) |")
    print("|---|---|---|---|---|---|---|")
    for resolution, batch, channels in SETTINGS:
        base = DataConfig(
            covidx_dir=str(tmp / "synth"),
            resolution=resolution,
            channels=channels,
            augment=not args.no_augment,
            rebalance_class="COVID-19",
            cache_dir=str(tmp / "cache"),
        )
        for workers in args.workers:
            data = load_data(dataclasses.replace(base, workers=workers), seed=0)
            rate, first, _ = measure(data, batch, args.seconds)
            print(
                f"| {resolution} | {batch} | {channels} | {workers} | {rate:,.0f} | "
                f"{1000 * batch / rate:.1f} | {first:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
