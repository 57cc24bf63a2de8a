"""Networks built from specs: `build_model(spec, rngs=...)` is the one place a spec becomes
a Flax NNX module.

Every network has the same interface:

- `model(x_BxHxWxC) -> logits_BxK` (float32), equal to `model.classify(model.features(x))`;
- `model.features(x_BxHxWxC) -> B x h x w x C` (the last stage's output; Grad-CAM uses it);
- `model.classify(features) -> logits_BxK`;
- `model.train()` / `model.eval()`: BatchNorm uses batch statistics and updates its running
  averages / uses the running averages; dropout on / off. `build_model` returns the model in
  eval mode; call `model.train()` before training steps.

Inputs are cast to the computation dtype; parameters are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from covidnet_jax.arch import AnySpec, ArchSpec, ResNetSpec, VGGSpec, conv_out_size
from covidnet_jax.blocks import Bottleneck, Head, LayerConfig, PepxStage
from covidnet_jax.errors import SpecError


class PepxNet(nnx.Module):
    """A COVID-Net style network from an `ArchSpec`: stem, PEPX stages, head.

    Args:
        spec: the architecture.
        rngs: random streams (`params`, and `dropout` when the head has dropout).
        dtype: computation dtype.
        width_masks: give every width-carrying layer a `blocks.WidthMask` (a host network
            for narrower candidates; `covidnet_jax.shared_widths` builds those).
        projections: per stage, per module: whether a residual shortcut is a projection
            (None: where shapes differ; see `blocks.PepxStage`).

    Example:
        >>> from covidnet_jax.presets import get_preset
        >>> model = PepxNet(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 3)
    """

    def __init__(
        self,
        spec: ArchSpec,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        width_masks: bool = False,
        projections: tuple[tuple[bool, ...], ...] | None = None,
    ):
        layers = LayerConfig(
            norm=spec.norm, activation=spec.activation, dtype=dtype, width_masks=width_masks
        )
        if projections is not None and len(projections) != len(spec.stages):
            raise ValueError(
                f"projections: expected {len(spec.stages)} tuples (one per stage), "
                f"got {projections!r}"
            )
        stem = spec.stem
        self.dtype = dtype
        self.stem = layers.conv_norm_act(
            spec.input_channels,
            stem.channels,
            kernel_size=stem.kernel_size,
            stride=stem.stride,
            rngs=rngs,
        )
        self.pool_size, self.pool_stride = stem.pool_size, stem.pool_stride
        size = conv_out_size(spec.input_size, stem.stride)
        if stem.pool_size:
            size = conv_out_size(size, stem.pool_stride)
        stages, channels = [], stem.channels
        for i, stage in enumerate(spec.stages):
            stages.append(
                PepxStage(
                    channels,
                    stage,
                    connectivity=spec.connectivity,
                    layers=layers,
                    rngs=rngs,
                    projections=None if projections is None else projections[i],
                )
            )
            channels = stage.width
            size = conv_out_size(size, stage.stride)
        self.stages = nnx.List(stages)
        self.head = Head(
            (size, size, channels), spec.head, spec.num_classes, layers=layers, rngs=rngs
        )

    def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """The last PEPX stage's output, B x h x w x C."""
        x = self.stem(x_BxHxWxC.astype(self.dtype))
        if self.pool_size:
            x = _max_pool(x, self.pool_size, self.pool_stride)
        for stage in self.stages:
            x = stage(x)
        return x

    def classify(self, features_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K from `features`."""
        return self.head(features_BxHxWxC)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K for images B x H x W x C."""
        return self.classify(self.features(x_BxHxWxC))


class ResNet(nnx.Module):
    """A ResNet v1.5 baseline from a `ResNetSpec` (torchvision layout).

    Args:
        spec: the architecture.
        rngs: random streams.
        dtype: computation dtype.

    Example:
        >>> spec = ResNetSpec(32, depths=(1, 1), widths=(16, 32), stem_channels=8)
        >>> ResNet(spec, rngs=nnx.Rngs(0))(jnp.zeros((1, 32, 32, 3))).shape
        (1, 3)
    """

    def __init__(self, spec: ResNetSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        layers = LayerConfig(norm="batchnorm", activation="relu", dtype=dtype)
        self.dtype = dtype
        self.stem = layers.conv_norm_act(
            spec.input_channels, spec.stem_channels, kernel_size=7, stride=2, rngs=rngs
        )
        size = conv_out_size(conv_out_size(spec.input_size, 2), 2)
        blocks, channels = [], spec.stem_channels
        for i, (depth, width) in enumerate(zip(spec.depths, spec.widths, strict=True)):
            for k in range(depth):
                stride = 2 if i > 0 and k == 0 else 1
                blocks.append(
                    Bottleneck(
                        channels,
                        width // spec.expansion,
                        width,
                        stride=stride,
                        layers=layers,
                        rngs=rngs,
                    )
                )
                channels = width
                size = conv_out_size(size, stride)
        self.blocks = nnx.List(blocks)
        self.head = Head(
            (size, size, channels), spec.head, spec.num_classes, layers=layers, rngs=rngs
        )

    def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """The last stage's output, B x h x w x C."""
        x = _max_pool(self.stem(x_BxHxWxC.astype(self.dtype)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return x

    def classify(self, features_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K from `features`."""
        return self.head(features_BxHxWxC)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K for images B x H x W x C."""
        return self.classify(self.features(x_BxHxWxC))


class VGG(nnx.Module):
    """A VGG baseline from a `VGGSpec`: 3x3 conv stages, each ending in a 2x2/2 max-pool.

    Args:
        spec: the architecture.
        rngs: random streams.
        dtype: computation dtype.

    Example:
        >>> spec = VGGSpec(32, stages=((8,), (16, 16)))
        >>> VGG(spec, rngs=nnx.Rngs(0))(jnp.zeros((1, 32, 32, 3))).shape
        (1, 3)
    """

    def __init__(self, spec: VGGSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        layers = LayerConfig(norm=spec.norm, activation="relu", dtype=dtype)
        self.dtype = dtype
        convs, stage_ends, channels, size = [], [], spec.input_channels, spec.input_size
        for stage in spec.stages:
            for width in stage:
                convs.append(layers.conv_norm_act(channels, width, kernel_size=3, rngs=rngs))
                channels = width
            stage_ends.append(len(convs) - 1)
            size = conv_out_size(size, 2)
        self.convs = nnx.List(convs)
        self.stage_ends = tuple(stage_ends)
        self.head = Head(
            (size, size, channels), spec.head, spec.num_classes, layers=layers, rngs=rngs
        )

    def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """The last stage's output (after its max-pool), B x h x w x C."""
        x = x_BxHxWxC.astype(self.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i in self.stage_ends:
                x = _max_pool(x, 2, 2)
        return x

    def classify(self, features_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K from `features`."""
        return self.head(features_BxHxWxC)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Float32 logits B x K for images B x H x W x C."""
        return self.classify(self.features(x_BxHxWxC))


Model = PepxNet | ResNet | VGG


def _max_pool(x: jax.Array, size: int, stride: int) -> jax.Array:
    return nnx.max_pool(x, (size, size), strides=(stride, stride), padding="SAME")


def build_model(spec: AnySpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> Model:
    """Builds the Flax NNX network a spec describes, in eval mode.

    Same spec and same `rngs` seed give identical initial parameters.

    Args:
        spec: an `ArchSpec`, `ResNetSpec` or `VGGSpec`.
        rngs: random streams (`params`; `dropout` is drawn from it in train mode).
        dtype: computation dtype (e.g. `jnp.bfloat16`); parameters stay float32.

    Returns:
        A module with `__call__`, `features`, `classify`, `train` and `eval`.

    Raises:
        SpecError: if `spec` is not a spec.

    Example:
        >>> from covidnet_jax.presets import get_preset
        >>> model = build_model(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> model.features(jnp.zeros((1, 32, 32, 3))).shape[-1]
        32
    """
    if isinstance(spec, ArchSpec):
        return PepxNet(spec, rngs=rngs, dtype=dtype)
    if isinstance(spec, ResNetSpec):
        return ResNet(spec, rngs=rngs, dtype=dtype)
    if isinstance(spec, VGGSpec):
        return VGG(spec, rngs=rngs, dtype=dtype)
    raise SpecError(f"spec: expected an ArchSpec, ResNetSpec or VGGSpec, got {type(spec)!r}")
