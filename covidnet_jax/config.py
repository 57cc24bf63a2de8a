"""`TrainConfig`: the typed schema of a training experiment file.

Example (`experiments/smoke.yaml`):

```yaml
seed: 0
model: {arch: tiny}
data: {covidx_dir: data/synth, synth: {per_class: 40}, resolution: 32, channels: 3}
optimizer: {name: adam, learning_rate: 0.002}
schedule: {kind: plateau}
train: {steps: 60, batch_size: 16, eval_every: 20, log_every: 10}
```

The same config built in Python (no YAML needed) is validated at construction by the same
rules, with the same messages, and pickles (a spawned worker process receives it as it is):

```python
config = TrainConfig(
    model=ModelConfig(arch="tiny"),
    data=DataConfig(covidx_dir="data/synth", resolution=32),
    train=LoopConfig(steps=60, batch_size=16),
)
```

The model's input size and channels come from `data.resolution` / `data.channels` and its
class names from the data, so one spec file serves every resolution of a multi-fidelity
search. Class weighting and batch re-balancing live in the `data:` section
(`data.class_weights`, `data.rebalance_class`), next to the data they describe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from covidnet_jax.data import DataConfig
from covidnet_jax.errors import ConfigError
from covidnet_jax.metrics import check_selection_metric
from covidnet_jax.typed_yaml import bounded, check, load_yaml_config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model:` section.

    Attributes:
        arch: a preset name (`covidnet arch list`) or the path of a spec JSON file.
        compute_dtype: "bfloat16" computes convolutions in bf16 (for accelerators);
            parameters, optimizer state and the loss stay float32.
    """

    arch: str
    compute_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The `optimizer:` section.

    Attributes:
        name: "adam" (weight decay, if any, as an L2 term on the gradient) or "adamw"
            (decoupled weight decay). Decay applies to kernels, never to biases or norms.
        learning_rate: peak learning rate (the paper: 2e-4).
        weight_decay: decay coefficient.
    """

    name: Literal["adam", "adamw"] = "adam"
    learning_rate: float = bounded(2e-4, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0, le=1.0)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The `schedule:` section.

    Attributes:
        kind: "constant"; "warmup_cosine" (linear warm-up, then cosine decay to
            `min_learning_rate` at the end of the budget); "plateau" (the paper: multiply
            the rate by `plateau_factor` when the validation loss has not improved for
            `plateau_patience` evaluations, never below `min_learning_rate`).
        warmup_steps: warm-up length for warmup_cosine.
        min_learning_rate: floor of the cosine and of the plateau reductions.
        plateau_factor: reduction factor (the paper: 0.7).
        plateau_patience: evaluations without improvement before a reduction (paper: 5).
    """

    kind: Literal["constant", "warmup_cosine", "plateau"] = "constant"
    warmup_steps: int = bounded(0, ge=0)
    min_learning_rate: float = bounded(1e-6, ge=0.0)
    plateau_factor: float = bounded(0.7, gt=0.0, lt=1.0)
    plateau_patience: int = bounded(5, ge=1)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The `train:` section: budget, batch size, intervals, checkpoints, model selection.

    Attributes:
        steps: training budget in steps (set exactly one of steps and epochs).
        epochs: training budget in epochs of the train split (rounded up to whole steps).
        batch_size: images per step, over all devices (a multiple of the device count).
        eval_batch_size: images per evaluation batch (default: batch_size).
        log_every: steps between metric pulls to the host (log line, progress bar, NaN
            check).
        eval_every: steps between validation evaluations.
        checkpoint_every: steps between checkpoints (default: eval_every); a multiple of
            eval_every, so every checkpoint carries validation metrics.
        keep_checkpoints: most recent checkpoints kept.
        keep_best: best checkpoints (by selection_metric) kept besides.
        selection_metric: validation metric that picks the best checkpoint:
            "accuracy", "sensitivity:<class>" or "ppv:<class>".
        select: which checkpoint the run hands on (its reported metrics, `evaluate`,
            `export`, weight inheritance): "best" by `selection_metric`, or "last". The
            best of several checkpoints is chosen on the validation split, so its
            validation figure is optimistic; the search judges candidates on "last".
        bn_calibration_batches: before every validation, re-estimate BatchNorm statistics
            from this many training batches with the current weights ("precise BN"), and
            keep them in the checkpoint; 0 keeps the running averages. Short, fast-moving
            runs (search rungs, inherited weights) need it: their running averages lag the
            weights and eval-mode predictions can collapse to one class.
    """

    steps: int | None = bounded(None, ge=1)
    epochs: float | None = bounded(None, gt=0.0)
    batch_size: int = bounded(32, ge=1, le=1 << 16)
    eval_batch_size: int | None = bounded(None, ge=1, le=1 << 16)
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(100, ge=1)
    checkpoint_every: int | None = bounded(None, ge=1)
    keep_checkpoints: int = bounded(2, ge=1)
    keep_best: int = bounded(1, ge=0)
    selection_metric: str = "accuracy"
    select: Literal["best", "last"] = "best"
    bn_calibration_batches: int = bounded(0, ge=0, le=1024)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"steps: set exactly one of steps and epochs, got steps={self.steps}, "
                f"epochs={self.epochs}"
            )
        if self.checkpoint_every is not None and self.checkpoint_every % self.eval_every:
            raise ConfigError(
                f"checkpoint_every: expected a multiple of eval_every ({self.eval_every}) so "
                f"that every checkpoint has validation metrics, got {self.checkpoint_every}"
            )
        try:
            check_selection_metric(self.selection_metric)
        except ValueError as err:
            raise ConfigError(f"selection_metric: {err}") from None

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints."""
        return self.checkpoint_every or self.eval_every


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training experiment.

    Attributes:
        model: the design and its compute dtype.
        data: the data set and input pipeline (`covidnet_jax.data.DataConfig`).
        train: budget, batch size, intervals, checkpoints and model selection.
        optimizer: Adam / AdamW settings.
        schedule: learning-rate schedule.
        seed: the root seed: initial parameters, batch order, augmentation and dropout.
        compile_cache_dir: JAX's persistent compilation cache (default
            `<workdir>/compile_cache`). The cache is process-wide: the first directory
            set in a process is used for the rest of it.
    """

    model: ModelConfig
    data: DataConfig
    train: LoopConfig
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    seed: int = bounded(0, ge=0, lt=2**31)
    compile_cache_dir: str | None = None

    def __post_init__(self) -> None:
        check(self)  # built in Python: every section is validated as a file would be


def load_train_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """Reads and validates a training experiment file, applying `--set` overrides.

    Args:
        path: the YAML file.
        overrides: "key.path=value" strings (values parsed as YAML).

    Raises:
        ConfigError: "<file>: <key.path>: <problem>", before any JAX work.
    """
    return load_yaml_config(path, TrainConfig, overrides)
