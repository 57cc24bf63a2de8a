"""Analytic cost of a spec, without building the model: parameters, MACs, activation memory.

`count_cost(spec)` walks the same layers `build_model` creates and returns one `LayerCost` per
conv, pool and FC layer. Conventions (those of the paper and of torchvision-style counters):

- params: conv kernels, biases (only on convs without a norm, and on FC layers) and the
  BatchNorm scale and bias; BatchNorm running statistics are state, not parameters. Equal to
  the number of `nnx.Param` elements of the built model.
- MACs: multiply-accumulates of convs (`h' * w' * C' * k * k * C / groups`, zero padding
  included) and FC layers (`in * out`); norms, activations, additions, pooling and biases
  are not counted. This is the convention of published figures (ResNet-50 4.09 G, VGG-19
  19.6 G, COVID-Net CXR3-B 7.50 G).
- flops: an estimate of what XLA's cost analysis reports for the compiled forward pass in
  eval mode: 2 flops per multiply-accumulate that reads a real (non-padding) input, plus
  the elementwise work (bias 1, eval BatchNorm 3, ReLU 1, SiLU 4, GELU 8 per element,
  1 per merge addition, k*k - 1 per max-pool output, 1 per averaged input). XLA skips the
  taps that fall on SAME padding, so on small feature maps `flops / 2` is a few percent
  below `macs` (VGG-19: 3.4%). Depthwise convs are the exception: the library computes them
  as k*k shifted multiply-adds (`conv.depthwise_conv`), padding taps included, which XLA
  counts as 2*k*k - 1 flops per output element. Tests check `flops` against XLA on random
  specs.

Example:
    >>> from covidnet_jax.presets import get_preset
    >>> report = count_cost(get_preset("resnet50").with_num_classes(1000))
    >>> report.params
    25557032
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from covidnet_jax.arch import (
    AnySpec,
    ArchSpec,
    HeadSpec,
    ModuleSpec,
    ResNetSpec,
    VGGSpec,
    conv_out_size,
)
from covidnet_jax.block_registry import block_kind
from covidnet_jax.errors import SpecError


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one layer.

    Attributes:
        name: the layer's path in the built model, e.g. `stages.1.modules.0.expand`.
        kind: "conv", "dwconv" (depthwise), "pool" or "fc".
        output_shape: (h, w, C) for spatial layers, (features,) for FC layers.
        params: trainable parameters (with the layer's norm scale and bias).
        macs: multiply-accumulates for one example (zero padding included).
        flops: XLA-style flops for one example (padding taps skipped, elementwise work
            of the layer's bias, norm, activation and following merge included).
        saved_elements: elements one example keeps alive for the backward pass (the conv
            output, plus the normalized and the activated outputs when present).
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    flops: int
    saved_elements: int


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Totals and per-layer costs of a spec (one example).

    Attributes:
        params: total trainable parameters.
        macs: total multiply-accumulates of one forward pass on one example.
        flops: total XLA-style flops of one forward pass on one example (eval mode).
        layers: per-layer costs in forward order.
    """

    params: int
    macs: int
    flops: int
    layers: tuple[LayerCost, ...]


_ACT_FLOPS = {"relu": 1, "relu6": 1, "silu": 4, "gelu": 8}
"""Flops per element XLA's cost analysis counts for each activation."""


def _valid_taps(size: int, kernel: int, stride: int) -> int:
    """Kernel taps that read real input, summed over the outputs of one SAME-padded axis."""
    out = conv_out_size(size, stride)
    pad_lo = max((out - 1) * stride + kernel - size, 0) // 2
    total = 0
    for o in range(out):
        start = o * stride - pad_lo
        total += min(start + kernel, size) - max(start, 0)
    return total


