"""Portable exports of a trained design, and predicting from them.

An export is a folder:

    export.json          manifest: format version, class names, input and output shapes, files
    model.jax_export     `jax.export` artifact (StableHLO) of the whole inference function:
                         preprocessed float32 batch B x H x W x C in [0, 1] -> class
                         probabilities B x K, any batch size B, lowered for CPU and CUDA
    spec.json            the architecture spec (`covidnet_jax.arch.spec_from_json`)
    preprocessing.json   the preprocessing recipe as data, so any runtime can reproduce it
                         (`preprocessing_recipe`: steps in order with every parameter, the
                         PIL resize call, the bit-depth rule; `recipe_version`)
    checkpoint/          Orbax checkpoint of the inference state (parameters, batch statistics)
    model_card.md        data, requirements and whether they were met, metrics with their
                         split, params/MACs, training recipe, limits

`model.jax_export` runs in a Python process that has only jax (and the `flatbuffers` package
jax needs to read serialized artifacts) installed:

    import jax, numpy as np
    with open("EXPORT/model.jax_export", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    probs_BxK = np.asarray(exported.call(images_BxHxWxC))  # float32 in [0, 1]

Within `covidnet_jax`, one call loads an export and predicts from image files:

Example:
    >>> probs_BxK = predict("runs/quickstart/export", ["a.png", "b.png"])
    >>> load_export("runs/quickstart/export").class_names
    ('normal', 'pneumonia', 'COVID-19')
"""

from __future__ import annotations

import dataclasses
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
import numpy as np
import PIL
from flax import nnx

from covidnet_jax.data.preprocess import (
    BIT_DEPTH_RULE,
    BIT_DEPTH_RULES,
    BITS_MULTIPLE,
    DEFAULT_MAX_IMAGE_PIXELS,
    HIGH_BIT_DEPTH_MODES,
    LEGACY_BIT_DEPTH_RULE,
    MAX_RESOLUTION,
    MIN_BITS,
    MIN_RESOLUTION,
    PIL_LUMA_WEIGHTS_Q16,
    PREPROCESS_VERSION,
    RESIZE_REDUCING_GAP,
    RESIZE_RESAMPLE,
    TOP_CROP_FRACTION,
    preprocess_image,
)
from covidnet_jax.errors import UserError
from covidnet_jax.metrics import EvalMetrics

__all__ = [
    "EXPORT_FORMAT",
    "ExportError",
    "LoadedExport",
    "ModelCard",
    "RequirementCheck",
    "card_metrics",
    "export_inference",
    "export_training_run",
    "load_export",
    "predict",
    "predict_files",
    "preprocessing_recipe",
    "recipe_bit_depth_rule",
    "render_model_card",
    "restore_inference_state",
    "save_inference_state",
    "write_export",
]

EXPORT_FORMAT = "covidnet-jax-export"
EXPORT_VERSION = 1
# Version of the `preprocessing.json` format. 1: steps as names and notes (no version field);
# 2: every detail an independent implementation needs, including the bit-depth rule.
RECIPE_VERSION = 2
MANIFEST_FILE = "export.json"
STABLEHLO_FILE = "model.jax_export"
SPEC_FILE = "spec.json"
RECIPE_FILE = "preprocessing.json"
CARD_FILE = "model_card.md"
CHECKPOINT_DIR = "checkpoint"
# Lowered for both, so one artifact serves CPU and NVIDIA GPU hosts.
DEFAULT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda")


class ExportError(UserError):
    """An export folder is missing, incomplete, or cannot be written where asked."""


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


