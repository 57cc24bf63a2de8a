"""The inference state of an export (`checkpoint/`): parameters and BatchNorm statistics.

Saved and restored through `covidnet_jax.checkpointing.Checkpoints` (the only module that
imports Orbax), with the spec as metadata so the folder describes itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx


def _inference_filter() -> nnx.filterlib.Filter:
    # What inference needs: weights and BatchNorm running statistics (not optimizer state,
    # not random-number streams).
    return nnx.Any(nnx.Param, nnx.BatchStat)


def save_inference_state(directory: str | Path, model: nnx.Module, *, spec: Any) -> Path:
    """Saves a model's parameters and BatchNorm statistics as an Orbax checkpoint (step 0).

    Args:
        directory: the checkpoint folder to create.
        model: the trained model.
        spec: its spec (stored as metadata, so the folder describes itself).

    Returns:
        The checkpoint folder.
    """
    from covidnet_jax.checkpointing import Checkpoints

    state = jax.device_get(nnx.to_pure_dict(nnx.state(model, _inference_filter())))
    metadata = {"what": "inference state", "spec": spec.to_dict(), "spec_hash": spec.content_hash()}
    with Checkpoints(directory, keep_latest=1, keep_best=0, async_save=False) as checkpoints:
        # A selection value keeps Orbax's best-step bookkeeping quiet; there is one step.
        checkpoints.save(0, state, metadata=metadata, metrics={"selection": 0.0})
    return Path(directory)


def restore_inference_state(directory: str | Path, spec: Any) -> nnx.Module:
    """Builds the model of `spec` and restores a `save_inference_state` checkpoint into it.

    Args:
        directory: the checkpoint folder.
        spec: the architecture spec.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: if the folder holds no checkpoint or it does not fit the spec.
    """
    from covidnet_jax.checkpointing import Checkpoints
    from covidnet_jax.models import build_model

    # Shapes only: initializing the weights eagerly costs seconds and they are overwritten.
    abstract = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, _inference_filter(), ...)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    with Checkpoints.open_existing(directory) as checkpoints:
        restored, _ = checkpoints.restore(target)
    nnx.replace_by_pure_dict(state, restored)
    if jax.tree.leaves(rest):  # e.g. dropout's random streams: those need real values
        model = build_model(spec, rngs=nnx.Rngs(0))
        nnx.update(model, state)
    else:
        model = nnx.merge(graphdef, state, rest)
    model.eval()
    return model