class CostCounter:
    """Accumulates layers while tracking the current (h, w, C) shape.

    A block kind's cost function (`covidnet_jax.block_registry`) adds its layers with
    `conv` or, for other layers, `add`, and leaves `shape` at the block's output.

    Attributes:
        shape: the current (h, w, C).
        norm: whether convs are followed by BatchNorm (else they carry a bias).
        act_flops: flops per element of the network's activation.
        layers: the layers counted so far, in forward order.
    """

    def __init__(self, size: int, channels: int, *, norm: bool, activation: str):
        self.shape = (size, size, channels)
        self.norm = norm
        self.act_flops = _ACT_FLOPS[activation]
        self.layers: list[LayerCost] = []

    def conv(
        self,
        name: str,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int = 1,
        depthwise: bool = False,
        act: bool = True,
        merge: bool = False,
        shape: tuple[int, int, int] | None = None,
    ) -> None:
        """Adds a conv(-norm-act) reading `shape` (default: the current shape).

        `merge` adds the flops of one addition per output element (a residual or dense
        merge of this layer's output).
        """
        h, w, c = shape or self.shape
        out = (conv_out_size(h, stride), conv_out_size(w, stride), out_channels)
        elements = math.prod(out)
        in_per_group = 1 if depthwise else c
        fan_in = kernel_size * kernel_size * in_per_group
        params = fan_in * out_channels + (2 * out_channels if self.norm else out_channels)
        macs = elements * fan_in
        taps = _valid_taps(h, kernel_size, stride) * _valid_taps(w, kernel_size, stride)
        per_element = (3 if self.norm else 1) + (self.act_flops if act else 0) + int(merge)
        if depthwise:
            # conv.depthwise_conv: k*k shifted multiplies and k*k - 1 adds per output element,
            # padding taps included.
            flops = (2 * kernel_size * kernel_size - 1) * elements
        else:
            flops = 2 * taps * in_per_group * out_channels
        flops += per_element * elements
        flops += out_channels if self.norm else 0  # rsqrt(var + eps) * scale per channel
        copies = 1 + int(self.norm) + int(act)
        kind = "dwconv" if depthwise else "conv"
        self.layers.append(LayerCost(name, kind, out, params, macs, flops, elements * copies))
        self.shape = out

    def add(self, layer: LayerCost) -> None:
        """Adds a layer counted by the caller (`shape` is left as it is)."""
        self.layers.append(layer)

    def pool(self, name: str, size: int, stride: int) -> None:
        h, w, c = self.shape
        self.shape = (conv_out_size(h, stride), conv_out_size(w, stride), c)
        elements = math.prod(self.shape)
        flops = (size * size - 1) * elements
        self.layers.append(LayerCost(name, "pool", self.shape, 0, 0, flops, elements))

    def head(self, spec: HeadSpec, num_classes: int) -> None:
        h, w, c = self.shape
        features = c if spec.pool == "avg" else h * w * c
        pool_flops = h * w * c if spec.pool == "avg" else 0
        widths = [features, *spec.hidden, num_classes]
        for i, (d_in, d_out) in enumerate(itertools.pairwise(widths)):
            hidden = i < len(widths) - 2
            macs = d_in * d_out
            flops = 2 * macs + d_out + (self.act_flops * d_out if hidden else 0)
            if i == 0:
                flops += pool_flops
            saved = d_out * (2 if hidden else 1) + (d_in if spec.dropout else 0)
            self.layers.append(
                LayerCost(f"head.dense.{i}", "fc", (d_out,), macs + d_out, macs, flops, saved)
            )

    def report(self) -> CostReport:
        layers = tuple(self.layers)
        return CostReport(
            params=sum(layer.params for layer in layers),
            macs=sum(layer.macs for layer in layers),
            flops=sum(layer.flops for layer in layers),
            layers=layers,
        )


def count_pepx_module(
    counter: CostCounter, prefix: str, module: ModuleSpec, *, stride: int, merge: bool
) -> None:
    """Counts a PEPX module (`blocks.PEPX`): the cost function of block kind "pepx".

    Args:
        counter: the network's counter, at the module's input shape.
        prefix: the module's path in the built model, e.g. `stages.0.modules.1`.
        module: its widths and kernel size.
        stride: stride of its depthwise conv.
        merge: count one addition per output element (a residual or dense merge).
    """
    counter.conv(f"{prefix}.proj1", module.proj1, kernel_size=1)
    counter.conv(f"{prefix}.expand", module.expand, kernel_size=1)
    counter.conv(
        f"{prefix}.depthwise",
        module.expand,
        kernel_size=module.kernel_size,
        stride=stride,
        depthwise=True,
    )
    counter.conv(f"{prefix}.proj2", module.proj2, kernel_size=1)
    counter.conv(f"{prefix}.extend", module.out, kernel_size=1, merge=merge)


