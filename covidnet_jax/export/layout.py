"""What an export folder holds: its file names, format version and the error for a bad one.

The writer (`covidnet_jax.export.writer`) and the reader (`covidnet_jax.export.reader`) both
name files through these constants, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

from covidnet_jax.errors import UserError

EXPORT_FORMAT = "covidnet-jax-export"
EXPORT_VERSION = 1
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


# Stands for a key a JSON object lacks, so messages can say so instead of "null".
MISSING = object()


def describe_value(value: Any) -> str:
    """A JSON value in at most 80 characters, for an error message."""
    if value is MISSING:
        return "nothing (the key is missing)"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
