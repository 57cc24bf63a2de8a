"""The model card of an export: what it says about a design, and its Markdown.

`ModelCard` holds the facts (architecture, data, requirements and whether they were met,
metrics with their split, training recipe, provenance); `render_model_card` writes
`model_card.md`; `card_metrics`, `describe_data` and `describe_training` turn a training
run's metrics and config into those facts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from covidnet_jax.export.layout import RECIPE_FILE, SPEC_FILE, STABLEHLO_FILE
from covidnet_jax.metrics import EvalMetrics


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


def describe_data(data: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]]) -> str:
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


def describe_training(config: Mapping[str, Any], step: int) -> dict[str, Any]:
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
