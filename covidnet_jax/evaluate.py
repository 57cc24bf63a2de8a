"""Evaluation of trained runs: metrics, cost, NetScore, a table, a confusion-matrix plot.

`load_trained(workdir)` rebuilds a run's model from the spec and config stored in its
checkpoint and restores the checkpoint the run hands on (the best by the validation
selection metric, or the last with `train.select: last`) into it; `evaluate_workdir` scores
it on the validation or test split: every rate with its sample size and confidence
interval, per-class AUROC with DeLong's interval, and calibration (ECE, reliability
diagram). The test split is for the final report only: training and model selection never
read it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidnet_jax import checkpointing, parallel
from covidnet_jax.arch import AnySpec, spec_from_dict
from covidnet_jax.config import TrainConfig
from covidnet_jax.cost import count_cost
from covidnet_jax.data import Data, load_data
from covidnet_jax.errors import ConfigError
from covidnet_jax.figures import pyplot, save_figure
from covidnet_jax.metrics import EvalMetrics, compute_metrics, netscore
from covidnet_jax.models import build_model
from covidnet_jax.score_metrics import (
    Auroc,
    Calibration,
    calibration,
    one_vs_rest_auroc,
    plot_reliability,
)
from covidnet_jax.steps import StepFunctions, StepSettings
from covidnet_jax.typed_yaml import apply_overrides, from_dict, to_dict

Split = Literal["validation", "test"]


def evaluate_batches(
    fns: StepFunctions,
    params: nnx.State,
    model_state: nnx.State,
    batches: Iterable[dict[str, np.ndarray]],
    class_names: Sequence[str],
) -> EvalMetrics:
    """Runs the eval step over padded batches and turns the counts into metrics.

    Counts accumulate on the device; the host reads them once at the end.

    Args:
        fns: the model's step functions.
        params: model parameters.
        model_state: BatchNorm statistics etc.
        batches: {"image": float32 BxHxWxC, "label": int32 B, "mask": bool B}, B fixed.
        class_names: K names, in label order.

    Returns:
        Metrics over the masked-in examples, with the mean unweighted cross-entropy.
    """
    confusion = loss_sum = None
    for host_batch in batches:
        batch = parallel.shard_batch(host_batch, fns.mesh)
        step, _ = fns.compile_eval(params, model_state, batch)
        out = step(params, model_state, batch)
        if confusion is None:
            confusion, loss_sum = out["confusion"], out["loss_sum"]
        else:
            confusion, loss_sum = confusion + out["confusion"], loss_sum + out["loss_sum"]
    if confusion is None:
        raise ValueError("no evaluation batches")
    confusion_np, loss_total = jax.device_get((confusion, loss_sum))
    count = int(confusion_np.sum())
    return compute_metrics(
        confusion_np, class_names, loss=float(loss_total) / count if count else None
    )


def predict_batches(
    fns: StepFunctions,
    params: nnx.State,
    model_state: nnx.State,
    batches: Iterable[dict[str, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of the real (masked-in) examples of padded batches.

    Returns:
        (float32 NxK probabilities, int32 N labels), in the batches' order.
    """
    probs, labels = [], []
    for host_batch in batches:
        batch = parallel.shard_batch(host_batch, fns.mesh)
        out = np.asarray(jax.device_get(fns.predict(params, model_state, batch["image"])))
        mask = host_batch["mask"]
        probs.append(out[mask])
        labels.append(host_batch["label"][mask])
    if not probs:
        raise ValueError("no evaluation batches")
    return np.concatenate(probs), np.concatenate(labels)


