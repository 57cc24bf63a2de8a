"""The search space: a genome of discrete genes around a prototype PEPX `ArchSpec`.

Every design choice is a gene whose value is an index into an ordered tuple of choices, and
is stored as an Optuna integer parameter of that name:

    s{i}.depth        modules in stage i            (ordered)
    s{i}.width        stage i output-width multiplier (ordered)
    s{i}.kernel       stage i depthwise kernel size  (ordered)
    s{i}.m{j}.width   module j of stage i: inner-width multiplier (ordered)
    s{i}.m{j}.kind    module j of stage i: block kind from `space.block_kinds` (unordered)
    s{i}.m{j}.<kind>.<field>  module j of stage i: a field of that kind (`BlockKind.genes`,
                      ordered), active while the module is of that kind
    connectivity      "dense" | "residual" | "none"  (unordered)
    head              index into `space.heads`       (unordered)
    resolution        input size                     (ordered)

The genome is static: module genes exist up to each stage's maximum depth, and those beyond
the current depth are inactive (they do not change the spec), so TPE and NSGA-II see one fixed
search space. Genes with a single choice are omitted. `decode` turns a genome into a spec;
the mutation operators below change genes in ways that change the spec.

Example:
    >>> from covidnet_jax import presets
    >>> space = SearchSpace(SpaceConfig(prototype="tiny"), presets.get_preset("tiny"))
    >>> space.decode(space.prototype_genome()) == presets.get_preset("tiny")
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import optuna

from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec
from covidnet_jax.block_registry import block_kind
from covidnet_jax.errors import ConfigError
from search.config import SpaceConfig
from search.ledger.records import Genome


@dataclasses.dataclass(frozen=True)
class Gene:
    """One design choice.

    Attributes:
        name: the Optuna parameter name.
        choices: the values the index selects among.
        ordered: whether neighbouring choices are similar (mutations then step by one).
        stage: the stage the gene belongs to (None for global genes).
        module: the module index for per-module genes.
        role: "depth", "stage_width", "kernel", "module_width", "block_kind",
            "block_option", "connectivity", "head" or "resolution".
        block: for "block_option" genes, the block kind whose field it sets.
        option: for "block_option" genes, the field (`ModuleSpec.options` key).
    """

    name: str
    choices: tuple
    ordered: bool
    role: Literal[
        "depth",
        "stage_width",
        "kernel",
        "module_width",
        "block_kind",
        "block_option",
        "connectivity",
        "head",
        "resolution",
    ]
    stage: int | None = None
    module: int | None = None
    block: str | None = None
    option: str | None = None

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of the gene's index."""
        if self.ordered:
            return optuna.distributions.IntDistribution(0, len(self.choices) - 1)
        return optuna.distributions.CategoricalDistribution(tuple(range(len(self.choices))))


def _nearest_index(choices: Sequence[float], value: float) -> int:
    return int(np.argmin([abs(c - value) for c in choices]))


def _round_width(value: float, divisor: int) -> int:
    return max(divisor, round(value / divisor) * divisor)