def preprocessing_recipe(*, resolution: int, channels: int) -> dict[str, Any]:
    """The preprocessing of `covidnet_jax.data.preprocess_image` plus scaling, as data.

    Everything an implementation without this package needs to give the exported function
    the input the model was trained on: the steps in order, with crop rounding, the resize's
    PIL call and parameters, how each kind of file becomes 8-bit grey (the bit-depth rule
    for 16-bit files, luma weights, alpha, palette, EXIF orientation) and the final scaling.
    Machine-readable fields carry the numbers; `pil`, `formula` and `note` fields say the
    same in words or code.

    Args:
        resolution: the model's input side length.
        channels: the model's input channels.

    Returns:
        A JSON-ready mapping: `recipe_version`, `preprocess_version`, `reference`, ordered
        `steps` and the tensor the exported function takes (`input`).
    """
    weights = list(PIL_LUMA_WEIGHTS_Q16)
    return {
        "recipe_version": RECIPE_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        "reference": {
            "implementation": "covidnet_jax.data.preprocess.preprocess_image",
            "pillow_version": PIL.__version__,
            "numpy_version": np.__version__,
        },
        "steps": [
            {
                "op": "decode_grayscale",
                "decoder": "Pillow Image.open; the first frame; pixels in the order stored",
                "exif_orientation": "ignored",
                "color_management": "none (ICC profiles, gAMA and sRGB chunks ignored)",
                "high_bit_depth": {
                    "pil_modes": list(HIGH_BIT_DEPTH_MODES),
                    "rule": BIT_DEPTH_RULE,
                    "bits": {
                        "of": "max(0, maximum of the image).bit_length()",
                        "at_least": MIN_BITS,
                        "round_up_to_multiple_of": BITS_MULTIPLE,
                    },
                    "formula": "clip(rint(v * 255 / (2**bits - 1)), 0, 255)",
                    "arithmetic": "float64",
                    "rounding": "half_to_even",
                    "negative_values": "clipped to 0",
                    "sbit_chunk": "ignored",
                    "note": (
                        "16-bit grey (PNG, TIFF, JPEG 2000) is divided by the full range of "
                        "the bit depth inferred from its maximum (8, 10, 12, 14, 16, ...), "
                        "not by 65535: 12-bit data stored in 16 bits is divided by 4095, and "
                        "an image saved as 16-bit by v * 257 gives back its 8-bit values. "
                        "Exports before recipe_version 2 divided by the image's own maximum "
                        f"({LEGACY_BIT_DEPTH_RULE!r}) when it was over 255."
                    ),
                },
                "other_modes": {
                    "pil": "Image.convert('L')",
                    "rgb_luma": {
                        "weights_q16": weights,
                        "add": 1 << 15,
                        "shift_right": 16,
                        "formula": (
                            f"({weights[0]} * R + {weights[1]} * G + {weights[2]} * B + 32768)"
                            " >> 16 (ITU-R 601-2 luma in Pillow's integer arithmetic)"
                        ),
                    },
                    "alpha": "dropped (not composited onto any background)",
                    "palette": "indices looked up in the palette's RGB, then rgb_luma",
                    "bilevel": "0 -> 0, 1 -> 255",
                    "colour_16_bit": (
                        "Pillow decodes 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits per "
                        "channel (the high byte of each sample), then rgb_luma"
                    ),
                },
                "output": {"dtype": "uint8", "layout": "HxW"},
            },
            {
                "op": "drop_top_rows",
                "fraction": TOP_CROP_FRACTION,
                "rounding": "floor",
                "rows": "floor(height * 8 / 100) rows from the top (integer arithmetic)",
            },
            {
                "op": "center_square_crop",
                "side": "min(height, width) of the image left by drop_top_rows",
                "offset_rounding": "floor",
                "offsets": "top = (height - side) // 2, left = (width - side) // 2",
            },
            {
                "op": "resize",
                "size": [resolution, resolution],
                "method": "bilinear_antialias",
                "input_dtype": "uint8",
                "output_dtype": "uint8",
                "pil": {
                    "call": (
                        f"Image.fromarray(square_uint8).resize(({resolution}, {resolution}), "
                        f"resample=Image.Resampling.{RESIZE_RESAMPLE}, "
                        f"reducing_gap={RESIZE_REDUCING_GAP})"
                    ),
                    "resample": RESIZE_RESAMPLE,
                    "reducing_gap": RESIZE_REDUCING_GAP,
                },
                "same_size": "unchanged (no resampling when side == resolution)",
                "note": (
                    "Pillow's algorithm (7.0 and later) for these arguments: if f = "
                    "int(side / resolution / reducing_gap) is 2 or more, the square is first "
                    "reduced by f with Image.reduce (each pixel the rounded mean of an f x f "
                    "block; blocks cut by the right or bottom edge average the pixels they "
                    "have), then the box (0, 0, side / f, side / f) of the result is resampled "
                    "with a separable triangle filter (support 1 pixel, widened by the scale "
                    "when shrinking) in Pillow's 8-bit fixed-point arithmetic. Plain bilinear "
                    "interpolation, or the same filter without the reduce step, differs by "
                    "up to a few grey levels."
                ),
            },
            {"op": "repeat_channels", "channels": channels},
            {
                "op": "scale",
                "divide_by": 255.0,
                "multiply": 1.0 / 255.0,
                "dtype": "float32",
                "formula": (
                    "float32(pixel) / 255 (multiplying by float32(1 / 255), as training "
                    "does, differs by at most one float32 ulp)"
                ),
            },
        ],
        "input": {
            "layout": "BxHxWxC",
            "shape": ["batch", resolution, resolution, channels],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "normalization": "none (no mean/std)",
        },
    }


