"""`train_and_evaluate`: train one design, select on validation, checkpoint, resume.

One call trains one spec in one workdir:

    workdir/
      config.yaml        the resolved experiment (every default written out)
      spec.json          the spec as trained (input size, channels, classes from the data)
      metrics.jsonl      one JSON object per event: start, compile, train, validation,
                         checkpoint, failure, end
      checkpoints/<step> Orbax checkpoints (see covidnet_jax.checkpointing)
      compile_cache/     JAX's persistent compilation cache (unless configured elsewhere)

Calling it again with the same workdir resumes from the latest checkpoint: the batch at
step s, the dropout masks and the learning-rate scale depend only on (seed, s) and the
checkpoint, so an interrupted and resumed run ends with the same parameters as an
uninterrupted one. A larger budget continues a finished run (successive halving).

On a terminal (`show_progress` and stderr a tty) a status line says what runs before the
first step (loading data, building or restoring the model, compiling) and a bar shows the
steps with training loss/accuracy, images/s and the latest validation metrics. A caller (the
search) follows the same phases through `on_progress`, called at phase changes and log steps
only (never per step: the host does not wait on the device between log steps).

It is meant to be called many times in one process (a search): data is loaded once per
data config, the jitted steps are shared per (spec hash, settings, devices) and compiled
once per batch shape, and compilation is timed apart from training.

Failures that belong to the candidate, not to the program, are returned as
`TrainFailure` instead of raised: a non-finite loss or gradient (the last good checkpoint
is kept; non-finite parameters are never saved), running out of device memory, and
errors while tracing or compiling the model. Configuration and data errors still raise
`UserError`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from covidnet_jax import checkpointing, parallel, shared_widths
from covidnet_jax.arch import AnySpec
from covidnet_jax.config import TrainConfig
from covidnet_jax.data import Data, load_data
from covidnet_jax.errors import CheckpointError, ConfigError, UserError
from covidnet_jax.evaluate import evaluate_batches
from covidnet_jax.metrics import EvalMetrics, check_selection_metric
from covidnet_jax.models import build_model
from covidnet_jax.presets import load_spec
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings, TrainState
from covidnet_jax.typed_yaml import to_dict

log = logging.getLogger(__name__)

FailureKind = Literal["non_finite", "out_of_memory", "compile_error"]

Phase = Literal["loading", "compiling", "training", "evaluating"]
ProgressCallback = Callable[[Phase, int, int], None]
"""`on_progress(phase, step, total)`: "loading" (data; step and total 0, not yet known),
"compiling" (step = the step training starts from), "training" (step = steps done, at log
steps), "evaluating" (a validation at `step`); `total` is the run's step budget."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A finished training run.

    Attributes:
        workdir: the run's directory.
        checkpoint_dir: its Orbax checkpoint directory.
        spec_hash: `content_hash()` of the spec as trained.
        step: the last step trained (== the budget).
        best_step: the checkpoint the run hands on: the best by the validation
            `selection_metric`, or the last with `train.select: last`.
        selection_metric: the metric that chose `best_step` (with `select: best`).
        selection_value: its value at `best_step`.
        metrics: validation metrics of `best_step`.
        compile_s: seconds compiling in this call (0 when the steps were already compiled
            in this process; small when JAX's persistent cache had them).
        train_s: seconds of training steps in this call (no compile, eval or saving).
        eval_s: seconds of validation evaluations in this call.
        images_per_s: training throughput in this call (0 if no step ran).
        resumed_from: the step this call resumed from (None for a fresh start).
        inherited: parameter arrays copied from `init_from` (0 without it).
        inheritable: parameter arrays of this model (the denominator of `inherited`).
    """

    workdir: str
    checkpoint_dir: str
    spec_hash: str
    step: int
    best_step: int
    selection_metric: str
    selection_value: float
    metrics: EvalMetrics
    compile_s: float
    train_s: float
    eval_s: float
    images_per_s: float
    resumed_from: int | None
    inherited: int
    inheritable: int
    ok: Literal[True] = True


@dataclasses.dataclass(frozen=True)
class TrainFailure:
    """A run that stopped because of its candidate (never raised; returned).

    Attributes:
        kind: "non_finite" (NaN/inf loss or gradient), "out_of_memory" or "compile_error".
        reason: one line for people and trial stores.
        step: the step at which it happened.
        workdir: the run's directory.
        last_good_step: the latest checkpoint left in the workdir (None if none).
    """

    kind: FailureKind
    reason: str
    step: int
    workdir: str
    last_good_step: int | None
    ok: Literal[False] = False


class _Failure(Exception):
    def __init__(self, kind: FailureKind, reason: str, step: int) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.step = kind, reason, step


def resolve_spec(config: TrainConfig, data: Data, spec: AnySpec | None = None) -> AnySpec:
    """The spec to train: `spec` or `config.model.arch`, fitted to the data.

    Input size and channels come from the data config and class names from the data, so
    the same design trains at any resolution.
    """
    spec = load_spec(config.model.arch) if spec is None else spec
    spec = spec.with_input_size(data.resolution).with_head_classes(tuple(data.class_names))
    if spec.input_channels != data.channels:
        spec = dataclasses.replace(spec, input_channels=data.channels)
    return spec


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | Path,
    *,
    spec: AnySpec | None = None,
    init_from: str | Path | None = None,
    data: Data | None = None,
    show_progress: bool = True,
    host: AnySpec | None = None,
    on_progress: ProgressCallback | None = None,
) -> TrainResult | TrainFailure:
    """Trains one design, evaluating on validation and checkpointing; resumes if possible.

    Args:
        config: the experiment.
        workdir: the run's directory (created; resumed from when it holds checkpoints).
        spec: the design to train instead of `config.model.arch` (the search's candidate).
        init_from: a parent run's workdir or checkpoint directory: parameters and batch
            statistics whose paths and shapes match are copied from its best checkpoint
            into a fresh run (weight inheritance); ignored when resuming.
        data: an already loaded data set for `config.data` (else it is loaded).
        show_progress: show a progress bar (loss, accuracy, images/s, validation metrics)
            and, when stderr is a terminal, a status line while data loads and steps compile.
        host: train on the width-masked executable of this dominating design
            (`covidnet_jax.shared_widths`; fitted to the data like `spec`): exactly the
            same training, and one compiled step for every design the host dominates.
            Checkpoints hold `spec`'s own network.
        on_progress: called with each phase change and at log steps (`ProgressCallback`);
            it runs on the training thread, so it must return quickly.

    Returns:
        `TrainResult`, or `TrainFailure` for a non-finite loss, out-of-memory or a compile
        error (the workdir keeps its last good checkpoint).

    Raises:
        ConfigError, DataError, SpecError: bad inputs, before any training.
        CheckpointError: the workdir holds checkpoints of a different design, or
            `init_from` has none.
    """
    with _Phases(on_progress, sys.stderr if show_progress else None) as phases:
        return _train_and_evaluate(
            config, Path(workdir), spec, init_from, data, show_progress, host, phases
        )


def _train_and_evaluate(
    config: TrainConfig,
    workdir: Path,
    spec: AnySpec | None,
    init_from: str | Path | None,
    data: Data | None,
    show_progress: bool,
    host: AnySpec | None,
    phases: _Phases,
) -> TrainResult | TrainFailure:
    workdir.mkdir(parents=True, exist_ok=True)
    _enable_compilation_cache(Path(config.compile_cache_dir or workdir / "compile_cache"))
    if data is None:
        phases.report("loading", 0, 0, f"loading data ({config.data.resolution} px)")
        data = load_data(config.data, seed=config.seed)
    spec = resolve_spec(config, data, spec)
    if host is not None:
        host = resolve_spec(config, data, host)
        shared_widths.width_layout(spec, host)  # SpecError unless host dominates spec
    loop = config.train
    try:
        check_selection_metric(loop.selection_metric, data.class_names)
    except ValueError as err:
        raise ConfigError(f"train.selection_metric: {err}") from None
    mesh = parallel.make_mesh()
    parallel.check_batch_size(loop.batch_size, mesh)
    eval_batch_size = loop.eval_batch_size or loop.batch_size
    parallel.check_batch_size(eval_batch_size, mesh, key="train.eval_batch_size")
    total_steps = _total_steps(config, data)

    run = _Run(
        config, workdir, spec, data, mesh, total_steps, eval_batch_size, show_progress, host, phases
    )
    try:
        return run.execute(init_from)
    except _Failure as failure:
        run.log_event("failure", step=failure.step, kind=failure.kind, reason=failure.reason)
        log.warning("training stopped at step %d: %s", failure.step, failure.reason)
        run.checkpoints.wait()  # a save still in flight is the last good step once done
        return TrainFailure(
            kind=failure.kind,
            reason=failure.reason,
            step=failure.step,
            workdir=str(workdir),
            last_good_step=run.checkpoints.latest_step(),
        )
    finally:
        run.close()


def _total_steps(config: TrainConfig, data: Data) -> int:
    loop = config.train
    if loop.steps is not None:
        return loop.steps
    assert loop.epochs is not None
    return max(1, math.ceil(loop.epochs * data.num_examples("train") / loop.batch_size))


def _enable_compilation_cache(directory: Path) -> None:
    # The cache is process-wide; a directory chosen earlier (by the user's environment or
    # an earlier run in this process) stays in force.
    _CACHE_EVENTS.listen()
    if jax.config.jax_compilation_cache_dir:
        return
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory.absolute()))


class _CacheEvents:
    """Process-wide counts of JAX's persistent compilation cache hits and misses (its
    `jax.monitoring` events), so that a compile event says whether XLA compiled or read
    a compiled program another process (or run) wrote."""

    def __init__(self) -> None:
        self.counts = {"cache_hits": 0, "cache_misses": 0}
        self._listening = False

    def listen(self) -> None:
        if not self._listening:
            jax.monitoring.register_event_listener(self._count)
            self._listening = True

    def _count(self, event: str, *_: Any, **__: Any) -> None:
        name = event.rsplit("/", 1)[-1]
        if event.startswith("/jax/compilation_cache/") and name in self.counts:
            self.counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


_CACHE_EVENTS = _CacheEvents()


@dataclasses.dataclass
class _Plateau:
    """Host-side reduce-on-plateau state (saved in checkpoint metadata).

    The rule is `optax.contrib.reduce_on_plateau`'s with `rtol=1e-4, atol=0, cooldown=0`
    (tests/test_train_steps.py feeds both the same losses), kept here rather than used
    from optax: that transform expects the watched value at every `update` of the chain,
    but the paper's schedule watches the validation loss, which exists only on the host
    after a validation. Feeding optax's state machine there would mean either the training
    loss every step (another schedule) or JAX calls per validation (retraced each time, or
    compiled per trial) and its float32 state through the JSON metadata, for these lines.
    """

    best_loss: float | None = None
    num_bad: int = 0
    lr_scale: float = 1.0

    def update(self, loss: float, *, factor: float, patience: int, min_scale: float) -> bool:
        """Records a validation loss; returns True when the rate was reduced."""
        if self.best_loss is None or loss < self.best_loss - 1e-4 * abs(self.best_loss):
            self.best_loss, self.num_bad = loss, 0
            return False
        self.num_bad += 1
        if self.num_bad < patience:
            return False
        self.num_bad = 0
        new_scale = max(self.lr_scale * factor, min_scale)
        reduced = new_scale < self.lr_scale
        self.lr_scale = new_scale
        return reduced


class _Run:
    """The state of one `train_and_evaluate` call (split out to keep each phase short)."""

    def __init__(
        self,
        config: TrainConfig,
        workdir: Path,
        spec: AnySpec,
        data: Data,
        mesh: jax.sharding.Mesh,
        total_steps: int,
        eval_batch_size: int,
        show_progress: bool,
        host: AnySpec | None = None,
        phases: _Phases | None = None,
    ) -> None:
        self.config, self.workdir, self.spec, self.data = config, workdir, spec, data
        self.host = host  # see train_and_evaluate
        self.mesh, self.total_steps, self.eval_batch_size = mesh, total_steps, eval_batch_size
        self.show_progress = show_progress
        self.spec_hash = spec.content_hash()
        self.class_names = tuple(data.class_names)
        loop = config.train
        self.checkpoints = checkpointing.Checkpoints(
            workdir / checkpointing.CHECKPOINT_DIRNAME,
            keep_latest=loop.keep_checkpoints,
            keep_best=loop.keep_best,
        )
        self.settings = StepSettings(
            optimizer=config.optimizer.name,
            schedule=config.schedule.kind,
            compute_dtype=config.model.compute_dtype,
        )
        self.plateau = _Plateau()
        self._layout: shared_widths.WidthLayout | None = None
        self.compile_s = self.train_s = self.eval_s = 0.0
        self.images = 0
        self.phases = phases if phases is not None else _Phases(None, None)
        self._postfix: dict[str, str] = {}
        self._log_file = (workdir / "metrics.jsonl").open("a", encoding="utf-8")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.checkpoints.close()
        self._log_file.close()

    def log_event(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()

    # -- set-up ------------------------------------------------------------------------

    def execute(self, init_from: str | Path | None) -> TrainResult:
        dtype = jnp.bfloat16 if self.config.model.compute_dtype == "bfloat16" else jnp.float32
        self.phases.status("building the model")
        try:
            model = build_model(self.spec, rngs=nnx.Rngs(self.config.seed), dtype=dtype)
        except jax.errors.JaxRuntimeError as err:
            raise _Failure(*_classify_runtime_error(err), 0) from None
        fns = StepFunctions.for_model(
            model,
            key=(self.spec_hash, self.config.model.compute_dtype),
            settings=self.settings,
            mesh=self.mesh,
        )
        state, resumed_from = self._restore_or_init(fns, model)
        inherited, inheritable = 0, len(jax.tree.leaves(state.params))
        if resumed_from is None and init_from is not None:
            state, inherited = _inherit(state, init_from, self.mesh)
        if self.host is not None:
            try:  # the host's state is larger than the candidate's: it can exhaust memory
                fns, state = self._on_host(state, dtype)
            except jax.errors.JaxRuntimeError as err:
                raise _Failure(*_classify_runtime_error(err), resumed_from or 0) from None
        start = int(jax.device_get(state.step))
        self._write_run_files()
        self.log_event(
            "start",
            step=start,
            total_steps=self.total_steps,
            resumed_from=resumed_from,
            spec_hash=self.spec_hash,
            devices=int(self.mesh.devices.size),
            inherited=inherited,
            inheritable=inheritable,
        )
        if start < self.total_steps:
            state = self._train(fns, state, start)
        self.phases.status("saving the last checkpoint")
        self.checkpoints.wait()
        best_step = self.checkpoints.selected_step()
        saved = self.checkpoints.metrics(best_step) if best_step is not None else None
        if best_step is None or saved is None:
            raise CheckpointError(f"{self.checkpoints.directory}: no validated checkpoint")
        metrics = EvalMetrics.from_dict(saved["validation"])
        steps_run = self.images / self.config.train.batch_size
        self.log_event(
            "end",
            step=self.total_steps,
            best_step=best_step,
            selection=saved[checkpointing.SELECTION_KEY],
            compile_s=self.compile_s,
            train_s=self.train_s,
            eval_s=self.eval_s,
            steps_run=steps_run,
        )
        return TrainResult(
            workdir=str(self.workdir),
            checkpoint_dir=str(self.checkpoints.directory),
            spec_hash=self.spec_hash,
            step=max(start, self.total_steps),
            best_step=best_step,
            selection_metric=self.config.train.selection_metric,
            selection_value=float(saved[checkpointing.SELECTION_KEY]),
            metrics=metrics,
            compile_s=self.compile_s,
            train_s=self.train_s,
            eval_s=self.eval_s,
            images_per_s=self.images / self.train_s if self.train_s > 0 else 0.0,
            resumed_from=resumed_from,
            inherited=inherited,
            inheritable=inheritable,
        )

    def _restore_or_init(
        self, fns: StepFunctions, model: nnx.Module
    ) -> tuple[TrainState, int | None]:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return fns.init_state(model), None
        self.phases.status(f"restoring the checkpoint of step {latest}")
        meta = self.checkpoints.read_metadata(latest)
        if meta.get("spec_hash") != self.spec_hash:
            raise CheckpointError(
                f"{self.checkpoints.directory}: holds checkpoints of spec "
                f"{meta.get('spec_hash')}, not of this design ({self.spec_hash}); "
                "use a new --workdir"
            )
        state, meta = self.checkpoints.restore(fns.abstract_state(model), latest)
        self.plateau = _Plateau(**meta["plateau"])
        log.info("resuming from step %d in %s", latest, self.checkpoints.directory)
        return state, latest

    def _on_host(self, state: TrainState, dtype: Any) -> tuple[StepFunctions, TrainState]:
        """The host's step functions, and `state` (the narrow network's) in its layout."""
        layout = shared_widths.width_layout(self.spec, self.host)
        fns = StepFunctions.for_builder(
            lambda: nnx.eval_shape(  # only its graph is used: no initialisation
                lambda: shared_widths.build_host_model(
                    layout.host, layout.skeleton, rngs=nnx.Rngs(0), dtype=dtype
                )
            ),
            key=("shared", layout.skeleton.key, layout.host, self.config.model.compute_dtype),
            settings=self.settings,
            mesh=self.mesh,
        )
        self._layout = layout
        replicated = parallel.replicated(self.mesh)
        return fns, jax.device_put(shared_widths.embed_train_state(state, layout), replicated)

    def _narrow(self, state: TrainState) -> TrainState:
        """`state` as the narrow network's (what checkpoints hold)."""
        if self._layout is None:
            return state
        sliced = shared_widths.slice_train_state(state, self._layout)
        return jax.device_put(sliced, parallel.replicated(self.mesh))

    def _write_run_files(self) -> None:
        (self.workdir / "config.yaml").write_text(
            yaml.safe_dump(to_dict(self.config), sort_keys=False), encoding="utf-8"
        )
        (self.workdir / "spec.json").write_text(self.spec.to_json() + "\n", encoding="utf-8")

    def _metadata(self) -> dict[str, Any]:
        return {
            "spec": json.loads(self.spec.to_json()),
            "spec_hash": self.spec_hash,
            "config": to_dict(self.config),
            "class_names": list(self.class_names),
            "plateau": dataclasses.asdict(self.plateau),
            checkpointing.SELECT_KEY: self.config.train.select,
        }

    # -- the loop ----------------------------------------------------------------------

    def _train(self, fns: StepFunctions, state: TrainState, start: int) -> TrainState:
        config, loop = self.config, self.config.train
        hyper = jax.device_put(
            Hyper.create(
                learning_rate=config.optimizer.learning_rate,
                weight_decay=config.optimizer.weight_decay,
                class_weights=self.data.class_weights(),
                seed=config.seed,
                warmup_steps=config.schedule.warmup_steps,
                total_steps=self.total_steps,
                min_learning_rate=config.schedule.min_learning_rate,
            ),
            parallel.replicated(self.mesh),
        )
        state = state.replace(lr_scale=self._lr_scale_array())
        self.phases.report(
            "compiling", start, self.total_steps, "compiling the train and validation steps"
        )
        batches = self.data.train_batches(loop.batch_size, seed=config.seed, start_step=start)
        first = parallel.shard_batch(next(batches), self.mesh)
        train_step = self._compile(fns, state, first, hyper)

        self.phases.report("training", start, self.total_steps)
        self.phases.clear()  # the bar takes over
        progress = _progress(self.total_steps, start, self.show_progress)
        pending: list[dict[str, jax.Array]] = []
        window_start, window_images = time.perf_counter(), 0
        batch = first
        try:
            for step in range(start, self.total_steps):
                if batch is None:
                    batch = parallel.shard_batch(next(batches), self.mesh)
                state, step_metrics = train_step(state, batch, hyper)
                batch = None
                pending.append(step_metrics)
                done = step + 1
                window_images += loop.batch_size
                is_last = done == self.total_steps
                if done % loop.log_every == 0 or is_last or done % loop.eval_every == 0:
                    elapsed = _wait(state) - window_start
                    self.train_s += elapsed
                    self.images += window_images
                    self._log_train(done, pending, window_images / max(elapsed, 1e-9), progress)
                    pending = []
                    self.phases.report("training", done, self.total_steps)
                    if done % loop.eval_every == 0 or is_last:
                        self.phases.report("evaluating", done, self.total_steps)
                        progress.set_description("validate")
                        state = self._validate_and_save(fns, state, done)
                        progress.set_description("train")
                        progress.set_postfix(self._postfix)
                        if not is_last:
                            self.phases.report("training", done, self.total_steps)
                    window_start, window_images = time.perf_counter(), 0
        except jax.errors.JaxRuntimeError as err:
            raise _Failure(*_classify_runtime_error(err), int(jax.device_get(state.step))) from None
        finally:
            progress.close()
            if hasattr(batches, "close"):
                batches.close()  # stops the device path's prefetch thread now
        return state

    def _compile(self, fns: StepFunctions, state: TrainState, batch: dict, hyper: Hyper):
        eval_batch = {
            "image": jax.ShapeDtypeStruct(
                (self.eval_batch_size, *batch["image"].shape[1:]),
                batch["image"].dtype,
                sharding=parallel.batch_sharding(self.mesh),
            ),
            "label": jax.ShapeDtypeStruct(
                (self.eval_batch_size,), jnp.int32, sharding=parallel.batch_sharding(self.mesh)
            ),
            "mask": jax.ShapeDtypeStruct(
                (self.eval_batch_size,), jnp.bool_, sharding=parallel.batch_sharding(self.mesh)
            ),
        }
        cache_before = _CACHE_EVENTS.snapshot()
        try:
            train_step, train_compile_s = fns.compile_train(state, batch, hyper)
            _, eval_compile_s = fns.compile_eval(state.params, state.model_state, eval_batch)
            if self.config.train.bn_calibration_batches:
                _, moments_compile_s = fns.compile_moments(
                    state.params, state.model_state, batch["image"]
                )
                eval_compile_s += moments_compile_s
        except jax.errors.JaxRuntimeError as err:
            raise _Failure(*_classify_runtime_error(err), int(jax.device_get(state.step))) from None
        except UserError:
            raise
        except (TypeError, ValueError, IndexError, ZeroDivisionError) as err:
            # Tracing the candidate failed (e.g. a spatial size that collapses to zero).
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise _Failure(
                "compile_error", message[:300], int(jax.device_get(state.step))
            ) from None
        self.compile_s += train_compile_s + eval_compile_s
        self.log_event(
            "compile",
            train_step_s=round(train_compile_s, 3),
            eval_step_s=round(eval_compile_s, 3),
            batch_shape=list(batch["image"].shape),
            # Programs read from the persistent cache (compiled by another process or an
            # earlier run) and programs XLA compiled here; both 0 when in-process.
            **{k: v - cache_before[k] for k, v in _CACHE_EVENTS.snapshot().items()},
        )
        return train_step

    def _log_train(
        self, step: int, pending: list[dict[str, jax.Array]], images_per_s: float, progress: Any
    ) -> None:
        host = jax.device_get(pending)
        first_step = step - len(host)
        for i, values in enumerate(host):
            if not bool(values["finite"]):
                bad = first_step + i + 1
                raise _Failure(
                    "non_finite",
                    f"non-finite loss or gradient at step {bad} (loss {float(values['loss'])}, "
                    f"grad norm {float(values['grad_norm'])}); lower optimizer.learning_rate",
                    bad,
                )
        batch_size = self.config.train.batch_size
        loss = float(np.mean([v["loss"] for v in host]))
        accuracy = float(sum(int(v["correct"]) for v in host) / (len(host) * batch_size))
        lr = float(host[-1]["learning_rate"])
        self.log_event(
            "train",
            step=step,
            loss=loss,
            accuracy=accuracy,
            learning_rate=lr,
            grad_norm=float(host[-1]["grad_norm"]),
            images_per_s=round(images_per_s, 1),
        )
        progress.update(len(host))
        self._postfix.update(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", img_s=f"{images_per_s:.0f}")
        progress.set_postfix(self._postfix)

    def _validate_and_save(self, fns: StepFunctions, state: TrainState, step: int) -> TrainState:
        start = time.perf_counter()
        calibration = self.config.train.bn_calibration_batches
        if calibration:
            # Batches of a stream of their own: the same for a resumed run, and not the
            # batches the next training steps will see.
            make = self.data.batch_maker(
                self.config.train.batch_size, seed=self.config.seed + _CALIBRATION_SEED
            )
            images = (
                parallel.shard_batch(make(step * calibration + i), self.mesh)["image"]
                for i in range(calibration)
            )
            state = state.replace(
                model_state=fns.calibrate_batch_norm(state.params, state.model_state, images)
            )
        metrics = evaluate_batches(
            fns,
            state.params,
            state.model_state,
            self.data.eval_batches("validation", self.eval_batch_size),
            self.class_names,
        )
        self.eval_s += time.perf_counter() - start
        selection = metrics.selection_value(self.config.train.selection_metric)
        self._show_validation(metrics, selection)
        self.log_event(
            "validation",
            step=step,
            selection=selection,
            **{k: v for k, v in metrics.to_dict().items() if k != "class_names"},
        )
        schedule = self.config.schedule
        if schedule.kind == "plateau" and metrics.loss is not None:
            reduced = self.plateau.update(
                metrics.loss,
                factor=schedule.plateau_factor,
                patience=schedule.plateau_patience,
                min_scale=schedule.min_learning_rate / self.config.optimizer.learning_rate,
            )
            if reduced:
                state = state.replace(lr_scale=self._lr_scale_array())
                self.log_event("plateau", step=step, lr_scale=self.plateau.lr_scale)
        if step % self.config.train.checkpoint_interval == 0 or step == self.total_steps:
            if not _all_finite(state.params):
                raise _Failure("non_finite", f"non-finite parameters after step {step}", step)
            self.checkpoints.save(
                step,
                self._narrow(state),
                metadata=self._metadata(),
                metrics={checkpointing.SELECTION_KEY: selection, "validation": metrics.to_dict()},
            )
            self.log_event("checkpoint", step=step)
        return state

    def _show_validation(self, metrics: EvalMetrics, selection: float) -> None:
        """The bar's validation fields: loss and accuracy, and the selection metric when it
        is another one."""
        if metrics.loss is not None:
            self._postfix["val_loss"] = f"{metrics.loss:.4f}"
        self._postfix["val_acc"] = f"{metrics.accuracy:.3f}"
        name = self.config.train.selection_metric
        if name != "accuracy":
            self._postfix[f"val_{name}"] = f"{selection:.3f}"

    def _lr_scale_array(self) -> jax.Array:
        return jax.device_put(jnp.float32(self.plateau.lr_scale), parallel.replicated(self.mesh))


_CALIBRATION_SEED = 0x5EED
"""Offset of the BatchNorm-calibration batch stream's seed from the run's seed."""


def _wait(state: TrainState) -> float:
    jax.block_until_ready(state.step)
    return time.perf_counter()


def _all_finite(tree: Any) -> bool:
    # On the host: a jitted check would compile once per design (seconds in a search), and
    # the checkpoint copies the parameters to the host anyway.
    return all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(jax.device_get(tree)))