class SearchSpace:
    """Genes around a prototype, decoding, and the mutation operators.

    Args:
        config: the `space:` section.
        prototype: the prototype spec (a PEPX `ArchSpec`).
        class_names: the classes the decoded specs predict (default: the prototype's).

    Raises:
        ConfigError: if the prototype is not a PEPX spec or `stage_depths` does not match its
            number of stages.
    """

    def __init__(
        self,
        config: SpaceConfig,
        prototype: ArchSpec,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(prototype, ArchSpec):
            raise ConfigError(
                f"space.prototype: expected a PEPX architecture, got a {prototype.TYPE!r} spec"
            )
        if class_names is not None:
            prototype = prototype.with_head_classes(tuple(class_names))
        stages = prototype.stages
        if config.stage_depths and len(config.stage_depths) != len(stages):
            raise ConfigError(
                f"space.stage_depths: expected {len(stages)} [min, max] pairs (one per stage of "
                f"the prototype {config.prototype!r}), got {len(config.stage_depths)}"
            )
        self.config = config
        self.prototype = prototype
        depth_ranges = config.stage_depths or tuple((len(s.modules),) * 2 for s in stages)
        self._depth_choices = tuple(tuple(range(lo, hi + 1)) for lo, hi in depth_ranges)
        self._kernel_choices = tuple(sorted(config.kernel_sizes))
        self._connectivity = tuple(config.connectivity) or (prototype.connectivity,)
        self._heads = tuple(config.heads) or (prototype.head,)
        self._resolutions = tuple(sorted(config.resolutions)) or (prototype.input_size,)
        # Empty: each module keeps its prototype template's kind (no gene).
        self._block_kinds = tuple(config.block_kinds)

        genes: list[Gene] = []
        for i, depths in enumerate(self._depth_choices):
            genes.append(Gene(f"s{i}.depth", depths, True, "depth", stage=i))
            genes.append(
                Gene(f"s{i}.width", config.stage_width.choices, True, "stage_width", stage=i)
            )
            if self._kernel_choices:
                genes.append(Gene(f"s{i}.kernel", self._kernel_choices, True, "kernel", stage=i))
            for j in range(max(depths)):
                genes.append(
                    Gene(
                        f"s{i}.m{j}.width",
                        config.module_width.choices,
                        True,
                        "module_width",
                        stage=i,
                        module=j,
                    )
                )
                if self._block_kinds:
                    genes.append(
                        Gene(
                            f"s{i}.m{j}.kind",
                            self._block_kinds,
                            False,
                            "block_kind",
                            stage=i,
                            module=j,
                        )
                    )
                for kind in self._block_kinds:
                    for field, choices in block_kind(kind).genes.items():
                        genes.append(
                            Gene(
                                f"s{i}.m{j}.{kind}.{field}",
                                choices,
                                True,
                                "block_option",
                                stage=i,
                                module=j,
                                block=kind,
                                option=field,
                            )
                        )
        genes.append(Gene("connectivity", self._connectivity, False, "connectivity"))
        genes.append(Gene("head", tuple(range(len(self._heads))), False, "head"))
        genes.append(Gene("resolution", self._resolutions, True, "resolution"))
        self.genes: tuple[Gene, ...] = tuple(g for g in genes if len(g.choices) > 1)
        self._all_genes = {g.name: g for g in genes}

    # Optuna ---------------------------------------------------------------------------------

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Name -> Optuna distribution of every gene."""
        return {g.name: g.distribution() for g in self.genes}

    def suggest(self, trial: optuna.Trial) -> Genome:
        """Asks the trial's sampler for every gene (in a fixed order) and returns the genome."""
        genome: Genome = {}
        for gene in self.genes:
            if gene.ordered:
                genome[gene.name] = trial.suggest_int(gene.name, 0, len(gene.choices) - 1)
            else:
                genome[gene.name] = trial.suggest_categorical(
                    gene.name, tuple(range(len(gene.choices)))
                )
        return genome

    # Genomes --------------------------------------------------------------------------------

    def _value(self, genome: Mapping[str, int], name: str, default: int = 0):
        gene = self._all_genes[name]
        return gene.choices[genome.get(name, default)]

    def prototype_genome(self) -> Genome:
        """The genome closest to the prototype (its depths, multipliers 1, its kernels, ...)."""
        proto = self.prototype
        values: Genome = {}
        for gene in self.genes:
            i = gene.stage
            if gene.role == "depth":
                index = _nearest_index(gene.choices, len(proto.stages[i].modules))
            elif gene.role in ("stage_width", "module_width"):
                index = _nearest_index(gene.choices, 1.0)
            elif gene.role == "kernel":
                index = _nearest_index(gene.choices, proto.stages[i].modules[0].kernel_size)
            elif gene.role == "block_kind":
                index = self._template_kind_index(i, gene.module)
            elif gene.role == "block_option":
                index = self._template_option_index(gene)
            elif gene.role == "connectivity":
                index = (
                    gene.choices.index(proto.connectivity)
                    if (proto.connectivity in gene.choices)
                    else 0
                )
            elif gene.role == "head":
                index = self._heads.index(proto.head) if proto.head in self._heads else 0
            else:
                index = _nearest_index(gene.choices, proto.input_size)
            values[gene.name] = index
        return values

    def _template(self, stage: int, module: int) -> ModuleSpec:
        """The prototype module that module slot `module` of `stage` is derived from."""
        modules = self.prototype.stages[stage].modules
        return modules[min(module, len(modules) - 1)]

    def _template_kind_index(self, stage: int, module: int) -> int:
        kind = self._template(stage, module).kind
        return self._block_kinds.index(kind) if kind in self._block_kinds else 0

    def _template_option_index(self, gene: Gene) -> int:
        """The choice nearest the template's value of the field (else the kind's default)."""
        template = self._template(gene.stage, gene.module)
        value = (
            template.options[gene.option]
            if template.kind == gene.block
            else block_kind(gene.block).fields[gene.option]
        )
        return _nearest_index(gene.choices, value)

    def kind_of(self, genome: Mapping[str, int], stage: int, module: int) -> str:
        """The block kind of module slot `module` of `stage` in `genome`."""
        if not self._block_kinds:
            return self._template(stage, module).kind
        return self._value(
            genome, f"s{stage}.m{module}.kind", self._template_kind_index(stage, module)
        )

    def _active(self, gene: Gene, genome: Mapping[str, int]) -> bool:
        """Whether the gene changes the spec (its module exists and, for a field, is of
        the field's kind)."""
        if gene.module is None:
            return True
        if gene.module >= self.depth(genome, gene.stage):
            return False
        return gene.block is None or self.kind_of(genome, gene.stage, gene.module) == gene.block

    def random_genome(self, rng: np.random.Generator) -> Genome:
        """Every gene drawn uniformly."""
        return {g.name: int(rng.integers(len(g.choices))) for g in self.genes}

    def depth(self, genome: Mapping[str, int], stage: int) -> int:
        """The number of modules of `stage` in `genome`."""
        return int(self._value(genome, f"s{stage}.depth", self._default_depth_index(stage)))

    def _default_depth_index(self, stage: int) -> int:
        return _nearest_index(self._depth_choices[stage], len(self.prototype.stages[stage].modules))

    def decode(self, genome: Mapping[str, int]) -> ArchSpec:
        """The spec a genome describes (validated by `ArchSpec`).

        Args:
            genome: gene name -> index; genes absent from it take their only choice.

        Returns:
            The PEPX spec.
        """
        proto = self.prototype
        divisor = self.config.width_divisor
        stages = []
        for i, proto_stage in enumerate(proto.stages):
            stage_mult = self._value(
                genome, f"s{i}.width", _nearest_index(self.config.stage_width.choices, 1.0)
            )
            kernel = self._value(genome, f"s{i}.kernel") if self._kernel_choices else None
            modules = []
            for j in range(self.depth(genome, i)):
                template = self._template(i, j)
                kind = self.kind_of(genome, i, j)
                # Another kind than the template's: its options start from their defaults.
                options = dict(template.options) if kind == template.kind else {}
                if kind in self._block_kinds:
                    for field in block_kind(kind).genes:
                        name = f"s{i}.m{j}.{kind}.{field}"
                        gene = self._all_genes[name]
                        options[field] = self._value(
                            genome, name, self._template_option_index(gene)
                        )
                mult = self._value(
                    genome,
                    f"s{i}.m{j}.width",
                    _nearest_index(self.config.module_width.choices, 1.0),
                )
                modules.append(
                    ModuleSpec(
                        proj1=_round_width(template.proj1 * mult, divisor),
                        expand=_round_width(template.expand * mult, divisor),
                        proj2=_round_width(template.proj2 * mult, divisor),
                        out=_round_width(template.out * stage_mult, divisor),
                        kernel_size=kernel or template.kernel_size,
                        kind=kind,
                        options=options,
                    )
                )
            stages.append(StageSpec(stride=proto_stage.stride, modules=tuple(modules)))
        return dataclasses.replace(
            proto,
            input_size=int(self._value(genome, "resolution")),
            stages=tuple(stages),
            connectivity=self._value(genome, "connectivity"),
            head=self._heads[self._value(genome, "head")],
        )

    def describe(self, genome: Mapping[str, int]) -> dict[str, int | str]:
        """Each gene's value as a person reads it, taken from the decoded spec.

        The genome's own values are choice indices (Optuna's parameters, which samplers and
        resumed studies depend on); this is what they select:

            s{i}.depth        modules in the stage (int)
            s{i}.width        output channels of the stage's first module (int)
            s{i}.kernel       depthwise kernel size (int)
            s{i}.m{j}.width   "proj1/expand/proj2" channels of module j, or "unused" when the
                              stage has j modules or fewer
            s{i}.m{j}.kind    the block kind of module j (e.g. "se_pepx"), or "unused"
            s{i}.m{j}.<kind>.<field>  the field's value, or "unused" when module j is
                              absent or of another kind
            connectivity      "dense" | "residual" | "none"
            head              e.g. "avg", "flatten fc64 drop0.5"
            resolution        input size in pixels (int)

        Args:
            genome: gene name -> index (as for `decode`).

        Returns:
            gene name -> readable value, for every gene of `self.genes`, in their order.

        Raises:
            SpecError: if the genome decodes to no valid spec.

        Example:
            >>> from covidnet_jax import presets
            >>> config = SpaceConfig(prototype="tiny", kernel_sizes=(3, 5))
            >>> space = SearchSpace(config, presets.get_preset("tiny"))
            >>> space.describe(space.prototype_genome())
            {'s0.kernel': 3, 's1.kernel': 5}
        """
        spec = self.decode(genome)
        values: dict[str, int | str] = {}
        for gene in self.genes:
            stage = spec.stages[gene.stage] if gene.stage is not None else None
            if gene.role == "depth":
                values[gene.name] = len(stage.modules)
            elif gene.role == "stage_width":
                values[gene.name] = stage.modules[0].out
            elif gene.role == "kernel":
                values[gene.name] = stage.modules[0].kernel_size
            elif gene.role == "module_width":
                if gene.module < len(stage.modules):
                    m = stage.modules[gene.module]
                    values[gene.name] = f"{m.proj1}/{m.expand}/{m.proj2}"
                else:
                    values[gene.name] = "unused"
            elif gene.role == "block_kind":
                values[gene.name] = (
                    stage.modules[gene.module].kind
                    if gene.module < len(stage.modules)
                    else "unused"
                )
            elif gene.role == "block_option":
                module = stage.modules[gene.module] if gene.module < len(stage.modules) else None
                values[gene.name] = (
                    module.options[gene.option]
                    if module is not None and module.kind == gene.block
                    else "unused"
                )
            elif gene.role == "connectivity":
                values[gene.name] = spec.connectivity
            elif gene.role == "head":
                head = spec.head
                hidden = "".join(f" fc{width}" for width in head.hidden)
                dropout = f" drop{head.dropout:g}" if head.dropout else ""
                values[gene.name] = f"{head.pool}{hidden}{dropout}"
            else:
                values[gene.name] = spec.input_size
        return values

    # Mutations ------------------------------------------------------------------------------

    def mutation_options(self, genome: Mapping[str, int]) -> list[tuple[str, Genome]]:
        """Every single-step mutation of `genome` that changes the spec.

        Operators: widen/narrow a module or a stage by one multiplier step, add/remove a
        module within the depth bounds (a new module copies its predecessor's width, kind
        and kind fields), change a module's kind or a field of its kind by one step, a stage's kernel size, the connectivity, the head or
        the resolution.

        Returns:
            (description, child genome) pairs, in a fixed order.
        """
        options: list[tuple[str, Genome]] = []
        for gene in self.genes:
            index = genome[gene.name]
            if not self._active(gene, genome):
                continue  # a module beyond the depth, or a field of another kind
            if gene.ordered:
                steps = (-1, 1)
            else:
                steps = tuple(k - index for k in range(len(gene.choices)) if k != index)
            for step in steps:
                new = index + step
                if not 0 <= new < len(gene.choices):
                    continue
                child = dict(genome)
                child[gene.name] = new
                if gene.role == "depth" and step > 0:
                    added = self.depth(child, gene.stage) - 1
                    if added > 0:
                        kind_fields = (
                            f"{kind}.{field}"
                            for kind in self._block_kinds
                            for field in block_kind(kind).genes
                        )
                        for field in ("width", "kind", *kind_fields):
                            prev = f"s{gene.stage}.m{added - 1}.{field}"
                            slot = f"s{gene.stage}.m{added}.{field}"
                            if prev in child and slot in child:
                                child[slot] = child[prev]
                options.append((f"{_verb(gene, step)} {gene.name}", child))
        return options

    def shrink_options(self, genome: Mapping[str, int]) -> list[tuple[str, Genome]]:
        """The mutations that make a design smaller: narrower modules and stages, fewer modules.

        Returns:
            (gene name, child genome) pairs, in a fixed order.
        """
        options: list[tuple[str, Genome]] = []
        for gene in self.genes:
            if gene.role not in ("module_width", "stage_width", "depth"):
                continue
            if gene.role == "module_width" and gene.module >= self.depth(genome, gene.stage):
                continue
            if genome[gene.name] > 0:
                child = dict(genome)
                child[gene.name] -= 1
                options.append((gene.name, child))
        return options


def _verb(gene: Gene, step: int) -> str:
    if gene.role == "depth":
        return "add module to" if step > 0 else "remove module from"
    if gene.role in ("module_width", "stage_width"):
        return "widen" if step > 0 else "narrow"
    return "change"
