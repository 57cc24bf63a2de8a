"""What the loop asks of training: the evaluator protocol, and the analytic cost model.

The loop never trains by itself. It hands an `EvalRequest` (a spec, the rung's step budget,
the trial's checkpoint directory, an optional parent checkpoint to inherit weights from) to
an evaluator and gets back validation metrics or a failure with its reason. The real
evaluator (`search.execution.training.TrainingEvaluator`) runs `covidnet_jax.train.train_and_evaluate`;
tests pass cheap fakes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from covidnet_jax import cost as cost_lib
from covidnet_jax.arch import AnySpec
from covidnet_jax.metrics import EvalMetrics
from search.ledger.requirements import Cost


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """One training job of the search.

    Attributes:
        spec: the candidate architecture.
        steps: train until this global step (resuming from `workdir`'s latest checkpoint).
        workdir: the trial's directory (checkpoints live here).
        init_from: a parent checkpoint directory to initialize matching weights from, or None.
        rung: the fidelity rung index (-1 for the final full-fidelity training and its
            confirmation runs).
        seed: the training seed (initial parameters, batch order) instead of the
            experiment's; None keeps it.
        validation_draw: which patient-disjoint validation split judges the run (0: the
            search's own; see `covidnet_jax.data.DataConfig.validation_draw`).
        on_progress: where an evaluator may report its progress, `(phase, step, total)` as
            `covidnet_jax.train.ProgressCallback` (the runner publishes it in the trial);
            None: nobody listens.
    """

    spec: AnySpec
    steps: int
    workdir: Path
    init_from: Path | None
    rung: int
    seed: int | None = None
    validation_draw: int = 0
    on_progress: Callable[[str, int, int], None] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )


@dataclasses.dataclass(frozen=True)
class EvalSuccess:
    """A completed training job.

    Attributes:
        metrics: validation metrics of the checkpoint handed on (the one at `steps`).
        compile_s: seconds spent compiling in this job.
        train_s: seconds spent training and evaluating in this job.
        checkpoint: the checkpoint directory written (None when the evaluator keeps none).
    """

    metrics: EvalMetrics
    compile_s: float
    train_s: float
    checkpoint: Path | None


@dataclasses.dataclass(frozen=True)
class EvalFailure:
    """A training job that failed; the search records it and goes on.

    Attributes:
        kind: "nan", "oom", "compile" or "error".
        reason: one line saying what happened.
    """

    kind: Literal["nan", "oom", "compile", "error"]
    reason: str


class Evaluator(Protocol):
    """Trains candidates and scores the chosen design on the test split."""

    def train(self, request: EvalRequest) -> EvalSuccess | EvalFailure:
        """Trains `request.spec` to `request.steps` and returns validation metrics."""
        ...

    def test(self, request: EvalRequest) -> EvalMetrics:
        """Test-split metrics of the checkpoint in `request.workdir` (used once, at the end)."""
        ...


@dataclasses.dataclass(frozen=True)
class AnalyticCost:
    """The cost model of `covidnet_jax.cost`: params, MACs, training activation memory.

    Attributes:
        batch_size: the training batch size (activation memory scales with it).
    """

    batch_size: int

    def __call__(self, spec: AnySpec) -> Cost:
        """The spec's cost, without building it."""
        report = cost_lib.count_cost(spec)
        return Cost(
            macs=int(report.macs),
            params=int(report.params),
            activation_bytes=int(cost_lib.activation_bytes(spec, self.batch_size)),
        )
