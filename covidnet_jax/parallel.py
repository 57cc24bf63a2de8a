"""Data parallelism over the local devices with `jax.sharding`.

One 1-D mesh over all local devices with the axis "batch": parameters, optimizer state and
metrics are replicated; batches are split along their leading axis. `jit` inserts the
gradient all-reduce, and BatchNorm statistics are computed over the global batch, so a
step on N devices equals the single-device step up to float summation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from covidnet_jax.errors import ConfigError

BATCH_AXIS = "batch"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "batch" over `devices` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of values every device holds whole (parameters, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batches: leading axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, *, key: str = "train.batch_size") -> None:
    """Raises ConfigError unless `batch_size` splits evenly over the mesh's devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ConfigError(
            f"{key}: {batch_size} does not split over {devices} devices; "
            f"use a multiple of {devices}"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts a host batch on the devices, split along the leading axis (asynchronous)."""
    sharding = batch_sharding(mesh)
    return {name: jax.device_put(value, sharding) for name, value in batch.items()}
