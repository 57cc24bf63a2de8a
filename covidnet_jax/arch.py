"""Architecture specs: whole networks described as frozen, hashable, JSON-round-tripping data.

Three spec types share one interface (`to_json`, `from_json`, `content_hash`, `summary`,
`with_input_size`, `with_num_classes`, `with_head_classes`, `num_classes`):

- `ArchSpec` (JSON type tag `"pepx"`): a COVID-Net style network. A stem, stages of PEPX
  modules (or modules of another registered block kind, `covidnet_jax.block_registry`)
  with per-module widths and kernel sizes, a stage stride, long-range connectivity
  (`"dense"`, `"residual"`, `"none"`), normalization, activation and a classifier head.
- `ResNetSpec` (`"resnet"`): a ResNet v1.5 bottleneck baseline (stride on the 3x3 conv).
- `VGGSpec` (`"vgg"`): a VGG baseline (3x3 convs, 2x2 max-pool after each stage).

Every spec validates itself at construction: a `SpecError` names the field and quotes the bad
value (`stages[1].modules[0].expand: expected an int in [1, 65536], got 0`). `spec_from_json`
dispatches on the `"type"` tag and reports field paths the same way. The search mutates specs
with `dataclasses.replace`; widths live in `ModuleSpec`, depth is the length of
`StageSpec.modules`.

Example:
    >>> spec = ArchSpec(
    ...     input_size=32,
    ...     stem=StemSpec(channels=8, kernel_size=3, stride=1, pool_size=0),
    ...     stages=(StageSpec(stride=1, modules=(ModuleSpec(4, 16, 4, 16, 3),)),),
    ... )
    >>> spec_from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from covidnet_jax.block_registry import block_kind
from covidnet_jax.errors import SpecError
from covidnet_jax.typed_yaml import JSON_SPEC, FrozenDict, describe, from_dict, to_dict

COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
"""Class names of the 3-class COVIDx releases, in label-index order."""

Connectivity = Literal["dense", "residual", "none"]
Norm = Literal["batchnorm", "none"]
Activation = Literal["relu", "relu6", "silu", "gelu"]
Pool = Literal["avg", "flatten"]

CONNECTIVITIES: tuple[str, ...] = typing.get_args(Connectivity)
NORMS: tuple[str, ...] = typing.get_args(Norm)
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
POOLS: tuple[str, ...] = typing.get_args(Pool)

MAX_WIDTH = 65536
MAX_KERNEL = 15
MAX_STRIDE = 4
MAX_INPUT_SIZE = 4096

S = TypeVar("S", bound="_SpecMethods")


def _check_int(field: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"{field}: expected an int in [{lo}, {hi}], got {describe(value)}")


def _check_kernel(field: str, value: Any) -> None:
    _check_int(field, value, 1, MAX_KERNEL)
    if value % 2 == 0:
        raise SpecError(f"{field}: expected an odd kernel size, got {describe(value)}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        options = ", ".join(repr(c) for c in choices)
        raise SpecError(f"{field}: expected one of {options}, got {describe(value)}")


def _check_tuple(field: str, value: Any) -> None:
    if not isinstance(value, tuple):
        raise SpecError(f"{field}: expected a tuple, got {describe(value)}")


def _check_class_names(field: str, names: Any) -> None:
    _check_tuple(field, names)
    if len(names) < 2:
        raise SpecError(f"{field}: expected at least 2 class names, got {describe(names)}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise SpecError(f"{field}[{i}]: expected a non-empty string, got {describe(name)}")
    if len(set(names)) != len(names):
        raise SpecError(f"{field}: class names must be unique, got {describe(names)}")


def _check_input(spec: Any) -> None:
    _check_int("input_size", spec.input_size, 1, MAX_INPUT_SIZE)
    _check_int("input_channels", spec.input_channels, 1, 64)
    _check_class_names("class_names", spec.class_names)


def conv_out_size(size: int, stride: int) -> int:
    """Spatial size after a SAME-padded conv or pool with `stride` (ceil division)."""
    return -(-size // stride)


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """Widths of one PEPX module (projection-expansion-projection-extension).

    Attributes:
        proj1: channels of the first-stage 1x1 projection.
        expand: channels of the 1x1 expansion, also the depthwise conv's channels.
        proj2: channels of the second-stage 1x1 projection.
        out: channels of the 1x1 extension, the module's output width.
        kernel_size: odd size of the depthwise conv (it carries the stage stride).
        kind: the block kind (`covidnet_jax.block_registry`): "pepx" (the default) or
            another registered kind such as "se_pepx". A "pepx" module writes neither
            `kind` nor `options` to spec JSON, so specs from before kinds keep their hash.
        options: the kind's extra fields; missing ones take the kind's defaults, so a
            spec always holds all of them.
    """

    proj1: int
    expand: int
    proj2: int
    out: int
    kernel_size: int = 3
    kind: str = "pepx"
    options: Mapping[str, int | float] = FrozenDict()

    def __post_init__(self) -> None:
        for name in ("proj1", "expand", "proj2", "out"):
            _check_int(name, getattr(self, name), 1, MAX_WIDTH)
        _check_kernel("kernel_size", self.kernel_size)
        block = block_kind(self.kind)
        if not isinstance(self.options, Mapping):
            raise SpecError(f"options: expected a mapping, got {describe(self.options)}")
        unknown = sorted(set(self.options) - set(block.fields))
        if unknown:
            expected = ", ".join(block.fields) or "no options"
            raise SpecError(
                f"options.{unknown[0]}: not a field of block kind {self.kind!r} "
                f"(expected: {expected})"
            )
        for name, value in self.options.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"options.{name}: expected a number, got {describe(value)}")
        # Frozen: filled in once here, so equal designs compare and hash equal.
        object.__setattr__(self, "options", FrozenDict({**block.fields, **self.options}))
        if block.validate is not None:
            block.validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; a "pepx" module omits `kind` and `options` (its JSON predates them)."""
        data = to_dict(self)
        if self.kind == "pepx" and not self.options:
            del data["kind"], data["options"]
        return data

    def label(self) -> str:
        """Compact form for summaries, e.g. `4-16-4-16k3` or `se_pepx(se_ratio=4):4-16-4-16k3`."""
        widths = f"{self.proj1}-{self.expand}-{self.proj2}-{self.out}k{self.kernel_size}"
        if self.kind == "pepx" and not self.options:
            return widths
        options = ",".join(f"{k}={v:g}" for k, v in self.options.items())
        return f"{self.kind}({options}):{widths}" if options else f"{self.kind}:{widths}"


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A stage: PEPX modules at one resolution; the first module applies `stride`.

    Attributes:
        stride: spatial stride of the stage's first module (1 keeps the resolution).
        modules: the stage's PEPX modules, at least one. With dense connectivity all
            modules of a stage share one output width (their outputs are summed).
    """

    stride: int
    modules: tuple[ModuleSpec, ...]

    def __post_init__(self) -> None:
        _check_int("stride", self.stride, 1, MAX_STRIDE)
        _check_tuple("modules", self.modules)
        if not self.modules:
            raise SpecError("modules: expected at least one module, got ()")
        for i, module in enumerate(self.modules):
            if not isinstance(module, ModuleSpec):
                raise SpecError(f"modules[{i}]: expected a ModuleSpec, got {describe(module)}")

    @property
    def width(self) -> int:
        """Output channels of the stage (its last module's `out`)."""
        return self.modules[-1].out


@dataclasses.dataclass(frozen=True)
class StemSpec:
    """The stem: one conv (+ norm + activation), then an optional max-pool.

    Attributes:
        channels: output channels of the stem conv.
        kernel_size: odd kernel size of the stem conv.
        stride: stride of the stem conv.
        pool_size: max-pool window (0: no pool).
        pool_stride: max-pool stride (ignored when `pool_size` is 0).
    """

    channels: int = 64
    kernel_size: int = 7
    stride: int = 2
    pool_size: int = 2
    pool_stride: int = 2

    def __post_init__(self) -> None:
        _check_int("channels", self.channels, 1, MAX_WIDTH)
        _check_kernel("kernel_size", self.kernel_size)
        _check_int("stride", self.stride, 1, MAX_STRIDE)
        _check_int("pool_size", self.pool_size, 0, 8)
        _check_int("pool_stride", self.pool_stride, 1, MAX_STRIDE)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The classifier head: pool (or flatten), hidden FC layers with dropout, logits.

    Dropout (when `dropout` > 0) is applied before every FC layer, the logits layer included.

    Attributes:
        pool: "avg" (global average pooling) or "flatten" (keeps the spatial layout).
        hidden: widths of the hidden FC layers, each followed by the activation.
        dropout: dropout rate in [0, 1).
    """

    pool: Pool = "avg"
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("pool", self.pool, POOLS)
        _check_tuple("hidden", self.hidden)
        for i, width in enumerate(self.hidden):
            _check_int(f"hidden[{i}]", width, 1, MAX_WIDTH)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise SpecError(f"dropout: expected a number in [0, 1), got {describe(self.dropout)}")


class _SpecMethods:
    """Methods shared by the spec types: JSON, hashing, input-size and class helpers."""

    TYPE: ClassVar[str]
    input_size: int
    input_channels: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-ready data, with its `"type"` tag first."""
        data = {"type": self.TYPE, **to_dict(self)}
        # PEPX stages: each module writes itself (a "pepx" module omits its kind).
        for stage_data, stage in zip(
            data.get("stages", ()), getattr(self, "stages", ()), strict=True
        ):
            if isinstance(stage, StageSpec):
                stage_data["modules"] = [m.to_dict() for m in stage.modules]
        return data

    def to_json(self, *, indent: int | None = 2) -> str:
        """The spec as JSON text (`spec_from_json` reads it back to an equal spec)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        """Parses JSON written by `to_json` into this spec type.

        Raises:
            SpecError: invalid JSON, a wrong type tag, or a field path and its bad value.
        """
        spec = spec_from_json(text)
        if not isinstance(spec, cls):
            raise SpecError(f"type: expected {cls.TYPE!r}, got {spec.TYPE!r}")
        return spec

    def content_hash(self) -> str:
        """A stable 16-hex-digit digest of the spec's content.

        Computed from canonical JSON (sorted keys, no whitespace), so it does not depend on
        field order, dict order or Python's hash seed. Equal specs have equal hashes.
        """
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def with_input_size(self: S, size: int) -> S:
        """A copy at input resolution `size` x `size` (validated)."""
        return dataclasses.replace(self, input_size=size)

    def with_head_classes(self: S, names: tuple[str, ...] | list[str]) -> S:
        """A copy whose head predicts `names` (in label-index order)."""
        return dataclasses.replace(self, class_names=tuple(names))

    def with_num_classes(self: S, k: int) -> S:
        """A copy with `k` classes: unchanged when `k` matches, else `class_0..class_{k-1}`."""
        _check_int("num_classes", k, 2, 1_000_000)
        if k == self.num_classes:
            return self
        return self.with_head_classes(tuple(f"class_{i}" for i in range(k)))


@dataclasses.dataclass(frozen=True)
class ArchSpec(_SpecMethods):
    """A COVID-Net style network: stem, stages of PEPX modules, connectivity, head.

    Attributes:
        input_size: height and width of the (square) input image.
        stem: the stem conv and pool.
        stages: the PEPX stages, in order.
        input_channels: channels of the input image.
        class_names: the classes the head predicts, in label-index order.
        connectivity: "dense" (the paper's long-range links with the 1x1 side chain),
            "residual" (per-module residual adds, 1x1 projection shortcuts when shapes
            differ) or "none". See `covidnet_jax.blocks.PepxStage` for the exact wiring.
        norm: "batchnorm" after every conv, or "none" (convs then carry a bias).
        activation: the nonlinearity after every conv (and hidden FC layer).
        head: the classifier head.
    """

    TYPE: ClassVar[str] = "pepx"

    input_size: int
    stem: StemSpec
    stages: tuple[StageSpec, ...]
    input_channels: int = 3
    class_names: tuple[str, ...] = COVIDX_CLASSES
    connectivity: Connectivity = "dense"
    norm: Norm = "batchnorm"
    activation: Activation = "relu"
    head: HeadSpec = HeadSpec()

    def __post_init__(self) -> None:
        _check_input(self)
        if not isinstance(self.stem, StemSpec):
            raise SpecError(f"stem: expected a StemSpec, got {describe(self.stem)}")
        _check_tuple("stages", self.stages)
        if not self.stages:
            raise SpecError("stages: expected at least one stage, got ()")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageSpec):
                raise SpecError(f"stages[{i}]: expected a StageSpec, got {describe(stage)}")
        _check_choice("connectivity", self.connectivity, CONNECTIVITIES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.head, HeadSpec):
            raise SpecError(f"head: expected a HeadSpec, got {describe(self.head)}")
        if self.connectivity == "dense":
            for i, stage in enumerate(self.stages):
                for j, module in enumerate(stage.modules):
                    if module.out != stage.width:
                        raise SpecError(
                            f"stages[{i}].modules[{j}].out: dense connectivity sums the "
                            f"outputs of a stage, so every module needs the stage width "
                            f"{stage.width}, got {module.out}"
                        )

    def summary(self) -> str:
        """One compact line, e.g. `pepx 480px 3cls stem 64/7s2+mp2 | 256x3[...] | ...`."""
        stem = self.stem
        pool = f"+mp{stem.pool_size}s{stem.pool_stride}" if stem.pool_size else ""
        parts = [
            f"pepx {self.input_size}px {self.num_classes}cls",
            f"stem {stem.channels}/{stem.kernel_size}s{stem.stride}{pool}",
        ]
        for stage in self.stages:
            mods = ",".join(m.label() for m in stage.modules)
            parts.append(f"s{stage.stride} x{len(stage.modules)} [{mods}]")
        parts.append(f"{self.connectivity} {self.norm} {self.activation}")
        parts.append(_head_summary(self.head))
        return " | ".join(parts)


@dataclasses.dataclass(frozen=True)
class ResNetSpec(_SpecMethods):
    """A ResNet v1.5 bottleneck baseline (torchvision layout, stride on the 3x3 conv).

    Attributes:
        input_size: height and width of the (square) input image.
        depths: bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3).
        widths: output channels per stage (ResNet-50: 256, 512, 1024, 2048); the inner
            width of a block is `width // expansion`.
        input_channels: channels of the input image.
        class_names: the classes the head predicts.
        stem_channels: channels of the 7x7/2 stem conv (followed by a 3x3/2 max-pool).
        expansion: ratio of a block's output width to its inner width.
        head: the classifier head (ResNet-50: global average pool, no hidden layer).
    """

    TYPE: ClassVar[str] = "resnet"

    input_size: int
    depths: tuple[int, ...] = (3, 4, 6, 3)
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    input_channels: int = 3
    class_names: tuple[str, ...] = COVIDX_CLASSES
    stem_channels: int = 64
    expansion: int = 4
    head: HeadSpec = HeadSpec()

    def __post_init__(self) -> None:
        _check_input(self)
        _check_tuple("depths", self.depths)
        _check_tuple("widths", self.widths)
        if not self.depths:
            raise SpecError("depths: expected at least one stage, got ()")
        if len(self.widths) != len(self.depths):
            raise SpecError(
                f"widths: expected {len(self.depths)} widths (one per stage in depths), "
                f"got {describe(self.widths)}"
            )
        for i, depth in enumerate(self.depths):
            _check_int(f"depths[{i}]", depth, 1, 256)
        _check_int("stem_channels", self.stem_channels, 1, MAX_WIDTH)
        _check_int("expansion", self.expansion, 1, 64)
        for i, width in enumerate(self.widths):
            _check_int(f"widths[{i}]", width, 1, MAX_WIDTH)
            if width % self.expansion:
                raise SpecError(
                    f"widths[{i}]: expected a multiple of expansion {self.expansion}, got {width}"
                )
        if not isinstance(self.head, HeadSpec):
            raise SpecError(f"head: expected a HeadSpec, got {describe(self.head)}")

    def summary(self) -> str:
        """One compact line, e.g. `resnet 224px 1000cls stem 64 | 3-4-6-3 @ 256-...`."""
        depths = "-".join(map(str, self.depths))
        widths = "-".join(map(str, self.widths))
        return (
            f"resnet {self.input_size}px {self.num_classes}cls stem {self.stem_channels} | "
            f"{depths} @ {widths} /{self.expansion} | {_head_summary(self.head)}"
        )


@dataclasses.dataclass(frozen=True)
class VGGSpec(_SpecMethods):
    """A VGG baseline: stages of 3x3 convs (+ activation), each followed by a 2x2/2 max-pool.

    Attributes:
        input_size: height and width of the (square) input image.
        stages: conv widths per stage (VGG-19: 2x64, 2x128, 4x256, 4x512, 4x512).
        input_channels: channels of the input image.
        class_names: the classes the head predicts.
        norm: "none" (the original VGG) or "batchnorm".
        head: the classifier head (VGG-19: flatten -> 4096 -> 4096, dropout 0.5).
    """

    TYPE: ClassVar[str] = "vgg"

    input_size: int
    stages: tuple[tuple[int, ...], ...] = (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    )
    input_channels: int = 3
    class_names: tuple[str, ...] = COVIDX_CLASSES
    norm: Norm = "none"
    head: HeadSpec = HeadSpec(pool="flatten", hidden=(4096, 4096), dropout=0.5)

    def __post_init__(self) -> None:
        _check_input(self)
        _check_tuple("stages", self.stages)
        if not self.stages:
            raise SpecError("stages: expected at least one stage, got ()")
        for i, stage in enumerate(self.stages):
            _check_tuple(f"stages[{i}]", stage)
            if not stage:
                raise SpecError(f"stages[{i}]: expected at least one conv width, got ()")
            for j, width in enumerate(stage):
                _check_int(f"stages[{i}][{j}]", width, 1, MAX_WIDTH)
        _check_choice("norm", self.norm, NORMS)
        if not isinstance(self.head, HeadSpec):
            raise SpecError(f"head: expected a HeadSpec, got {describe(self.head)}")

    def summary(self) -> str:
        """One compact line, e.g. `vgg 224px 1000cls | 64x2 128x2 ... | flatten->4096-4096`."""
        stages = " ".join(f"{s[0]}x{len(s)}" if len(set(s)) == 1 else str(s) for s in self.stages)
        return (
            f"vgg {self.input_size}px {self.num_classes}cls | {stages} | {self.norm} | "
            f"{_head_summary(self.head)}"
        )


AnySpec = ArchSpec | ResNetSpec | VGGSpec
"""Any spec `build_model`, `count_cost` and `spec_from_json` accept."""

SPEC_TYPES: Mapping[str, type[AnySpec]] = types.MappingProxyType(
    {cls.TYPE: cls for cls in (ArchSpec, ResNetSpec, VGGSpec)}
)


def _head_summary(head: HeadSpec) -> str:
    chain = "->".join([head.pool, *map(str, head.hidden), "logits"])
    return f"{chain} drop{head.dropout:g}" if head.dropout else chain


def spec_from_dict(data: Any) -> AnySpec:
    """Builds a spec from plain data (as `to_dict` writes it), dispatching on `"type"`.

    Raises:
        SpecError: an unknown type tag, an unknown or missing field, or a bad value; the
            message starts with the field path, e.g. `stages[0].modules[1].kernel_size`.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"spec: expected a JSON object, got {describe(data)}")
    fields = dict(data)
    tag = fields.pop("type", None)
    if tag not in SPEC_TYPES:
        options = ", ".join(repr(t) for t in SPEC_TYPES)
        raise SpecError(f"type: expected one of {options}, got {describe(tag)}")
    return from_dict(SPEC_TYPES[tag], fields, dialect=JSON_SPEC)


def spec_from_json(text: str) -> AnySpec:
    """Parses spec JSON (any spec type, dispatching on its `"type"` tag).

    Raises:
        SpecError: invalid JSON (with line and column) or an invalid spec.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(
            f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    return spec_from_dict(data)
