"""Evaluation of trained runs: metrics, cost, NetScore, a table, a confusion-matrix plot.

`load_trained(workdir)` rebuilds a run's model from the spec and config stored in its
checkpoint and restores the best checkpoint (by the validation selection metric) into it;
`evaluate_workdir` scores it on the validation or test split. The test split is for the
final report only: training and model selection never read it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Sequence
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
from covidnet_jax.metrics import EvalMetrics, compute_metrics, netscore
from covidnet_jax.models import build_model
from covidnet_jax.steps import StepFunctions, StepSettings
from covidnet_jax.typed_yaml import apply_overrides, from_dict

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


@dataclasses.dataclass
class TrainedModel:
    """A run's model restored from one of its checkpoints.

    Attributes:
        checkpoint_dir: where it was restored from.
        step: the checkpoint's step.
        spec: the spec as trained.
        config: the resolved experiment config (a plain dict, as saved).
        class_names: class names in label order.
        fns: the model's step functions (eval, predict).
        params: restored parameters.
        model_state: restored BatchNorm statistics.
    """

    checkpoint_dir: Path
    step: int
    spec: AnySpec
    config: dict[str, Any]
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
    """Restores a run's best checkpoint (or `step`) into a freshly built model.

    Args:
        workdir: a training workdir or its checkpoint directory.
        step: a specific checkpoint step (default: the best by the validation metric).

    Raises:
        CheckpointError: no checkpoint (one line naming the directory), or no such step.
    """
    with checkpointing.Checkpoints.open_existing(workdir) as ckpts:
        step = ckpts.selected_step() if step is None else step
        meta = ckpts.read_metadata(step)
        spec = spec_from_dict(meta["spec"])
        config = meta["config"]
        compute_dtype = config["model"]["compute_dtype"]
        dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
        model = build_model(spec, rngs=nnx.Rngs(0), dtype=dtype)
        settings = StepSettings(
            optimizer=config["optimizer"]["name"],
            schedule=config["schedule"]["kind"],
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

    Attributes:
        split: "validation" or "test".
        step: the checkpoint's step.
        checkpoint_dir: where it came from.
        spec_summary: the design in one line.
        metrics: accuracy, per-class sensitivity and PPV, confusion matrix.
        params: parameter count (analytic, `covidnet_jax.cost`).
        macs: multiply-accumulates of one forward pass.
        netscore: NetScore in dB (accuracy in percent, params in M, MACs in G).
    """

    split: str
    step: int
    checkpoint_dir: str
    spec_summary: str
    metrics: EvalMetrics
    params: int
    macs: int
    netscore: float

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
            "warnings": self.metrics.warnings(),
        }


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: Split = "validation",
    step: int | None = None,
    data: Data | None = None,
    overrides: Sequence[str] = (),
) -> Evaluation:
    """Scores a run's best checkpoint (or `step`) on a split.

    Args:
        workdir: a training workdir.
        split: "validation" (model selection) or "test" (final report only).
        step: a specific checkpoint (default: the best by validation).
        data: the run's data set if already loaded (else loaded from the saved config).
        overrides: "key.path=value" changes to the saved config before loading the data,
            e.g. "data.covidx_dir=/mnt/covidx" when the data set has moved.

    Raises:
        CheckpointError: the workdir has no checkpoint.
        DataError: the data set named in the saved config is unavailable.
    """
    trained = load_trained(workdir, step=step)
    if data is None:
        saved = apply_overrides(copy.deepcopy(trained.config), overrides)
        try:
            config = from_dict(TrainConfig, saved)
        except ConfigError as err:
            raise ConfigError(f"config saved in {trained.checkpoint_dir}: {err}") from None
        data = load_data(config.data, seed=config.seed)
    batch_size = int(
        trained.config["train"]["eval_batch_size"] or trained.config["train"]["batch_size"]
    )
    batch_size += -batch_size % trained.fns.mesh.devices.size
    metrics = evaluate_batches(
        trained.fns,
        trained.params,
        trained.model_state,
        data.eval_batches(split, batch_size),
        trained.class_names,
    )
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
    )


def format_evaluation(evaluation: Evaluation) -> str:
    """A table for people: totals, per-class sensitivity/PPV, confusion matrix, warnings."""
    m = evaluation.metrics
    loss = f"{m.loss:.4f}" if m.loss is not None else "-"
    lines = [
        f"{evaluation.split} split, checkpoint step {evaluation.step} ({evaluation.checkpoint_dir})",
        f"design    {evaluation.spec_summary}",
        f"examples  {m.count}    accuracy {m.accuracy:.4f}    loss {loss}",
        f"params    {evaluation.params:,}    MACs {evaluation.macs:,}    "
        f"NetScore {evaluation.netscore:.2f}",
        "",
    ]
    width = max(12, *(len(n) for n in m.class_names)) + 2
    lines.append(f"{'class':<{width}}{'sensitivity':>12}{'PPV':>10}{'support':>10}")
    for i, name in enumerate(m.class_names):
        sens = f"{m.sensitivity[i]:.4f}" + ("*" if name in m.sensitivity_undefined else " ")
        ppv = f"{m.ppv[i]:.4f}" + ("*" if name in m.ppv_undefined else " ")
        lines.append(f"{name:<{width}}{sens:>12}{ppv:>10}{int(m.confusion[i].sum()):>10}")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    cell = max(7, *(len(n) + 1 for n in m.class_names))
    lines.append(" " * width + "".join(f"{n:>{cell}}" for n in m.class_names))
    for i, name in enumerate(m.class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in m.confusion[i]))
    for note in m.warnings():
        lines.append(f"* {note}")
    return "\n".join(lines)


def plot_confusion(metrics: EvalMetrics, path: str | Path, *, title: str = "") -> Path:
    """Writes the confusion matrix as a PNG (counts and row-normalized colour).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = metrics.confusion
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(metrics.class_names)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2.5, 1.2 * k + 2))
    ax.imshow(matrix / rows, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if matrix[i, j] / rows[i, 0] > 0.5 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour)
    ax.set_xticks(range(k), metrics.class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), metrics.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics.accuracy:.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_evaluation(evaluation: Evaluation, workdir: str | Path) -> tuple[Path, Path]:
    """Writes `<workdir>/evaluation/<split>.json` and `<split>_confusion.png`."""
    out = Path(workdir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{evaluation.split}.json"
    json_path.write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n", encoding="utf-8")
    png = plot_confusion(
        evaluation.metrics,
        out / f"{evaluation.split}_confusion.png",
        title=f"{evaluation.split}, step {evaluation.step}: accuracy "
        f"{evaluation.metrics.accuracy:.3f}",
    )
    return json_path, png
