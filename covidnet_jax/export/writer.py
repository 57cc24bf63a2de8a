"""Writing an export folder: the StableHLO artifact, spec, recipe, card and inference state.

`export_inference` lowers the inference function with `jax.export`; `write_export` assembles
the whole folder beside its destination and renames it into place; `export_training_run`
does both for the best checkpoint of a training workdir.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from covidnet_jax.export.inference_state import save_inference_state
from covidnet_jax.export.layout import (
    CARD_FILE,
    CHECKPOINT_DIR,
    DEFAULT_PLATFORMS,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST_FILE,
    RECIPE_FILE,
    SPEC_FILE,
    STABLEHLO_FILE,
    ExportError,
)
from covidnet_jax.export.model_card import (
    ModelCard,
    RequirementCheck,
    card_metrics,
    describe_data,
    describe_training,
    render_model_card,
)
from covidnet_jax.export.recipe import preprocessing_recipe
from covidnet_jax.typed_yaml import to_dict


def _inference_fn(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """A pure function images -> probabilities with the model's state closed over, so the
    exported artifact carries its weights as constants."""
    graphdef, state = nnx.split(model)

    def infer(images_BxHxWxC: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        model.eval()
        logits_BxK = model(images_BxHxWxC)
        return jax.nn.softmax(logits_BxK.astype(jnp.float32), axis=-1)

    return infer


def export_inference(
    model: nnx.Module,
    *,
    input_size: int,
    channels: int,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """Exports the inference function with a symbolic batch size.

    Args:
        model: the trained model (used in inference mode; not modified).
        input_size: side length H = W of the model input.
        channels: input channels C.
        platforms: platforms to lower for (e.g. ("cpu", "cuda")).

    Returns:
        The `jax.export.Exported` mapping float32 B x H x W x C to float32 B x K.

    Example:
        >>> exported = export_inference(model, input_size=64, channels=1)
        >>> exported.in_avals
        (ShapedArray(float32[b,64,64,1]),)
    """
    (batch,) = jax.export.symbolic_shape("b")
    args = jax.ShapeDtypeStruct((batch, input_size, input_size, channels), jnp.float32)
    return jax.export.export(jax.jit(_inference_fn(model)), platforms=tuple(platforms))(args)


def write_export(
    model: nnx.Module,
    spec: Any,
    out_dir: str | Path,
    *,
    card: ModelCard,
    save_state: Callable[[Path, nnx.Module], None] | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> Path:
    """Writes a complete export folder (see the module docstring for its files).

    The folder is assembled beside `out_dir` and renamed into place, so a crash never leaves
    a half-written export; an existing export at `out_dir` is replaced.

    Args:
        model: the trained model.
        spec: its architecture spec (`to_json`, `content_hash`, `input_size`,
            `input_channels`, `class_names`).
        out_dir: the export folder to create.
        card: the model card's facts.
        save_state: writes the inference state into a given folder; None for
            `save_inference_state` (an Orbax checkpoint).
        platforms: platforms the StableHLO artifact is lowered for.

    Returns:
        The export folder.

    Raises:
        ExportError: if `out_dir` is a file or a non-empty folder that is not an export.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise ExportError(
            f"{out_dir}: folder is not empty and holds no export; choose another --out"
        )
    if save_state is None:
        save_state = functools.partial(save_inference_state, spec=spec)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    exported = export_inference(
        model, input_size=spec.input_size, channels=spec.input_channels, platforms=platforms
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        (staging / STABLEHLO_FILE).write_bytes(exported.serialize())
        (staging / SPEC_FILE).write_text(spec.to_json() + "\n", encoding="utf-8")
        recipe = preprocessing_recipe(resolution=spec.input_size, channels=spec.input_channels)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        (staging / CARD_FILE).write_text(render_model_card(card), encoding="utf-8")
        save_state(staging / CHECKPOINT_DIR, model)
        manifest = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "name": spec.content_hash(),
            "title": card.title,
            "class_names": list(spec.class_names),
            "input": recipe["input"],
            "output": {"shape": ["batch", len(spec.class_names)], "what": "probabilities"},
            "platforms": list(exported.platforms),
            "jax_version": jax.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": {
                "stablehlo": STABLEHLO_FILE,
                "spec": SPEC_FILE,
                "preprocessing": RECIPE_FILE,
                "checkpoint": CHECKPOINT_DIR,
                "model_card": CARD_FILE,
            },
            "params": card.params,
            "macs": card.macs,
            "metrics": {split: dict(values) for split, values in card.metrics.items()},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def export_training_run(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    title: str | None = None,
    requirements: Sequence[RequirementCheck] = (),
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> Path:
    """Exports a trained model from a training workdir (its best checkpoint by validation).

    Args:
        workdir: a `covidnet train` workdir (a search trial's folder, or `best/train`).
        out_dir: the export folder to create (an existing export there is replaced).
        step: a checkpoint step instead of the best.
        title: the model card's title (default: the spec hash).
        requirements: design requirements and whether they were met, for the card.
        metrics: split -> `EvalMetrics.to_dict()`; default: the checkpoint's validation
            metrics.
        provenance: extra facts for the card (search workdir, trial, ...).
        platforms: platforms the StableHLO artifact is lowered for.

    Returns:
        The export folder.

    Raises:
        CheckpointError: if the workdir holds no checkpoint.
        ExportError: if `out_dir` cannot be written.
    """
    from covidnet_jax.checkpointing import Checkpoints
    from covidnet_jax.cost import activation_bytes, count_cost
    from covidnet_jax.evaluate import load_trained

    trained = load_trained(workdir, step=step)
    if metrics is None:
        with Checkpoints.open_existing(workdir) as checkpoints:
            saved = checkpoints.metrics(trained.step) or {}
        metrics = {"validation": saved["validation"]} if "validation" in saved else {}
    # Host copies: the export closes over plain arrays, not arrays sharded over a mesh.
    params, model_state = jax.device_get((trained.params, trained.model_state))
    model = nnx.merge(trained.fns.graphdef_eval, params, model_state)
    spec = trained.spec
    cost = count_cost(spec)
    card = ModelCard(
        title=title or f"design {spec.content_hash()}",
        spec_summary=spec.summary(),
        class_names=tuple(spec.class_names),
        params=int(cost.params),
        macs=int(cost.macs),
        activation_bytes=activation_bytes(spec, 1, training=False),
        data=describe_data(to_dict(trained.config.data), metrics),
        requirements=tuple(requirements),
        metrics={split: card_metrics(values) for split, values in metrics.items()},
        training=describe_training(to_dict(trained.config), trained.step),
        provenance={
            "training workdir": str(workdir),
            "checkpoint step": trained.step,
            "spec hash": spec.content_hash(),
            **dict(provenance or {}),
        },
    )
    return write_export(model, spec, out_dir, card=card, platforms=platforms)