def recipe_bit_depth_rule(recipe: Any) -> str:
    """The bit-depth rule a parsed `preprocessing.json` asks for (see
    `covidnet_jax.data.preprocess`): its `high_bit_depth.rule`, or the rule of preprocessing
    version 1 for a recipe written before `recipe_version` 2 (which has neither field).

    Raises:
        ValueError: "<key>: expected ..., got ..." for a recipe that is not an object, is of
            a newer recipe_version, or names no known rule.
    """
    if not isinstance(recipe, dict):
        raise ValueError(f"expected a JSON object, got {_describe(recipe)}")
    version = recipe.get("recipe_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"recipe_version: expected a version number, got {_describe(version)}")
    if version > RECIPE_VERSION:
        raise ValueError(
            f"recipe_version {version} is newer than this covidnet-jax reads "
            f"({RECIPE_VERSION}); upgrade covidnet-jax"
        )
    steps = recipe.get("steps")
    decode: dict[str, Any] = {}
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("op") == "decode_grayscale":
            decode = step
            break
    high = decode.get("high_bit_depth")
    rule = high.get("rule", _MISSING) if isinstance(high, dict) else _MISSING
    if rule is _MISSING and version < 2:
        return LEGACY_BIT_DEPTH_RULE
    if rule not in BIT_DEPTH_RULES:
        raise ValueError(
            "steps[decode_grayscale].high_bit_depth.rule: expected one of "
            f"{', '.join(BIT_DEPTH_RULES)}, got {_describe(rule)}"
        )
    return rule


@dataclasses.dataclass(frozen=True)
class RequirementCheck:
    """One design requirement and whether the exported design meets it.

    Attributes:
        name: the requirement as people read it, e.g. "COVID-19 sensitivity >= 0.85".
        value: the measured value, or None if it was not measured.
        met: whether it holds, or None if it was not measured.
        source: where the value comes from ("cost model", "validation", "test").
        interval: the value's two-sided confidence interval (None for exact values such
            as the cost model's).
        test: the test split's estimate as text, e.g. "0.897 [0.870, 0.919] (n=600)"
            ("" when the test split was not scored).
        verdict: on the test split: "met", "not met" or "inconclusive" (None: not scored).
    """

    name: str
    value: float | None
    met: bool | None
    source: str
    interval: tuple[float, float] | None = None
    test: str = ""
    verdict: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a model card says about an exported design.

    Attributes:
        title: a short name (e.g. "covidnet design 3f2a... (trial 17)").
        spec_summary: the spec's one-line summary.
        class_names: output classes in probability order.
        params: trainable parameters.
        macs: multiply-accumulates of one forward pass at the input size.
        activation_bytes: activation memory estimate, or None.
        data: a paragraph on the training/validation/test data (source, classes, sizes).
        requirements: the design requirements and whether they were met.
        metrics: split name -> metric name -> value.
        training: the training recipe, key -> value.
        provenance: where the design came from, key -> value (workdir, trial, ...).
    """

    title: str
    spec_summary: str
    class_names: tuple[str, ...]
    params: int
    macs: int
    activation_bytes: int | None = None
    data: str = ""
    requirements: tuple[RequirementCheck, ...] = ()
    metrics: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    training: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_LIMITS = """\
- **Not a medical device.** This model was produced by an automated design exploration for
  research on network design. It has not been clinically validated and must not be used to
  diagnose, triage or treat anyone.
- Metrics hold only for data like the data named above. Radiographs from other hospitals,
  scanners, views, populations or preprocessing can shift them arbitrarily; on the bundled
  synthetic data they say nothing about real radiographs.
- Small test splits give wide confidence intervals; per-class numbers on a few images are
  anecdotes.
- Inputs must follow `preprocessing.json` exactly; other scaling or cropping silently degrades
  the output.
- Heatmaps from `covidnet explain` show where the score is sensitive, not why a finding is
  present.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "not measured"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def render_model_card(card: ModelCard) -> str:
    """Renders a model card as Markdown.

    Args:
        card: the facts to report.

    Returns:
        Markdown text with sections Model, Data, Requirements, Metrics, Training, Usage,
        Limits.
    """
    lines = [f"# Model card: {card.title}", "", "## Model", ""]
    lines += [
        f"- Architecture: `{card.spec_summary}` (full spec in `{SPEC_FILE}`)",
        f"- Classes (output order): {', '.join(card.class_names)}",
        f"- Parameters: {card.params:,} ({card.params / 1e6:.3f} M)",
        f"- MACs per image: {card.macs:,} ({card.macs / 1e9:.4f} G)",
    ]
    if card.activation_bytes is not None:
        lines.append(f"- Activation memory (batch 1): {card.activation_bytes / 2**20:.2f} MiB")
    lines += ["", "## Data", "", card.data or "Not recorded.", "", "## Requirements", ""]
    if card.requirements:
        lines += [
            "| requirement | value [interval] | met | measured on | test [interval] | on test |",
            "|---|---|---|---|---|---|",
        ]
        for req in card.requirements:
            value = _fmt(req.value)
            if req.interval is not None:
                value += f" [{req.interval[0]:.4g}, {req.interval[1]:.4g}]"
            lines.append(
                f"| {req.name} | {value} | {_fmt(req.met)} | {req.source} | {req.test or '-'} "
                f"| {req.verdict or '-'} |"
            )
        measured = [r.met for r in card.requirements if r.met is not None]
        verdict = "all met" if measured and all(measured) else "NOT all met"
        lines += ["", f"Verdict: {verdict}."]
        tested = [r.verdict for r in card.requirements if r.verdict is not None]
        if tested:
            on_test = (
                "not met"
                if "not met" in tested
                else "met"
                if all(v == "met" for v in tested)
                else "inconclusive"
            )
            lines += [
                "",
                f"On the test split (scored once, never used to decide): {on_test}. Met: the "
                "one-sided lower confidence bound clears the minimum; not met: the upper bound "
                "is below it; inconclusive: the test split cannot tell.",
            ]
    else:
        lines.append("No requirements were stated.")
    lines += ["", "## Metrics", ""]
    if card.metrics:
        names = list(dict.fromkeys(name for values in card.metrics.values() for name in values))
        splits = list(card.metrics)
        lines += ["| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
        for name in names:
            row = [_fmt(card.metrics[s].get(name, "-")) for s in splits]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
        if "test" in card.metrics:
            lines.append(
                "Model selection used the validation split only; the test split was scored "
                "once, for this report."
            )
        else:
            lines.append(
                "Model selection used the validation split only; the test split was not "
                "scored for this design."
            )
    else:
        lines.append("No metrics recorded.")
    lines += ["", "## Training", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in card.training.items()] or [
        "Not recorded."
    ]
    if card.provenance:
        lines += ["", "## Provenance", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in card.provenance.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        "covidnet predict --model EXPORT_DIR image.png",
        "covidnet explain --model EXPORT_DIR image.png --out heatmap.png",
        "```",
        "",
        f"With only jax and `flatbuffers` installed (jax needs `flatbuffers` to deserialize "
        f"`{STABLEHLO_FILE}` but does not install it: `pip install jax flatbuffers`), with "
        f"inputs prepared exactly as `{RECIPE_FILE}` says:",
        "",
        "```python",
        "import jax, numpy as np",
        f'with open("EXPORT_DIR/{STABLEHLO_FILE}", "rb") as f:',
        "    exported = jax.export.deserialize(bytearray(f.read()))",
        "probs = np.asarray(exported.call(images_BxHxWxC))  # float32 in [0, 1]",
        "```",
        "",
        "## Limits",
        "",
        _LIMITS,
    ]
    return "\n".join(lines)


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


@dataclasses.dataclass(frozen=True)
class LoadedExport:
    """An export read from disk, ready to predict.

    Attributes:
        path: the export folder.
        manifest: the parsed `export.json`.
        recipe: the parsed `preprocessing.json`.
        exported: the deserialized `jax.export.Exported`.
    """

    path: Path
    manifest: Mapping[str, Any]
    recipe: Mapping[str, Any]
    exported: jax.export.Exported
    _call: Callable[[Any], jax.Array] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One jitted wrapper per artifact, so repeated batches of one size compile once.
        object.__setattr__(self, "_call", jax.jit(self.exported.call))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Output classes, in probability order."""
        return tuple(self.manifest["class_names"])

    @property
    def input_size(self) -> int:
        """Side length H = W of the model input."""
        return int(self.manifest["input"]["shape"][1])

    @property
    def channels(self) -> int:
        """Input channels C."""
        return int(self.manifest["input"]["shape"][3])

    @property
    def bit_depth_rule(self) -> str:
        """How high-bit-depth images become 8 bits for this export (`recipe_bit_depth_rule`):
        exports written before recipe version 2 keep the rule they were trained with."""
        return recipe_bit_depth_rule(self.recipe)

    def spec_json(self) -> str:
        """The text of the export's `spec.json`."""
        return (self.path / SPEC_FILE).read_text(encoding="utf-8")

    def preprocess(
        self,
        image: str | Path | np.ndarray,
        *,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        limit_name: str = "max_pixels",
    ) -> np.ndarray:
        """One image file or array -> float32 H x W x C in [0, 1], as the recipe says.

        High-bit-depth images are scaled by the export's `bit_depth_rule`. An image file over
        `max_pixels` (width x height) is refused from its header, as a possible
        decompression bomb, with a DataError naming it, its size and `limit_name`.
        """
        pixels = preprocess_image(
            image,
            resolution=self.input_size,
            channels=self.channels,
            max_pixels=max_pixels,
            limit_name=limit_name,
            bit_depth_rule=self.bit_depth_rule,
        )
        return pixels.astype(np.float32) / 255.0

    def predict_batch(self, images_BxHxWxC: Any) -> np.ndarray:
        """Class probabilities of preprocessed images.

        Args:
            images_BxHxWxC: float in [0, 1], or uint8 (scaled by 1/255 here).

        Returns:
            float32 B x K probabilities.

        Raises:
            ExportError: if the images do not have the export's H x W x C.
        """
        images = np.asarray(images_BxHxWxC)
        want = (self.input_size, self.input_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != want:
            raise ExportError(
                f"{self.path}: expects images B x {want[0]} x {want[1]} x {want[2]}, got "
                f"{'x'.join(map(str, images.shape))}"
            )
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        return np.asarray(self._call(images.astype(np.float32)))

    def predict_images(
        self,
        images: Sequence[str | Path | np.ndarray],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        limit_name: str = "max_pixels",
    ) -> np.ndarray:
        """Class probabilities of image files (or raw arrays), preprocessed as in training.

        Args:
            images: image paths or arrays.
            batch_size: images per call of the exported function.
            max_pixels: largest image file (width x height) decoded.
            limit_name: the setting that raises `max_pixels`, named in the error.

        Returns:
            float32 N x K probabilities, in the order of `images`.

        Raises:
            DataError: naming an unreadable or too large image.
        """
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [
                    self.preprocess(im, max_pixels=max_pixels, limit_name=limit_name)
                    for im in images[start : start + batch_size]
                ]
            )
            chunks.append(self.predict_batch(batch))
        if not chunks:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(chunks)

    def restore_model(self) -> nnx.Module:
        """Rebuilds the trained NNX model from the spec and the Orbax checkpoint (for
        attributions such as Grad-CAM, which need more than the exported function).

        Returns:
            The model (float32 compute), in eval mode.

        Raises:
            SpecError: if `spec.json` is not a valid spec.
            CheckpointError: if the checkpoint is missing or does not fit the spec.
        """
        from covidnet_jax.arch import spec_from_json

        return restore_inference_state(self.path / CHECKPOINT_DIR, spec_from_json(self.spec_json()))


def load_export(path: str | Path) -> LoadedExport:
    """Reads an export folder written by `write_export`.

    Needs only jax and numpy (plus flatbuffers) to predict from preprocessed batches.

    Args:
        path: the export folder.

    Returns:
        The `LoadedExport`.

    Raises:
        ExportError: one line naming the file (and key) at fault: the folder is missing, not
            an export, of a newer format version or incomplete, or its `export.json` is not
            valid JSON, lacks a key, holds a malformed value or disagrees with the model in
            `model.jax_export`, or its `preprocessing.json` is of a newer recipe version or
            names no known bit-depth rule (a recipe without `recipe_version`, written before
            version 2, is read with the rule of its time).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: export folder not found")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(
            f"{path}: not an export (no {MANIFEST_FILE}); create one with `covidnet export`"
        )
    manifest = _read_export_json(path, MANIFEST_FILE)
    recipe = _read_export_json(path, RECIPE_FILE)
    try:
        recipe_bit_depth_rule(recipe)
    except ValueError as err:
        raise ExportError(f"{path / RECIPE_FILE}: {err}") from None
    try:
        blob = (path / STABLEHLO_FILE).read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: incomplete export, missing {STABLEHLO_FILE}") from None
    except OSError as err:
        raise ExportError(f"{path / STABLEHLO_FILE}: unreadable ({err})") from None
    exported = _check_manifest(manifest, manifest_path, blob)
    return LoadedExport(path=path, manifest=manifest, recipe=recipe, exported=exported)


def _read_export_json(path: Path, name: str) -> Any:
    """The parsed JSON file `name` of the export folder `path` (ExportError if it is missing,
    unreadable or not JSON)."""
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: incomplete export, missing {name}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ExportError(f"{path / name}: not valid JSON ({err})") from None
    except OSError as err:
        raise ExportError(f"{path / name}: unreadable ({err})") from None


_MISSING = object()


def _describe(value: Any) -> str:
    """A JSON value in at most 80 characters, for an error message."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_manifest(manifest: Any, manifest_path: Path, blob: bytes) -> jax.export.Exported:
    """Validates a parsed `export.json` and deserializes the artifact it describes.

    Checks, in order: a JSON object; `format` and `version`; `class_names` (a list of two
    or more distinct, non-empty strings); `input.shape` (["batch", H, H, C], H a supported
    resolution, C 1 or 3); then that the artifact takes B x H x H x C and returns one
    probability per class name. A tampered or truncated manifest fails here, with the key,
    rather than later with a KeyError or wrong class labels.

    Args:
        manifest: the parsed `export.json`.
        manifest_path: its path, for the messages.
        blob: the bytes of `model.jax_export`.

    Returns:
        The deserialized `jax.export.Exported`.

    Raises:
        ExportError: "<export.json>: <key>: expected ..., got ...", one line.
    """

    def fail(key: str, expected: str, value: Any) -> ExportError:
        return ExportError(f"{manifest_path}: {key}: expected {expected}, got {_describe(value)}")

    if not isinstance(manifest, dict):
        raise ExportError(f"{manifest_path}: expected a JSON object, got {_describe(manifest)}")
    if manifest.get("format") != EXPORT_FORMAT:
        raise fail(
            "format", f"{EXPORT_FORMAT!r} (a covidnet-jax export)", manifest.get("format", _MISSING)
        )
    version = manifest.get("version", _MISSING)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fail("version", "a format version number", version)
    if version > EXPORT_VERSION:
        raise ExportError(
            f"{manifest_path}: export format version {version} is newer than this "
            f"covidnet-jax reads ({EXPORT_VERSION}); upgrade covidnet-jax"
        )
    names = manifest.get("class_names", _MISSING)
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise fail("class_names", "a list of two or more distinct class names", names)
    if not isinstance(manifest.get("input"), dict) or "shape" not in manifest["input"]:
        raise fail(
            "input",
            'an object with "shape": ["batch", H, W, C] (as covidnet export writes it)',
            manifest.get("input", _MISSING),
        )
    shape = manifest["input"]["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape[1:])
        or shape[1] != shape[2]
        or not MIN_RESOLUTION <= shape[1] <= MAX_RESOLUTION
        or shape[3] not in (1, 3)
    ):
        raise fail(
            "input.shape",
            f'["batch", H, H, C] with H in {MIN_RESOLUTION}..{MAX_RESOLUTION} and C 1 or 3',
            shape,
        )
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # corrupt bytes surface as assorted flatbuffer/MLIR errors
        where = manifest_path.with_name(STABLEHLO_FILE)
        raise ExportError(f"{where}: cannot deserialize ({err})") from None
    takes = tuple(exported.in_avals[0].shape[1:])
    if takes != tuple(shape[1:]):
        raise fail(
            "input.shape",
            f'the input of {STABLEHLO_FILE}, ["batch", {", ".join(map(str, takes))}]',
            shape,
        )
    outputs = exported.out_avals[0].shape[-1]
    if outputs != len(names):
        raise fail("class_names", f"{outputs} names, one per output of {STABLEHLO_FILE}", names)
    return exported


def predict(
    export_dir: str | Path,
    images: Sequence[str | Path | np.ndarray],
    *,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Loads an export and returns class probabilities of image files: the one-call API.

    Args:
        export_dir: an export folder written by `covidnet export`.
        images: image paths (or raw image arrays), preprocessed as in training.
        batch_size: images per call of the exported function.
        max_pixels: largest image file (width x height) decoded; larger ones are refused
            as possible decompression bombs.

    Returns:
        float32 N x K probabilities; the class order is `load_export(export_dir).class_names`.

    Raises:
        ExportError: for a missing or broken export.
        DataError: naming an unreadable image.

    Example:
        >>> probs = predict("runs/quickstart/export", ["chest.png"])
    """
    return load_export(export_dir).predict_images(
        images, batch_size=batch_size, max_pixels=max_pixels
    )


def predict_files(
    export_dir: str | Path,
    images: Sequence[str | Path],
    *,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_name: str = "max_pixels",
):
    """Predictions in the form `covidnet predict --workdir` prints (`covidnet_jax.predict`).

    Args:
        export_dir: an export folder.
        images: image files.
        batch_size: images per call of the exported function.
        max_pixels: largest image file (width x height) decoded.
        limit_name: the setting that raises `max_pixels`, named in the error.

    Returns:
        One `covidnet_jax.predict.Prediction` per image, in order.

    Raises:
        ExportError: for a missing or broken export.
        DataError: naming an unreadable image.
    """
    from covidnet_jax.predict import Prediction

    loaded = load_export(export_dir)
    probs_NxK = loaded.predict_images(
        list(images), batch_size=batch_size, max_pixels=max_pixels, limit_name=limit_name
    )
    names = loaded.class_names
    return [
        Prediction(
            path=str(path),
            probabilities={name: float(p) for name, p in zip(names, probs, strict=True)},
            predicted=names[int(np.argmax(probs))],
        )
        for path, probs in zip(images, probs_NxK, strict=True)
    ]


def card_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Flattens `EvalMetrics.to_dict()` into the model card's metric rows.

    Args:
        metrics: {"accuracy", "count", "sensitivity": {class: v}, "ppv": {class: v}, ...}.

    Returns:
        {"accuracy": .., "images": .., "sensitivity <class>": .., "PPV <class>": ..}; with
        the confusion matrix, each rate as "value [low, high] (n=N)" (95% Wilson).
    """
    if "confusion" in metrics and "class_names" in metrics:
        # Every rate with its 95% Wilson interval and sample size.
        m = EvalMetrics.from_dict(dict(metrics))
        found: dict[str, Any] = {"accuracy": m.estimate("accuracy").format(4), "images": m.count}
        for name in m.class_names:
            found[f"sensitivity {name}"] = m.estimate(f"sensitivity:{name}").format(4)
        for name in m.class_names:
            found[f"PPV {name}"] = m.estimate(f"ppv:{name}").format(4)
        return found
    rows: dict[str, Any] = {"accuracy": float(metrics["accuracy"])}
    if metrics.get("count") is not None:
        rows["images"] = int(metrics["count"])
    for name, value in dict(metrics.get("sensitivity", {})).items():
        rows[f"sensitivity {name}"] = float(value)
    for name, value in dict(metrics.get("ppv", {})).items():
        rows[f"PPV {name}"] = float(value)
    return rows


def _percent(fraction: Any) -> str:
    return f"{fraction:.0%}" if isinstance(fraction, float) else "part"


def _describe_data(data: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]]) -> str:
    source = data.get("covidx_dir") or data.get("tfds_data_dir") or "unknown"
    synthetic = bool(data.get("synth")) or (
        data.get("covidx_dir") is not None and (Path(data["covidx_dir"]) / "synth.json").is_file()
    )
    kind = (
        "the procedural synthetic chest X-ray data set (`covidnet data synth`; not real "
        "radiographs)"
        if synthetic
        else "a COVIDx-format data set"
    )
    sizes = ", ".join(
        f"{split} {int(m['count'])} images" for split, m in metrics.items() if m.get("count")
    )
    text = (
        f"Trained on `{source}`, {kind}, at {data.get('resolution')} px with "
        f"{data.get('channels')} channel(s). Validation is a patient-disjoint "
        f"{_percent(data.get('validation_fraction'))} of the train split; the test split is "
        "separate."
    )
    return text + (f" Evaluated on: {sizes}." if sizes else "")


def _describe_training(config: Mapping[str, Any], step: int) -> dict[str, Any]:
    optimizer = config.get("optimizer", {})
    schedule = config.get("schedule", {})
    train = config.get("train", {})
    data = config.get("data", {})
    recipe: dict[str, Any] = {
        "checkpoint exported (step)": step,
        "steps trained (budget)": train.get("steps") or train.get("epochs"),
        "batch size": train.get("batch_size"),
        "optimizer": f"{optimizer.get('name')} (learning rate {optimizer.get('learning_rate')})",
        "schedule": schedule.get("kind"),
        "selection metric (validation)": train.get("selection_metric"),
        "class weights": data.get("class_weights"),
        "batch re-balancing": (
            f"{data.get('rebalance_fraction')} of each batch from {data['rebalance_class']}"
            if data.get("rebalance_class")
            else "none"
        ),
        "augmentation": data.get("augment"),
        "compute dtype": config.get("model", {}).get("compute_dtype"),
        "seed": config.get("seed"),
    }
    return {k: v for k, v in recipe.items() if v is not None}


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
        data=_describe_data(trained.config.get("data", {}), metrics),
        requirements=tuple(requirements),
        metrics={split: card_metrics(values) for split, values in metrics.items()},
        training=_describe_training(trained.config, trained.step),
        provenance={
            "training workdir": str(workdir),
            "checkpoint step": trained.step,
            "spec hash": spec.content_hash(),
            **dict(provenance or {}),
        },
    )
    return write_export(model, spec, out_dir, card=card, platforms=platforms)
