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

One job per module: `layout` (file names, format version, `ExportError`), `recipe`
(`preprocessing.json`), `model_card`, `inference_state` (the Orbax checkpoint, through
`covidnet_jax.checkpointing`), `writer` (`write_export`, `export_training_run`) and `reader`
(`load_export`, `predict`). This package re-exports what callers use (the file names stay
in `layout`).

Within `covidnet_jax`, one call loads an export and predicts from image files:

Example:
    >>> probs_BxK = predict("runs/quickstart/export", ["a.png", "b.png"])
    >>> load_export("runs/quickstart/export").class_names
    ('normal', 'pneumonia', 'COVID-19')
"""

from covidnet_jax.export.inference_state import restore_inference_state, save_inference_state
from covidnet_jax.export.layout import DEFAULT_PLATFORMS, EXPORT_FORMAT, EXPORT_VERSION, ExportError
from covidnet_jax.export.model_card import (
    ModelCard,
    RequirementCheck,
    card_metrics,
    render_model_card,
)
from covidnet_jax.export.reader import LoadedExport, load_export, predict, predict_files
from covidnet_jax.export.recipe import (
    RECIPE_VERSION,
    preprocessing_recipe,
    recipe_bit_depth_rule,
)
from covidnet_jax.export.writer import export_inference, export_training_run, write_export

__all__ = [
    "DEFAULT_PLATFORMS",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "RECIPE_VERSION",
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