def _classify_runtime_error(err: Exception) -> tuple[FailureKind, str]:
    message = str(err)
    first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    if "RESOURCE_EXHAUSTED" in message or "Out of memory" in message:
        return "out_of_memory", f"out of device memory: {first[:300]}"
    return "compile_error", f"XLA error: {first[:300]}"


class _Phases:
    """Where a run is: the caller's `on_progress`, and on a terminal a status line (a spinner
    and a few words) while no bar shows. A context: leaving it clears the line.

    Args:
        on_progress: the caller's callback (None: none).
        stream: where the status line goes; shown only when it is a terminal (logs and
            captured output stay clean).
    """

    def __init__(self, on_progress: ProgressCallback | None, stream: TextIO | None) -> None:
        self._on_progress = on_progress
        self._console = None
        self._live: Any = None
        self._spinner: Any = None
        if stream is not None and stream.isatty():
            from rich.console import Console

            self._console = Console(file=stream, force_terminal=True, highlight=False)

    def __enter__(self) -> _Phases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def report(self, phase: Phase, step: int, total: int, text: str = "") -> None:
        """A phase change or log step: to the callback, and `text` to the status line."""
        if self._on_progress is not None:
            self._on_progress(phase, step, total)
        if text:
            self.status(text)

    def status(self, text: str) -> None:
        """Shows `text` on the status line at once (on a terminal)."""
        if self._console is None:
            return
        if self._live is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", text=f"{text}...", style="green")
            self._live = Live(self._spinner, console=self._console, transient=True)
            self._live.start(refresh=True)
        else:
            self._spinner.update(text=f"{text}...")
            self._live.refresh()

    def clear(self) -> None:
        """Removes the status line (before the bar draws, and at the end)."""
        if self._live is not None:
            self._live.stop()
            self._live = self._spinner = None


