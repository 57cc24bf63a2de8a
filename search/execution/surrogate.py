"""A cheap synthetic stand-in for training: validation metrics as a smooth function of the spec.

The search's own machinery (strategies, cost pre-filter, dedupe, successive halving, the
trial store, workers, resume) can be exercised and compared over many seeds in seconds with
this evaluator instead of JAX training: tests use it, and `bench/search_efficiency.py
--surrogate` compares strategies with it. It is deterministic: the same spec and steps give
the same metrics.

The model: capacity grows with log MACs and log params (diminishing returns), larger kernels
and dense connectivity help a little, and accuracy approaches its ceiling as
`1 - exp(-steps / tau)`. The last class (COVID-19 in COVIDx order) is the hardest; its
sensitivity lags the others. A confusion matrix of 100 examples per class is built from the
per-class sensitivities, so PPV and accuracy are consistent with it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np

from covidnet_jax.arch import AnySpec, ArchSpec
from covidnet_jax.cost import count_cost
from covidnet_jax.metrics import EvalMetrics, compute_metrics
from search.execution.evaluation import AnalyticCost, EvalFailure, EvalRequest, EvalSuccess
from search.execution.runner import SearchJob

_PER_CLASS = 100


def surrogate_metrics(
    spec: AnySpec,
    steps: int,
    *,
    tau: float = 150.0,
    macs_mid: float = 7e5,
    params_mid: float = 4e3,
) -> EvalMetrics:
    """Deterministic validation metrics of `spec` after `steps` training steps.

    Args:
        spec: the architecture.
        steps: training steps.
        tau: steps to reach ~63% of the ceiling.
        macs_mid: MACs at which the accuracy ceiling is half-way (with `params_mid` params).
        params_mid: see `macs_mid`.

    Returns:
        Metrics over 100 examples per class.
    """
    report = count_cost(spec)
    logit = 3.0 * (math.log10(max(report.macs, 1)) - math.log10(macs_mid))
    logit += 1.0 * (math.log10(max(report.params, 1)) - math.log10(params_mid))
    if isinstance(spec, ArchSpec):
        kernels = [m.kernel_size for s in spec.stages for m in s.modules]
        logit += 0.1 * (sum(kernels) / len(kernels) - 3)
        logit += {"dense": 0.2, "residual": 0.15, "none": 0.0}[spec.connectivity]
    ceiling = 1.0 / (1.0 + math.exp(-logit))
    progress = 1.0 - math.exp(-steps / tau)
    k = spec.num_classes
    chance = 1.0 / k
    base = chance + (0.99 - chance) * ceiling * progress
    digest = hashlib.sha256(spec.content_hash().encode()).digest()
    jitter = (digest[0] / 255.0 - 0.5) * 0.02
    sensitivities = [min(0.99, base + 0.03 + jitter)] * (k - 1) + [max(0.0, base - 0.08 + jitter)]
    confusion = np.zeros((k, k), dtype=np.int64)
    for i, sens in enumerate(sensitivities):
        correct = round(_PER_CLASS * sens)
        confusion[i, i] = correct
        wrong = _PER_CLASS - correct
        others = [j for j in range(k) if j != i]
        for n, j in enumerate(others):
            confusion[i, j] = wrong // len(others) + (1 if n < wrong % len(others) else 0)
    return compute_metrics(confusion, spec.class_names)


@dataclasses.dataclass
class SurrogateEvaluator:
    """An `Evaluator` that scores specs with `surrogate_metrics` instead of training.

    It writes a small checkpoint marker (`<workdir>/checkpoint/step`) so resume and weight
    inheritance paths can be followed, and counts the training jobs it ran. With
    `orbax_every` it writes real (tiny) Orbax checkpoints instead, through
    `covidnet_jax.checkpointing.Checkpoints` with one step kept, so that saves and deletions
    of old steps happen as in training (the fault-injection test kills them).

    Attributes:
        tau, macs_mid, params_mid: see `surrogate_metrics`.
        seconds_per_step: simulated training time per step (sleeps; 0 for none).
        fail_hashes: spec hashes whose training fails with a NaN loss.
        jobs: (spec hash, start step, steps, init_from) of every training job, in order.
        orbax_every: save an Orbax checkpoint every this many steps (0: the marker file).
        test_log: a file to which each test-split scoring appends a line (`pid trial-dir`):
            how tests see that the test split was scored once.
        train_log: a file to which each training job appends a line (`pid trial-dir start
            steps init_from`): how tests see, across processes, where a job resumed from.
    """

    tau: float = 150.0
    macs_mid: float = 7e5
    params_mid: float = 4e3
    seconds_per_step: float = 0.0
    fail_hashes: frozenset[str] = frozenset()
    jobs: list[tuple[str, int, int, str | None]] = dataclasses.field(default_factory=list)
    orbax_every: int = 0
    test_log: str | None = None
    train_log: str | None = None

    def _log_job(self, request: EvalRequest, start: int) -> None:
        init_from = None if request.init_from is None else str(request.init_from)
        self.jobs.append((request.spec.content_hash(), start, request.steps, init_from))
        if self.train_log is not None:
            with open(self.train_log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {request.workdir} {start} {request.steps} {init_from}\n")

    def train(self, request: EvalRequest) -> EvalSuccess | EvalFailure:
        """Simulates training `request.spec` to `request.steps`, resuming from the marker."""
        if self.orbax_every:
            return self._train_with_orbax(request)
        spec_hash = request.spec.content_hash()
        marker = Path(request.workdir) / "checkpoint" / "step"
        start = int(marker.read_text()) if marker.exists() else 0
        self._log_job(request, start)
        if spec_hash in self.fail_hashes:
            return EvalFailure("nan", f"loss became NaN at step {start + 1} (spec {spec_hash})")
        if self.seconds_per_step > 0:
            for step in range(start, request.steps):
                time.sleep(self.seconds_per_step)
                if (step + 1) % 10 == 0:
                    _write_marker(marker, step + 1)
        _write_marker(marker, max(start, request.steps))
        metrics = self._metrics(request)
        simulated = self.seconds_per_step * max(0, request.steps - start)
        return EvalSuccess(metrics, compile_s=0.0, train_s=simulated, checkpoint=marker.parent)

    def _train_with_orbax(self, request: EvalRequest) -> EvalSuccess | EvalFailure:
        from covidnet_jax.checkpointing import Checkpoints

        spec_hash = request.spec.content_hash()
        directory = Path(request.workdir) / "checkpoints"
        with Checkpoints(directory, keep_latest=1, keep_best=0, async_save=False) as ckpts:
            start = ckpts.latest_step() or 0
            self._log_job(request, start)
            if spec_hash in self.fail_hashes:
                return EvalFailure("nan", f"loss became NaN at step {start + 1}")
            for step in range(start + self.orbax_every, request.steps + 1, self.orbax_every):
                time.sleep(self.seconds_per_step * self.orbax_every)
                state = {"step": np.int32(step), "w": np.full((64, 64), step, np.float32)}
                ckpts.save(step, state, metadata={"spec_hash": spec_hash})
        simulated = self.seconds_per_step * max(0, request.steps - start)
        return EvalSuccess(
            self._metrics(request), compile_s=0.0, train_s=simulated, checkpoint=directory
        )

    def test(self, request: EvalRequest) -> EvalMetrics:
        """Test metrics: the surrogate at the trained steps."""
        if self.test_log is not None:
            with open(self.test_log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {request.workdir}\n")
        return self._metrics(request)

    def _metrics(self, request: EvalRequest) -> EvalMetrics:
        return surrogate_metrics(
            request.spec,
            request.steps,
            tau=self.tau,
            macs_mid=self.macs_mid,
            params_mid=self.params_mid,
        )


def _write_marker(marker: Path, step: int) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(step))
    tmp.replace(marker)


def surrogate_job(
    settings_data: dict,
    workdir: str | Path,
    *,
    prototype: ArchSpec,
    storage_url: str | None = None,
    wall_time_s: float = 3600.0,
    **evaluator_options,
) -> SearchJob:
    """A `SearchJob` whose workers score candidates with a `SurrogateEvaluator`.

    Args:
        settings_data: the `search:` section as plain data.
        workdir: the search's working directory.
        prototype: the prototype design (its class names are the data's).
        storage_url: a database URL, or None for the workdir's journal.
        wall_time_s: the wall-time budget from now.
        **evaluator_options: `SurrogateEvaluator` fields (tau, seconds_per_step, ...).

    Returns:
        The job (picklable: worker processes can run it).
    """
    return SearchJob(
        settings_data=settings_data,
        workdir=str(workdir),
        storage_url=storage_url,
        study_name=Path(workdir).name,
        prototype_json=prototype.to_json(indent=None),
        class_names=prototype.class_names,
        make_evaluator=functools.partial(SurrogateEvaluator, **evaluator_options),
        make_cost_model=functools.partial(AnalyticCost, 8),
        deadline=time.time() + wall_time_s,
    )