def _count_pepx(spec: ArchSpec) -> CostReport:
    counter = CostCounter(
        spec.input_size,
        spec.input_channels,
        norm=spec.norm == "batchnorm",
        activation=spec.activation,
    )
    stem = spec.stem
    counter.conv("stem", stem.channels, kernel_size=stem.kernel_size, stride=stem.stride)
    if stem.pool_size:
        counter.pool("stem.pool", stem.pool_size, stem.pool_stride)
    for i, stage in enumerate(spec.stages):
        stage_in = counter.shape
        dense = spec.connectivity == "dense"
        if dense:
            counter.conv(
                f"stages.{i}.side", stage.width, kernel_size=1, stride=stage.stride, act=False
            )
            counter.shape = stage_in
        for k, module in enumerate(stage.modules):
            stride = stage.stride if k == 0 else 1
            module_in = counter.shape
            residual = spec.connectivity == "residual"
            block_kind(module.kind).count(
                counter,
                f"stages.{i}.modules.{k}",
                module,
                stride=stride,
                merge=dense or residual,
            )
            if residual and (stride != 1 or module_in[2] != module.out):
                counter.conv(
                    f"stages.{i}.shortcuts.{k}",
                    module.out,
                    kernel_size=1,
                    stride=stride,
                    act=False,
                    shape=module_in,
                )
    counter.head(spec.head, spec.num_classes)
    return counter.report()


def _count_resnet(spec: ResNetSpec) -> CostReport:
    counter = CostCounter(spec.input_size, spec.input_channels, norm=True, activation="relu")
    counter.conv("stem", spec.stem_channels, kernel_size=7, stride=2)
    counter.pool("stem.pool", 3, 2)
    block = 0
    for i, (depth, width) in enumerate(zip(spec.depths, spec.widths, strict=True)):
        inner = width // spec.expansion
        for k in range(depth):
            stride = 2 if i > 0 and k == 0 else 1
            block_in = counter.shape
            counter.conv(f"blocks.{block}.reduce", inner, kernel_size=1)
            counter.conv(f"blocks.{block}.conv", inner, kernel_size=3, stride=stride)
            # The activation after the residual add is counted on this layer.
            counter.conv(f"blocks.{block}.restore", width, kernel_size=1, merge=True)
            if stride != 1 or block_in[2] != width:
                counter.conv(
                    f"blocks.{block}.shortcut",
                    width,
                    kernel_size=1,
                    stride=stride,
                    act=False,
                    shape=block_in,
                )
            block += 1
    counter.head(spec.head, spec.num_classes)
    return counter.report()


def _count_vgg(spec: VGGSpec) -> CostReport:
    counter = CostCounter(
        spec.input_size, spec.input_channels, norm=spec.norm == "batchnorm", activation="relu"
    )
    index = 0
    for i, stage in enumerate(spec.stages):
        for width in stage:
            counter.conv(f"convs.{index}", width, kernel_size=3)
            index += 1
        counter.pool(f"pool.{i}", 2, 2)
    counter.head(spec.head, spec.num_classes)
    return counter.report()


def count_cost(spec: AnySpec) -> CostReport:
    """Parameters and MACs of `spec`, per layer and in total, for one example.

    Args:
        spec: an `ArchSpec`, `ResNetSpec` or `VGGSpec`.

    Returns:
        A `CostReport` whose `params` equals the built model's parameter count.

    Raises:
        SpecError: if `spec` is not a spec.
    """
    if isinstance(spec, ArchSpec):
        return _count_pepx(spec)
    if isinstance(spec, ResNetSpec):
        return _count_resnet(spec)
    if isinstance(spec, VGGSpec):
        return _count_vgg(spec)
    raise SpecError(f"spec: expected an ArchSpec, ResNetSpec or VGGSpec, got {type(spec)!r}")


def activation_bytes(
    spec: AnySpec, batch_size: int, dtype_bytes: int = 4, *, training: bool = True
) -> int:
    """Estimated activation memory of one step, in bytes (parameters and optimizer excluded).

    Training: the sum over layers of what reverse-mode differentiation keeps alive for the
    backward pass (`LayerCost.saved_elements`: each conv's output, its normalized output and
    its activated output; pool outputs; FC inputs/outputs), plus the input batch. XLA fusion
    and rematerialization usually keep less, so this errs on the safe side for rejecting
    designs that would not fit. Inference: the largest input + output pair of any layer.

    Args:
        spec: the architecture.
        batch_size: examples per step.
        dtype_bytes: bytes per activation element (4 for float32, 2 for bfloat16).
        training: estimate a training step (True) or a forward pass (False).

    Returns:
        Bytes, an integer.

    Example:
        >>> from covidnet_jax.presets import get_preset
        >>> activation_bytes(get_preset("tiny"), 8) > activation_bytes(get_preset("tiny"), 1)
        True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch_size: expected a positive int, got {batch_size!r}")
    layers = count_cost(spec).layers
    input_elements = spec.input_size * spec.input_size * spec.input_channels
    if training:
        elements = input_elements + sum(layer.saved_elements for layer in layers)
    else:
        sizes = [input_elements, *(math.prod(layer.output_shape) for layer in layers)]
        elements = max(a + b for a, b in itertools.pairwise(sizes))
    return elements * batch_size * dtype_bytes