class _NoProgress:
    def update(self, n: int) -> None:
        del n

    def set_postfix(self, values: dict[str, str]) -> None:
        del values

    def set_description(self, text: str) -> None:
        del text

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, show: bool) -> Any:
    if not show:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def _inherit(
    state: TrainState, init_from: str | Path, mesh: jax.sharding.Mesh
) -> tuple[TrainState, int]:
    """Copies the parent's parameters and statistics whose paths and shapes match."""
    with checkpointing.Checkpoints.open_existing(init_from) as parent:
        step = parent.selected_step()
        saved = parent.restore_arrays(step)
    copied = 0
    replicated = parallel.replicated(mesh)
    new_parts = {}
    for name in ("params", "model_state"):
        source = {
            _path_key(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(saved[name])[0]
        }
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(getattr(state, name))
        leaves = []
        for path, leaf in leaves_with_path:
            match = source.get(_path_key(path))
            if match is not None and match.shape == leaf.shape and match.dtype == leaf.dtype:
                leaves.append(jax.device_put(match, replicated))
                copied += name == "params"
            else:
                leaves.append(leaf)
        new_parts[name] = jax.tree_util.tree_unflatten(treedef, leaves)
    log.info("inherited %d parameter arrays from %s (step %s)", copied, init_from, step)
    return state.replace(**new_parts), copied