@dataclasses.dataclass
class TrainedModel:
    """A run's model restored from one of its checkpoints.

    Attributes:
        checkpoint_dir: where it was restored from.
        step: the checkpoint's step.
        spec: the spec as trained.
        config: the run's experiment config, as saved beside the checkpoint.
        class_names: class names in label order.
        fns: the model's step functions (eval, predict).
        params: restored parameters.
        model_state: restored BatchNorm statistics.
    """

    checkpoint_dir: Path
    step: int
    spec: AnySpec
    config: TrainConfig
    class_names: tuple[str, ...]
    fns: StepFunctions
    params: nnx.State
    model_state: nnx.State

    @property
    def resolution(self) -> int:
        """The model's input side in pixels."""
        return int(self.spec.input_size)

    @property
    def channels(self) -> int:
        """The model's input channels."""
        return int(self.spec.input_channels)

    def predict_probabilities(self, images_BxHxWxC: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 BxK, for float32 images in [0, 1]."""
        devices = self.fns.mesh.devices.size
        count = len(images_BxHxWxC)
        # Pad to a power of two (and a multiple of the devices) so that calls with
        # different numbers of images share a few compiled shapes.
        target = max(devices, 1 << max(count - 1, 0).bit_length())
        target += -target % devices
        padded = target - count
        if padded:
            pad = np.zeros((padded, *images_BxHxWxC.shape[1:]), images_BxHxWxC.dtype)
            images_BxHxWxC = np.concatenate([images_BxHxWxC, pad])
        images = jax.device_put(images_BxHxWxC, parallel.batch_sharding(self.fns.mesh))
        probs = self.fns.predict(self.params, self.model_state, images)
        return np.asarray(jax.device_get(probs))[:count]


def load_trained(workdir: str | Path, *, step: int | None = None) -> TrainedModel:
    """Restores the checkpoint a run hands on (or `step`) into a freshly built model.

    Args:
        workdir: a training workdir or its checkpoint directory.
        step: a specific checkpoint step (default: `Checkpoints.selected_step`).

    Raises:
        CheckpointError: no checkpoint (one line naming the directory), or no such step.
    """
    with checkpointing.Checkpoints.open_existing(workdir) as ckpts:
        step = ckpts.selected_step() if step is None else step
        meta = ckpts.read_metadata(step)
        spec = spec_from_dict(meta["spec"])
        try:
            config = from_dict(TrainConfig, meta["config"])
        except ConfigError as err:
            raise ConfigError(f"config saved in {ckpts.directory}: {err}") from None
        compute_dtype = config.model.compute_dtype
        dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
        model = build_model(spec, rngs=nnx.Rngs(0), dtype=dtype)
        settings = StepSettings(
            optimizer=config.optimizer.name,
            schedule=config.schedule.kind,
            compute_dtype=compute_dtype,
        )
        fns = StepFunctions.for_model(
            model,
            key=(meta["spec_hash"], compute_dtype),
            settings=settings,
            mesh=parallel.make_mesh(),
        )
        state, _ = ckpts.restore(fns.abstract_state(model), step)
        return TrainedModel(
            checkpoint_dir=ckpts.directory,
            step=int(step),
            spec=spec,
            config=config,
            class_names=tuple(meta["class_names"]),
            fns=fns,
            params=state.params,
            model_state=state.model_state,
        )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The evaluation of one checkpoint on one split.

    Every rate carries its sample size and a Wilson interval at `level`
    (`EvalMetrics.estimate`); the per-class AUROC has DeLong's interval.

    Attributes:
        split: "validation" or "test".
        step: the checkpoint's step.
        checkpoint_dir: where it came from.
        spec_summary: the design in one line.
        metrics: accuracy, per-class sensitivity and PPV, confusion matrix.
        params: parameter count (analytic, `covidnet_jax.cost`).
        macs: multiply-accumulates of one forward pass.
        netscore: NetScore in dB (accuracy in percent, params in M, MACs in G).
        level: coverage of the intervals.
        auroc: per class, one-vs-rest AUROC of its probability (None: no images of it).
        calibration: expected calibration error and reliability bins.
    """

    split: str
    step: int
    checkpoint_dir: str
    spec_summary: str
    metrics: EvalMetrics
    params: int
    macs: int
    netscore: float
    level: float = 0.95
    auroc: Mapping[str, Auroc | None] = dataclasses.field(default_factory=dict)
    calibration: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (one object for machines)."""
        return {
            "split": self.split,
            "step": self.step,
            "checkpoint_dir": self.checkpoint_dir,
            "spec": self.spec_summary,
            "params": self.params,
            "macs": self.macs,
            "netscore": self.netscore,
            **self.metrics.to_dict(),
            "intervals": self.metrics.intervals(level=self.level),
            "auroc": {k: None if v is None else v.to_dict() for k, v in self.auroc.items()},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "warnings": self.metrics.warnings(),
        }


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: Split = "validation",
    step: int | None = None,
    data: Data | None = None,
    overrides: Sequence[str] = (),
    level: float = 0.95,
    scores: bool = True,
) -> Evaluation:
    """Scores the checkpoint a run hands on (or `step`) on a split.

    Args:
        workdir: a training workdir.
        split: "validation" (model selection) or "test" (final report only).
        step: a specific checkpoint (default: the one the run hands on).
        data: the run's data set if already loaded (else loaded from the saved config).
        overrides: "key.path=value" changes to the saved config before loading the data,
            e.g. "data.covidx_dir=/mnt/covidx" when the data set has moved.
        level: coverage of the confidence intervals.
        scores: also compute per-class AUROC and calibration (one more pass over the split).

    Raises:
        CheckpointError: the workdir has no checkpoint.
        DataError: the data set named in the saved config is unavailable.
    """
    trained = load_trained(workdir, step=step)
    if data is None:
        config = trained.config
        if overrides:
            saved = apply_overrides(to_dict(config), overrides)
            try:
                config = from_dict(TrainConfig, saved)
            except ConfigError as err:
                raise ConfigError(f"config saved in {trained.checkpoint_dir}: {err}") from None
        data = load_data(config.data, seed=config.seed)
    batch_size = trained.config.train.eval_batch_size or trained.config.train.batch_size
    batch_size += -batch_size % trained.fns.mesh.devices.size
    metrics = evaluate_batches(
        trained.fns,
        trained.params,
        trained.model_state,
        data.eval_batches(split, batch_size),
        trained.class_names,
    )
    aurocs: dict[str, Auroc | None] = {}
    cal = None
    if scores:
        probs, labels = predict_batches(
            trained.fns,
            trained.params,
            trained.model_state,
            data.eval_batches(split, batch_size),
        )
        aurocs = one_vs_rest_auroc(probs, labels, trained.class_names, level=level)
        cal = calibration(probs, labels)
    cost = count_cost(trained.spec)
    return Evaluation(
        split=split,
        step=trained.step,
        checkpoint_dir=str(trained.checkpoint_dir),
        spec_summary=trained.spec.summary(),
        metrics=metrics,
        params=cost.params,
        macs=cost.macs,
        netscore=netscore(metrics.accuracy, cost.params, cost.macs),
        level=level,
        auroc=aurocs,
        calibration=cal,
    )


def format_evaluation(evaluation: Evaluation) -> str:
    """A table for people: totals and per-class rates with their intervals, AUROC,
    calibration, the confusion matrix and warnings."""
    m = evaluation.metrics
    level = evaluation.level
    loss = f"{m.loss:.4f}" if m.loss is not None else "-"
    accuracy = m.estimate("accuracy", level=level)
    lines = [
        f"{evaluation.split} split, checkpoint step {evaluation.step} ({evaluation.checkpoint_dir})",
        f"design    {evaluation.spec_summary}",
        f"examples  {m.count}    accuracy {accuracy.value:.4f} "
        f"[{accuracy.low:.4f}, {accuracy.high:.4f}]    loss {loss}",
        f"params    {evaluation.params:,}    MACs {evaluation.macs:,}    "
        f"NetScore {evaluation.netscore:.2f}",
    ]
    if evaluation.calibration is not None:
        lines.append(
            f"calibration  ECE {evaluation.calibration.ece:.4f} over "
            f"{len(evaluation.calibration.count)} confidence bins"
        )
    lines += ["", f"[{level:.0%} intervals: Wilson for rates, DeLong for AUROC]"]

    def cell(name: str, undefined: bool) -> str:
        e = m.estimate(name, level=level)
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" + ("*" if undefined else " ")

    width = max(12, *(len(n) for n in m.class_names)) + 2
    col = 21
    lines.append(
        f"{'class':<{width}}{'sensitivity':>{col}}{'PPV':>{col}}{'specificity':>{col}}"
        f"{'AUROC':>{col}}{'support':>9}"
    )
    for i, name in enumerate(m.class_names):
        sens = cell(f"sensitivity:{name}", name in m.sensitivity_undefined)
        ppv = cell(f"ppv:{name}", name in m.ppv_undefined)
        spec = cell(f"specificity:{name}", False)
        a = evaluation.auroc.get(name)
        auc = "-" if a is None else f"{a.value:.3f} [{a.low:.3f}, {a.high:.3f}]"
        lines.append(
            f"{name:<{width}}{sens:>{col}}{ppv:>{col}}{spec:>{col}}{auc:>{col}}"
            f"{int(m.confusion[i].sum()):>9}"
        )
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    cell_width = max(7, *(len(n) + 1 for n in m.class_names))
    lines.append(" " * width + "".join(f"{n:>{cell_width}}" for n in m.class_names))
    for i, name in enumerate(m.class_names):
        lines.append(
            f"{name:<{width}}" + "".join(f"{int(v):>{cell_width}}" for v in m.confusion[i])
        )
    for note in m.warnings():
        lines.append(f"* {note}")
    return "\n".join(lines)


def plot_confusion(
    metrics: EvalMetrics, path: str | Path, *, title: str = "", level: float = 0.95
) -> Path:
    """Writes the confusion matrix as a PNG (counts and row-normalized colour), with each
    class's sensitivity in the right margin and PPV in the bottom margin, both with their
    intervals at `level`.

    Returns:
        The path written.
    """
    plt = pyplot()
    matrix = metrics.confusion
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(metrics.class_names)
    fig, ax = plt.subplots(figsize=(1.4 * k + 4.5, 1.2 * k + 3))
    ax.imshow(matrix / rows, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if matrix[i, j] / rows[i, 0] > 0.5 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour)
    for i, name in enumerate(metrics.class_names):
        sens = metrics.estimate(f"sensitivity:{name}", level=level)
        ax.text(k - 0.4, i, f"sens {sens.value:.2f}\n[{sens.low:.2f}, {sens.high:.2f}]",
                va="center", ha="left", fontsize=8)  # fmt: skip
        ppv = metrics.estimate(f"ppv:{name}", level=level)
        ax.annotate(f"PPV {ppv.value:.2f}\n[{ppv.low:.2f}, {ppv.high:.2f}]",
                    xy=(i, -0.2), xycoords=("data", "axes fraction"),
                    va="top", ha="center", fontsize=8)  # fmt: skip
    ax.set_xticks(range(k), metrics.class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), metrics.class_names)
    ax.set_xlabel("predicted")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("true")
    accuracy = metrics.estimate("accuracy", level=level)
    ax.set_title(
        title
        or f"accuracy {accuracy.value:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}]"
        f" (n={accuracy.trials})",
        fontsize=9,
    )
    return save_figure(fig, path)


def write_evaluation(evaluation: Evaluation, workdir: str | Path) -> tuple[Path, Path]:
    """Writes `<workdir>/evaluation/<split>.json`, `<split>_confusion.png` and (with scores)
    `<split>_reliability.png`.

    Returns:
        The JSON and confusion-matrix paths.
    """
    out = Path(workdir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{evaluation.split}.json"
    json_path.write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n", encoding="utf-8")
    accuracy = evaluation.metrics.estimate("accuracy", level=evaluation.level)
    png = plot_confusion(
        evaluation.metrics,
        out / f"{evaluation.split}_confusion.png",
        title=f"{evaluation.split}, step {evaluation.step}: accuracy {accuracy.value:.3f} "
        f"[{accuracy.low:.3f}, {accuracy.high:.3f}] (n={accuracy.trials}, "
        f"{evaluation.level:.0%} CI)",
        level=evaluation.level,
    )
    if evaluation.calibration is not None:
        plot_reliability(
            evaluation.calibration,
            out / f"{evaluation.split}_reliability.png",
            title=f"{evaluation.split}, step {evaluation.step}: ECE "
            f"{evaluation.calibration.ece:.3f} (numbers: images per bin)",
        )
    return json_path, png
