"""Search experiments and the real evaluator: `covidnet_jax.train.train_and_evaluate`.

A search experiment file is a training experiment file (`covidnet_jax.config.TrainConfig`:
model, data, train, optimizer, schedule, seed) plus a `search:` section
(`search.config.SearchSettings`). The training sections say how every candidate trains; the
search sets the design (`spec`), the resolution (`data.resolution`, from the spec) and the
step budget of each rung (`train.steps`). `train.steps` may be left out (it is filled with the
full-fidelity steps), and `search.space.prototype` defaults to `model.arch`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax

from covidnet_jax import presets
from covidnet_jax.arch import AnySpec, ArchSpec
from covidnet_jax.checkpointing import finished_steps
from covidnet_jax.config import TrainConfig
from covidnet_jax.data import Data, load_data
from covidnet_jax.errors import ConfigError
from covidnet_jax.evaluate import evaluate_workdir
from covidnet_jax.metrics import EvalMetrics
from covidnet_jax.shared_widths import ExecutablePolicy, HostRegistry
from covidnet_jax.train import TrainFailure, TrainResult, train_and_evaluate
from covidnet_jax.typed_yaml import apply_overrides, from_dict, read_yaml, to_dict
from search.config import SearchSettings
from search.execution.evaluation import EvalFailure, EvalRequest, EvalSuccess

log = logging.getLogger(__name__)

_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
"""Set in the environment, it keeps its value in search workers (see `TrainingEvaluator`)."""

_FAILURE_KINDS = {"non_finite": "nan", "out_of_memory": "oom", "compile_error": "compile"}


@dataclasses.dataclass(frozen=True)
class SearchExperiment:
    """A validated search experiment: how candidates train, and the search itself.

    `load_experiment` reads one from a YAML file; Python code builds one directly, no file
    needed (both sections validate themselves at construction, with the file's messages):

        experiment = SearchExperiment(
            training=TrainConfig(model=ModelConfig(arch="tiny"), data=..., train=...),
            search=SearchSettings(space=SpaceConfig(prototype="tiny")),
        )

    It pickles, so spawned worker processes receive it as it is.

    Attributes:
        training: how every candidate trains.
        search: the `search:` section.
        path: the YAML file it was read from ("" when built in Python).
        overrides: the `--set` overrides applied to the file.
    """

    training: TrainConfig
    search: SearchSettings
    path: str = ""
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in (("training", TrainConfig), ("search", SearchSettings)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise ConfigError(f"{name}: expected a {kind.__name__}, got {type(value).__name__}")

    @property
    def search_data(self) -> dict[str, Any]:
        """The `search:` section as plain data."""
        return to_dict(self.search)


def load_experiment(path: str | Path, overrides: tuple[str, ...] = ()) -> SearchExperiment:
    """Reads, overrides and validates a search experiment file.

    Args:
        path: the YAML file.
        overrides: "key.path=value" strings, e.g. `search.budget.max_trials=10`.

    Raises:
        ConfigError: "<file>: <key.path>: <problem>", before any JAX work.
    """
    data = apply_overrides(read_yaml(path), overrides)
    try:
        section = data.pop("search", None)
        if not isinstance(section, dict):
            raise ConfigError("search: required section is missing (space, requirements, ...)")
        space = section.setdefault("space", {})
        if isinstance(space, dict) and not space.get("prototype"):
            model = data.get("model")
            if isinstance(model, dict) and model.get("arch"):
                space["prototype"] = model["arch"]
        settings = from_dict(SearchSettings, section, path="search")
        train = data.setdefault("train", {})
        if isinstance(train, dict) and "steps" not in train and "epochs" not in train:
            train["steps"] = settings.budget.full_fidelity_steps
        training = from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return SearchExperiment(training, settings, str(path), tuple(overrides))


def load_prototype(experiment: SearchExperiment) -> ArchSpec:
    """The search's prototype at the experiment's input resolution and channels.

    Raises:
        ConfigError: the prototype is not a PEPX spec.
    """
    prototype = presets.load_spec(experiment.search.space.prototype)
    if not isinstance(prototype, ArchSpec):
        raise ConfigError(
            f"search.space.prototype: expected a PEPX design, got a {prototype.TYPE!r} spec"
        )
    data = experiment.training.data
    return dataclasses.replace(
        prototype.with_input_size(data.resolution), input_channels=data.channels
    )


def candidate_config(
    config: TrainConfig,
    spec: AnySpec,
    steps: int,
    workdir: Path,
    *,
    seed: int | None = None,
    validation_draw: int = 0,
) -> TrainConfig:
    """The training config of one candidate: its resolution and the rung's step budget.

    A candidate is judged by its last checkpoint (`train.select: last`): that is the one the
    next rung resumes from and children inherit, and the maximum over a run's checkpoints
    would be an optimistic figure chosen on the same validation split. The compile cache is
    shared by the whole search (`<search workdir>/compile_cache`), so a spec compiled once
    (in any trial or worker) is not compiled again; every run of a search lives two levels
    below its workdir (`trials/<n>`, `best/train`, `confirmation/<run>`).
    """
    cache = config.compile_cache_dir or str(workdir.parent.parent / "compile_cache")
    return dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, resolution=spec.input_size, validation_draw=validation_draw
        ),
        train=dataclasses.replace(config.train, steps=steps, epochs=None, select="last"),
        seed=config.seed if seed is None else seed,
        compile_cache_dir=cache,
    )


class TrainingEvaluator:
    """The `Evaluator` that trains candidates with the Training engine.

    Data sets are loaded once per resolution and kept for the life of the worker.

    Args:
        config: the experiment's training sections.
    """

    def __init__(self, config: TrainConfig) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.config = config
        self._data: dict[tuple[int, int], Data] = {}
        if _MIN_COMPILE_ENV not in os.environ:
            # Workers share compiled steps through the search's persistent cache. JAX writes
            # only compiles of >= 1 s there by default, so under load which eval/moments
            # steps get shared is chance; writing every one (tens of small files, < 1 MB per
            # design) saved 0.3-1.3 s per warm process in bench/shared_executables.py
            # --cache-check (bench/README.md, "Shared executables").
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    hosts: HostRegistry | None = None
    """With `search.executables: shared`: the host network each skeleton's candidates train
    on in this process (None: every candidate compiles its own steps)."""

    policy: ExecutablePolicy | None = None
    """With `search.executables: auto`: chooses each candidate's host from this process's
    measured compile and step times (recorded after every rung it trains)."""

    @classmethod
    def from_experiment(cls, experiment: SearchExperiment) -> TrainingEvaluator:
        """Builds the evaluator from a validated experiment, read from a file or built in
        Python (pickled into a spawned worker process, no file read there)."""
        evaluator = cls(experiment.training)
        if experiment.search.executables == "shared":
            # Seeded with the prototype: candidates around it mostly fit inside its widths,
            # so its skeleton does not recompile each time one is a little wider somewhere.
            evaluator.hosts = HostRegistry(seeds=[load_prototype(experiment)])
        elif experiment.search.executables == "auto":
            evaluator.policy = ExecutablePolicy(seeds=[load_prototype(experiment)])
        return evaluator

    @classmethod
    def from_file(cls, path: str, overrides: tuple[str, ...] = ()) -> TrainingEvaluator:
        """Builds the evaluator from an experiment file (read again in the calling process)."""
        return cls.from_experiment(load_experiment(path, overrides))

    def data(self, resolution: int, validation_draw: int = 0) -> Data:
        """The data set at `resolution` with validation split `validation_draw` (loaded on
        first use; the preprocessed images are cached on disk once per resolution)."""
        key = (resolution, validation_draw)
        if key not in self._data:
            config = dataclasses.replace(
                self.config.data, resolution=resolution, validation_draw=validation_draw
            )
            self._data[key] = load_data(config, seed=self.config.seed)
        return self._data[key]

    def train(self, request: EvalRequest) -> EvalSuccess | EvalFailure:
        """Trains (or resumes) the candidate to `request.steps`; validation metrics of the
        last checkpoint."""
        config = candidate_config(
            self.config,
            request.spec,
            request.steps,
            request.workdir,
            seed=request.seed,
            validation_draw=request.validation_draw,
        )
        host = self._host_for(request)
        result = self._run(config, request, host)
        if (
            isinstance(result, TrainFailure)
            and host is not None
            and result.kind in ("out_of_memory", "compile_error")
        ):
            # The host's program failed, not necessarily the candidate's: judge the candidate
            # on its own executable (the run resumes from its last good checkpoint, if any).
            # A host out of memory is dropped whatever that run does (it is larger than the
            # candidate); a compile error only when the candidate's own program compiles.
            log.warning(
                "%s on the shared host %s; training trial %s on its own executable instead",
                result.kind,
                host.content_hash(),
                request.workdir.name,
            )
            failed, kind, host = host, result.kind, None
            result = self._run(config, request, host)
            if kind == "out_of_memory" or not isinstance(result, TrainFailure):
                self._forget(failed)
        if isinstance(result, TrainFailure):
            return EvalFailure(_FAILURE_KINDS.get(result.kind, "error"), result.reason)
        if self.policy is not None:
            self.policy.record(
                host,
                compile_s=result.compile_s,
                steps=result.step - (result.resumed_from or 0),
                train_s=result.train_s,
            )
        return EvalSuccess(
            metrics=result.metrics,
            compile_s=result.compile_s,
            train_s=result.train_s + result.eval_s,
            checkpoint=Path(result.checkpoint_dir),
        )

    def _run(
        self, config: TrainConfig, request: EvalRequest, host: AnySpec | None
    ) -> TrainResult | TrainFailure:
        return train_and_evaluate(
            config,
            request.workdir,
            spec=request.spec,
            init_from=request.init_from,
            data=self.data(request.spec.input_size, request.validation_draw),
            show_progress=False,
            host=host,
            on_progress=request.on_progress,
        )

    def _forget(self, host: ArchSpec) -> None:
        if self.hosts is not None:
            self.hosts.forget(host)
        if self.policy is not None:
            self.policy.forget(host)

    def _host_for(self, request: EvalRequest) -> AnySpec | None:
        """The host network `request.spec` trains on (None: its own executable)."""
        if self.hosts is not None:
            return self.hosts.host_for(request.spec)
        if self.policy is not None:
            # The rung resumes from the trial's latest checkpoint: only the rest is trained.
            done = finished_steps(request.workdir / "checkpoints")
            return self.policy.host_for(request.spec, request.steps - (done[-1] if done else 0))
        return None

    def test(self, request: EvalRequest) -> EvalMetrics:
        """Test-split metrics of the checkpoint `request.workdir` hands on (its last)."""
        data = self.data(request.spec.input_size, request.validation_draw)
        return evaluate_workdir(request.workdir, split="test", data=data, scores=False).metrics
