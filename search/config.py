"""The search-specific sections of an experiment file, as frozen typed dataclasses.

A search experiment is a training experiment (data, optimizer, batch size, ...) plus the
sections below. They are validated by `covidnet_jax.typed_yaml` like every other config:
unknown keys, wrong types and out-of-range values are reported with their key path before
any JAX work.

Example (YAML):

    space:
      prototype: covidnet-tiny
      stage_depths: [[1, 2], [1, 2]]
      stage_width: {min: 0.5, max: 1.0, step: 0.25}
      module_width: {min: 0.25, max: 1.0, step: 0.25}
      kernel_sizes: [3, 5]
      connectivity: [dense, residual]
      resolutions: [64]
    requirements:
      max_macs: 2.0e7
      min_accuracy: 0.7
      classes: {COVID-19: {min_sensitivity: 0.6, min_ppv: 0.6}}
    objective: min_macs
    strategy: {name: evolution}
    budget: {max_trials: 24, rungs: [100, 300], reduction_factor: 3}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from covidnet_jax.arch import HeadSpec
from covidnet_jax.block_registry import block_kind
from covidnet_jax.errors import ConfigError, SpecError
from covidnet_jax.typed_yaml import bounded, check

Objective = Literal["min_macs", "max_netscore", "pareto"]


@dataclasses.dataclass(frozen=True)
class WidthRange:
    """An ordered range of width multipliers of the prototype: min, min + step, ..., max.

    Attributes:
        min: smallest multiplier.
        max: largest multiplier.
        step: spacing of the choices.
    """

    min: float = bounded(gt=0)
    max: float = bounded(gt=0)
    step: float = bounded(gt=0)

    def __post_init__(self) -> None:
        if self.max < self.min:
            raise ConfigError(f"max: expected a value >= min {self.min}, got {self.max}")
        count = (self.max - self.min) / self.step
        if abs(count - round(count)) > 1e-6:
            raise ConfigError(
                f"step: expected (max - min) to be a multiple of step, got "
                f"min {self.min}, max {self.max}, step {self.step}"
            )

    @property
    def choices(self) -> tuple[float, ...]:
        """The multipliers, ascending, rounded to 6 decimals."""
        count = round((self.max - self.min) / self.step)
        return tuple(round(self.min + i * self.step, 6) for i in range(count + 1))


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    """The search space around a prototype architecture.

    Widths are multipliers of the prototype's widths: `stage_width` scales each stage's output
    width (one gene per stage, since dense connectivity sums the outputs of a stage), and
    `module_width` scales the inner widths (projection, expansion, projection) of each module
    separately, which gives the heterogeneous per-module widths GenSynth found. A stage deeper
    than the prototype's repeats the prototype stage's last module.

    Attributes:
        prototype: preset name or spec JSON file (a PEPX `ArchSpec`).
        stage_depths: per stage, the (min, max) number of modules; empty keeps the prototype's.
        stage_width: multipliers of each stage's output width.
        module_width: multipliers of each module's inner widths.
        width_divisor: every width is rounded to a multiple of this.
        kernel_sizes: depthwise kernel size choices (one gene per stage); empty keeps the
            prototype's.
        connectivity: connectivity choices ("dense", "residual", "none"); empty keeps the
            prototype's.
        heads: classifier-head choices (`covidnet_jax.arch.HeadSpec`: pool, hidden,
            dropout); empty keeps the prototype's.
        resolutions: input resolution choices; empty keeps the prototype's.
        block_kinds: module kinds to choose among (`covidnet_jax.block_registry`, e.g.
            ["pepx", "se_pepx"]; one gene per module slot); empty keeps the prototype's.
    """

    prototype: str
    stage_depths: tuple[tuple[int, int], ...] = ()
    stage_width: WidthRange = WidthRange(1.0, 1.0, 1.0)
    module_width: WidthRange = WidthRange(1.0, 1.0, 1.0)
    width_divisor: int = bounded(4, ge=1)
    kernel_sizes: tuple[int, ...] = ()
    connectivity: tuple[Literal["dense", "residual", "none"], ...] = ()
    heads: tuple[HeadSpec, ...] = ()
    resolutions: tuple[int, ...] = ()
    block_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, (low, high) in enumerate(self.stage_depths):
            if not 1 <= low <= high:
                raise ConfigError(
                    f"stage_depths[{i}]: expected [min, max] with 1 <= min <= max, "
                    f"got [{low}, {high}]"
                )
        for i, kernel in enumerate(self.kernel_sizes):
            if kernel < 1 or kernel % 2 == 0:
                raise ConfigError(f"kernel_sizes[{i}]: expected an odd size >= 1, got {kernel}")
        for i, size in enumerate(self.resolutions):
            if size < 8:
                raise ConfigError(f"resolutions[{i}]: expected a size >= 8, got {size}")
        for name in ("kernel_sizes", "connectivity", "resolutions", "block_kinds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: choices must be unique, got {list(values)}")
        for i, kind in enumerate(self.block_kinds):
            try:
                block_kind(kind, key=f"block_kinds[{i}]")
            except SpecError as err:
                raise ConfigError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class ClassRequirement:
    """Outcome requirements on one named class (validation split).

    Attributes:
        min_sensitivity: lowest acceptable recall of the class.
        min_ppv: lowest acceptable precision of the class.
    """

    min_sensitivity: float | None = bounded(None, ge=0.0, le=1.0)
    min_ppv: float | None = bounded(None, ge=0.0, le=1.0)


Decision = Literal["point", "lower_bound"]


@dataclasses.dataclass(frozen=True)
class RequirementsConfig:
    """Design requirements: a design is feasible only if every one holds.

    Outcome requirements are judged on the validation split, which is a sample: with
    `decision: lower_bound` (the default) a minimum holds only when the one-sided lower
    confidence bound of the rate clears it, so a design is not called feasible on the strength
    of a few lucky images; `point` compares the plain rate (the behaviour before intervals).

    Attributes:
        max_macs: hard limit on multiply-accumulates per image (known before training).
        max_params: hard limit on parameters.
        max_activation_bytes: hard limit on training activation memory at the batch size.
        min_accuracy: lowest acceptable validation accuracy.
        classes: per class name, minimum sensitivity and PPV.
        decision: "lower_bound" (judge each rate by its one-sided lower confidence bound)
            or "point" (by the rate itself).
        confidence: confidence of the one-sided bounds, and coverage of the two-sided
            intervals that reports show.
        interval: "wilson" (Wilson score) or "clopper_pearson" (exact, more conservative).
    """

    max_macs: float | None = bounded(None, gt=0)
    max_params: float | None = bounded(None, gt=0)
    max_activation_bytes: float | None = bounded(None, gt=0)
    min_accuracy: float | None = bounded(None, ge=0.0, le=1.0)
    classes: Mapping[str, ClassRequirement] = dataclasses.field(default_factory=dict)
    decision: Decision = "lower_bound"
    confidence: float = bounded(0.95, gt=0.5, lt=1.0)
    interval: Literal["wilson", "clopper_pearson"] = "wilson"


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """How candidates are proposed.

    Attributes:
        name: a registered strategy (`search.strategies.registry`): "random", "evolution"
            (regularized/aging evolution), "shrink" (GenSynth-style shrinking of the
            prototype), "tpe" or "nsga2" (from Optuna), or one a user registered. The name is
            checked against the registry when the search starts.
        startup_trials: random proposals before evolution or TPE take over.
        population_size: evolution's sliding window of recent trained designs; NSGA-II's
            generation size.
        tournament_size: evolution's tournament sample size.
        mutations: evolution's mutations per child.
        shrink_modules: shrink lowers up to this many modules' widths per child.
        inherit_weights: evolution and shrink children start from their parent's checkpoint
            where shapes allow.
        max_resample: proposals a custom strategy retries to avoid an already-seen design.
    """

    name: str = "evolution"
    startup_trials: int = bounded(4, ge=0)
    population_size: int = bounded(8, ge=2)
    tournament_size: int = bounded(3, ge=1)
    mutations: int = bounded(1, ge=1)
    shrink_modules: int = bounded(2, ge=1)
    inherit_weights: bool = True
    max_resample: int = bounded(20, ge=1)

    def __post_init__(self) -> None:
        if self.tournament_size > self.population_size:
            raise ConfigError(
                f"tournament_size: expected a value <= population_size "
                f"{self.population_size}, got {self.tournament_size}"
            )


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """What the search may spend.

    Attributes:
        max_trials: candidates proposed (feasible or not, duplicates included; retries
            are not proposals).
        max_wall_time_s: stop proposing after this many seconds of proposing, counted over
            all invocations of the search (a resume continues the clock; running trials
            finish). Raise it with `--set` to extend a search that spent it.
        rungs: training steps of each fidelity rung, ascending (successive halving).
        reduction_factor: a candidate is promoted to the next rung when it ranks in the top
            1/reduction_factor of those that finished the rung.
        final_steps: steps of the best design's full-fidelity retraining (0: the last rung).
        max_consecutive_infeasible: give up after this many infeasible proposals in a row.
        max_retries: times a candidate whose training failed on its own with a kind that
            can be transient (out of memory, an unexpected error) is tried again. A trial
            whose worker died (killed, pre-empted, rebooted) is always retried, however
            often, and does not count: being killed says nothing about the candidate.
        stop_on_feasible: stop as soon as one design meets every requirement (to find any
            acceptable design fast, and for the search-efficiency benchmark).
        cost_prefilter: reject designs over a hard cost limit before training (false trains
            them anyway and records them as infeasible after training; for ablations only).
    """

    max_trials: int = bounded(20, ge=1)
    max_wall_time_s: float = bounded(3600.0, gt=0)
    rungs: tuple[int, ...] = (200, 600, 1800)
    reduction_factor: int = bounded(3, ge=2)
    final_steps: int = bounded(0, ge=0)
    max_consecutive_infeasible: int = bounded(200, ge=1)
    max_retries: int = bounded(1, ge=0)
    stop_on_feasible: bool = False
    cost_prefilter: bool = True

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ConfigError("rungs: expected at least one rung, got []")
        for i, steps in enumerate(self.rungs):
            if steps < 1:
                raise ConfigError(f"rungs[{i}]: expected steps >= 1, got {steps}")
        for i in range(1, len(self.rungs)):
            if self.rungs[i] <= self.rungs[i - 1]:
                raise ConfigError(f"rungs[{i}]: expected ascending steps, got {list(self.rungs)}")

    @property
    def full_fidelity_steps(self) -> int:
        """Steps of the final retraining of the best design."""
        return self.final_steps or self.rungs[-1]


@dataclasses.dataclass(frozen=True)
class ConfirmConfig:
    """How the search confirms its final design before declaring it.

    The top-ranked feasible design is trained again at the full-fidelity budget with
    `seeds` further training seeds, each from scratch and each judged on its own
    patient-disjoint validation split (another draw of validation patients), so that
    neither a lucky initialization nor the validation images the design was chosen on
    carry the verdict. The design is confirmed only when the requirements hold (by the
    search's decision rule) for its own run continued to full fidelity and for every
    confirmation run; otherwise the next-ranked feasible design is tried.

    Attributes:
        seeds: confirmation runs per design (0: no confirmation; the final training alone
            is judged).
        max_candidates: feasible designs tried, best first, before the search reports that
            none was confirmed.
    """

    seeds: int = bounded(2, ge=0, le=16)
    max_candidates: int = bounded(3, ge=1, le=100)


@dataclasses.dataclass(frozen=True)
class HeartbeatConfig:
    """Detection of trials whose worker died.

    Attributes:
        interval_s: a running trial records a heartbeat this often.
        grace_s: a running trial without a heartbeat for this long is stale (its worker is
            presumed dead) and is retried or marked failed.
    """

    interval_s: float = bounded(5.0, gt=0)
    grace_s: float = bounded(60.0, gt=0)

    def __post_init__(self) -> None:
        if self.grace_s <= self.interval_s:
            raise ConfigError(
                f"grace_s: expected a value > interval_s {self.interval_s}, got {self.grace_s}"
            )


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The `search:` section of an experiment file.

    Attributes:
        space: the search space.
        requirements: design requirements (hard cost limits, outcome minimums).
        objective: "min_macs" (fewest MACs among feasible designs), "max_netscore" or
            "pareto" (validation accuracy vs MACs).
        strategy: how candidates are proposed.
        budget: trials, wall time, fidelity rungs.
        confirm: the final design's confirmation over further seeds and validation splits.
        heartbeat: dead-worker detection.
        seed: root seed of the proposals (training keeps its own `seed`).
        workers: worker processes (`--workers` overrides).
        study_name: the Optuna study name (default: the workdir's name).
        artifact_root: the directory every trial's checkpoints, the confirmation runs, the
            best design and the leaderboard go to ("": the workdir). Hosts that run one
            search each keep their own workdir (config, compilation cache) and share this
            directory, a mounted file system (NFS, or a bucket through gcsfuse/s3fs): paths
            the records hold are relative to it, so any host reads any trial's checkpoint.
            Relative paths are taken from the current directory.
        executables: how candidates get compiled train and eval steps. "auto" (the
            default): per candidate and rung, run on a host network this worker already
            compiled, with the surplus channels masked, or compile a new one, whichever is
            predicted to finish sooner from the worker's measured compile and step times
            (`shared_widths.ExecutablePolicy`). "shared": designs that differ only in
            widths always train on one compiled step of a wider host network (the same
            training to float summation order, one compile per skeleton and host;
            checkpoints hold each design's own network; `covidnet_jax.shared_widths`).
            "exact": every design compiles its own steps. In the quickstart search (2
            workers, 360 s, 2 repeats on 2 quiet cores) "auto" trained 3.3x and 2.7x the
            candidate-rungs of "exact" ("shared" 3.3x, 2.9x), with compiles 11-12% of
            candidate compute against 78-79% (bench/README.md, "Search throughput").
    """

    space: SpaceConfig
    requirements: RequirementsConfig = RequirementsConfig()
    objective: Objective = "min_macs"
    strategy: StrategyConfig = StrategyConfig()
    budget: BudgetConfig = BudgetConfig()
    confirm: ConfirmConfig = ConfirmConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    seed: int = 0
    workers: int = bounded(1, ge=1)
    study_name: str = ""
    artifact_root: str = ""
    executables: Literal["exact", "shared", "auto"] = "auto"

    def __post_init__(self) -> None:
        check(self, path="search")  # built in Python: validated as the file's section is
        if "://" in self.artifact_root:
            # Crash safety rests on atomic renames (a checkpoint step, a copied run), which
            # object stores do not have: a bucket is used through a mount.
            raise ConfigError(
                f"search.artifact_root: expected a mounted directory, got the URL "
                f"{self.artifact_root!r}; mount the bucket (gcsfuse, s3fs) and give its path"
            )
