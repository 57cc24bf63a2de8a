"""Flax NNX building blocks: conv-norm-activation, PEPX modules and stages, bottlenecks, heads.

Every conv in the library is made by `LayerConfig.conv` (one place to tune the conv
implementation); normalization and activation are chosen once per network in `LayerConfig`
and injected into the blocks. Arrays are NHWC. Parameters are float32; `LayerConfig.dtype`
is the computation dtype (e.g. `jnp.bfloat16`).

BatchNorm layers follow NNX train/eval modes: `model.train()` uses batch statistics and
updates the running averages, `model.eval()` uses the running averages. Modules are created
in eval mode.

With `LayerConfig(width_masks=True)` every layer output that a spec width sets (conv-norm-act
outputs, hidden FC outputs) is multiplied by a `WidthMask` variable: a network built for
wide shapes then computes exactly a narrower network of the same skeleton, with the masks
as traced state (`covidnet_jax.shared_widths`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidnet_jax.arch import HeadSpec, ModuleSpec, StageSpec
from covidnet_jax.block_registry import block_kind, register_block
from covidnet_jax.conv import Conv
from covidnet_jax.cost import count_pepx_module

ACTIVATION_FNS: Mapping[str, Callable[[jax.Array], jax.Array]] = MappingProxyType(
    {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "silu": jax.nn.silu, "gelu": jax.nn.gelu}
)
"""Activation names used in specs -> functions."""

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class WidthMask(nnx.Variable):
    """Per-channel 0/1 mask of a layer's output, float32 C (1: a channel of the narrow net).

    Not an `nnx.Param`: masks travel with the model state (BatchNorm statistics), so the
    optimizer never sees them and a jitted step takes them as traced inputs.
    """


def _mask_variable(channels: int, layers: LayerConfig) -> WidthMask | None:
    return WidthMask(jnp.ones((channels,), jnp.float32)) if layers.width_masks else None


def _apply_mask(mask: WidthMask | None, y: jax.Array) -> jax.Array:
    return y if mask is None else y * mask[...].astype(y.dtype)


def scaled_normal_init(scale: float, mode: str) -> Callable[..., jax.Array]:
    """A variance-scaling normal initializer that compiles once per size bucket, not per shape.

    Draws `N(0, scale / fan)` like `nnx.initializers.variance_scaling(scale, mode, "normal")`
    (fan_in = prod(shape[:-1]); fan_out = prod(shape[:-2]) * shape[-1]) but takes the values
    from one normal vector whose length is the next power of two, cut and reshaped on the
    host. Eagerly, JAX compiles one random-number program per distinct shape (about half a
    second each on CPU); with buckets a whole search shares about twenty such programs, so
    building a new candidate costs seconds less. Values depend only on the key and the
    shape, and are the same traced (eval_shape, jit) or eager.

    Args:
        scale: variance scale (2.0: He / Kaiming; 1.0: LeCun).
        mode: "fan_in" or "fan_out".

    Returns:
        An initializer `(key, shape, dtype) -> array`.
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode: expected 'fan_in' or 'fan_out', got {mode!r}")

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        fan = math.prod(shape[:-1]) if mode == "fan_in" else math.prod(shape[:-2]) * shape[-1]
        std = math.sqrt(scale / fan)
        size = math.prod(shape)
        draws = jax.random.normal(key, (1 << max(size - 1, 1).bit_length(),), jnp.float32)
        if isinstance(draws, jax.core.Tracer):
            return (draws[:size] * std).reshape(shape).astype(dtype)
        return jnp.asarray((np.asarray(draws)[:size] * std).reshape(shape), dtype)

    return init


_CONV_INIT = scaled_normal_init(2.0, "fan_out")
_DENSE_INIT = scaled_normal_init(1.0, "fan_in")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """How every conv layer of one network is made: normalization, activation, dtype.

    Attributes:
        norm: "batchnorm" (convs without bias, BatchNorm after each) or "none" (convs
            with bias).
        activation: a name from `ACTIVATION_FNS`.
        dtype: computation dtype; parameters stay float32.
        width_masks: give every width-carrying layer output a `WidthMask` (see the module
            docstring); False builds the plain network.
    """

    norm: str = "batchnorm"
    activation: str = "relu"
    dtype: Any = jnp.float32
    width_masks: bool = False

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool,
        rngs: nnx.Rngs,
    ) -> Conv:
        """The one conv constructor of the library (SAME padding, NHWC; see `conv.Conv`)."""
        return Conv(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            groups=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            kernel_init=_CONV_INIT,
            rngs=rngs,
        )

    def conv_norm_act(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        rngs: nnx.Rngs,
    ) -> ConvNormAct:
        """A `ConvNormAct` with this config's norm and (when `act`) activation."""
        return ConvNormAct(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            groups=groups,
            act=act,
            layers=self,
            rngs=rngs,
        )


def batch_norm(norm: nnx.BatchNorm, x_BxHxWxC: jax.Array) -> jax.Array:
    """`norm(x)` with `nnx.BatchNorm` semantics, and a cheaper gradient in train mode.

    Eval mode calls `norm` itself. In train mode the statistics (mean and the biased
    variance as E[x^2] - E[x]^2 clipped at 0, in float32, as `nnx.BatchNorm` computes them)
    and the running-average update (`momentum * old + (1 - momentum) * batch`) are the
    same, but the normalization has a hand-written VJP (`_normalize_batch`): autodiff of the
    textbook formula keeps the centred input x - mean from the forward pass and reduces
    over it in the backward pass; on the CPU that extra memory pass per layer made BatchNorm
    a large share of a training step (bench/README.md, "Training throughput").

    Args:
        norm: the layer (its parameters, statistics, momentum, epsilon and mode are used).
        x_BxHxWxC: input; statistics are per channel over B, H and W.

    Returns:
        The normalized input, in `norm.dtype` (or `x`'s dtype when that is None).
    """
    if norm.use_running_average:
        return norm(x_BxHxWxC)
    dtype = norm.dtype or x_BxHxWxC.dtype
    y, mean, var = _normalize_batch(
        x_BxHxWxC.astype(dtype), norm.scale[...], norm.bias[...], norm.epsilon
    )
    momentum = norm.momentum
    norm.mean[...] = jax.lax.stop_gradient(momentum * norm.mean[...] + (1 - momentum) * mean)
    norm.var[...] = jax.lax.stop_gradient(momentum * norm.var[...] + (1 - momentum) * var)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_batch(
    x_BxHxWxC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(normalized x in x's dtype, batch mean C, batch variance C), statistics in float32."""
    y, mean, var, _ = _normalize_batch_forward(x_BxHxWxC, scale_C, bias_C, epsilon)
    return y, mean, var


def _normalize_batch_forward(x_BxHxWxC, scale_C, bias_C, epsilon):
    x = x_BxHxWxC.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)
    inv = jax.lax.rsqrt(var + epsilon)
    mul = inv * scale_C.astype(jnp.float32)
    y = (x - mean) * mul + bias_C.astype(jnp.float32)
    return y.astype(x_BxHxWxC.dtype), mean, var, inv


def _normalize_batch_fwd(x_BxHxWxC, scale_C, bias_C, epsilon):
    y, mean, var, inv = _normalize_batch_forward(x_BxHxWxC, scale_C, bias_C, epsilon)
    return (y, mean, var), (x_BxHxWxC, mean, inv, scale_C, bias_C)


def _normalize_batch_bwd(epsilon, residuals, cotangents):
    del epsilon
    x_BxHxWxC, mean, inv, scale_C, bias_C = residuals
    dy, dmean, dvar = cotangents
    x = x_BxHxWxC.astype(jnp.float32)
    dy = dy.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    sum_dy = jnp.sum(dy, axes)
    # sum(dy * xhat) with xhat = (x - mean) * inv, from sum(dy * x): no centred copy of x.
    sum_dy_xhat = inv * (jnp.sum(dy * x, axes) - mean * sum_dy)
    gain = scale_C.astype(jnp.float32) * inv
    # dx = gain * (dy - mean(dy) - xhat * mean(dy * xhat)), plus the statistics' cotangents
    # (d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n).
    centred_coef = (2.0 * dvar - gain * inv * sum_dy_xhat) / count
    dx = gain * dy + centred_coef * (x - mean) + (dmean - gain * sum_dy) / count
    return (
        dx.astype(x_BxHxWxC.dtype),
        sum_dy_xhat.astype(scale_C.dtype),
        sum_dy.astype(bias_C.dtype),
    )


_normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class ConvNormAct(nnx.Module):
    """Conv -> optional BatchNorm -> optional activation -> optional width mask.

    The mask (with `layers.width_masks`) comes last: BatchNorm's bias and the activation
    would make a zeroed channel non-zero again.

    Args:
        in_channels: input channels C.
        out_channels: output channels C'.
        kernel_size: odd square kernel size.
        stride: spatial stride (SAME padding: output size is ceil(H / stride)).
        groups: feature groups (`groups == in_channels == out_channels` is depthwise).
        act: apply the activation after the norm.
        layers: norm, activation and dtype of the network.
        rngs: random streams for initialization.

    Example:
        >>> layer = ConvNormAct(3, 8, kernel_size=3, stride=2, layers=LayerConfig(),
        ...                     rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((2, 32, 32, 3))).shape
        (2, 16, 16, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        layers: LayerConfig,
        rngs: nnx.Rngs,
    ):
        use_norm = layers.norm == "batchnorm"
        self.conv = layers.conv(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            groups=groups,
            use_bias=not use_norm,
            rngs=rngs,
        )
        self.norm = (
            nnx.BatchNorm(
                out_channels,
                use_running_average=True,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                dtype=layers.dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
            if use_norm
            else None
        )
        self.activation = layers.activation if act else None
        self.mask = _mask_variable(out_channels, layers)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x ceil(H/stride) x ceil(W/stride) x C'."""
        y = self.conv(x_BxHxWxC)
        if self.norm is not None:
            y = batch_norm(self.norm, y)
        if self.activation is not None:
            y = ACTIVATION_FNS[self.activation](y)
        return _apply_mask(self.mask, y)


class PEPX(nnx.Module):
    """A PEPX module: 1x1 projection -> 1x1 expansion -> kxk depthwise -> 1x1 projection ->
    1x1 extension, each conv followed by the norm and the activation.

    The depthwise conv carries the stride. Every layer, the extension included, ends with
    the activation, so module outputs are non-negative for ReLU before any merge.

    Args:
        in_channels: input channels C.
        spec: the module's widths and depthwise kernel size; output channels are `spec.out`.
        stride: stride of the depthwise conv.
        layers: norm, activation and dtype of the network.
        rngs: random streams for initialization.

    Example:
        >>> pepx = PEPX(16, ModuleSpec(8, 32, 8, 24, 3), stride=2, layers=LayerConfig(),
        ...             rngs=nnx.Rngs(0))
        >>> pepx(jnp.ones((2, 16, 16, 16))).shape
        (2, 8, 8, 24)
    """

    def __init__(
        self,
        in_channels: int,
        spec: ModuleSpec,
        *,
        stride: int = 1,
        layers: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.proj1 = layers.conv_norm_act(in_channels, spec.proj1, kernel_size=1, rngs=rngs)
        self.expand = layers.conv_norm_act(spec.proj1, spec.expand, kernel_size=1, rngs=rngs)
        self.depthwise = layers.conv_norm_act(
            spec.expand,
            spec.expand,
            kernel_size=spec.kernel_size,
            stride=stride,
            groups=spec.expand,
            rngs=rngs,
        )
        self.proj2 = layers.conv_norm_act(spec.expand, spec.proj2, kernel_size=1, rngs=rngs)
        self.extend = layers.conv_norm_act(spec.proj2, spec.out, kernel_size=1, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x ceil(H/stride) x ceil(W/stride) x spec.out."""
        y = self.proj1(x_BxHxWxC)
        y = self.expand(y)
        y = self.depthwise(y)
        y = self.proj2(y)
        return self.extend(y)


class PepxStage(nnx.Module):
    """A stage of PEPX modules with long-range connectivity; the first module has `stride`.

    Each module is built by its kind's builder (`covidnet_jax.block_registry`; "pepx":
    `PEPX`).

    Connectivity (x is the stage input, m_1..m_n the modules, y the stage output):

    - "dense": the paper's Figure 2 pattern, read as follows. A side-chain 1x1 conv `side`
      (conv + norm, no activation, with the stage stride) maps the stage input to the stage
      width. Module m_1 reads x; module m_k (k > 1) reads the sum of the side-chain output and
      the outputs of m_1..m_{k-1}; the stage output is the sum of the side-chain output and all
      module outputs, which feeds both the next stage's first module and the next stage's
      side-chain conv (so the side chain is a chain of 1x1 convs, one per stage width).
      Because the merges are additions, this equals a running sum
      `acc = side(x) + m_1(x); acc = acc + m_k(acc)`, which is how it is computed: the
      n(n+1)/2 dense links cost n additions. All modules of a stage share one output width.
    - "residual": `x = m_k(x) + shortcut_k(x)` per module, where the shortcut is the identity
      when shapes match and a 1x1 conv + norm (with the stride) otherwise.
    - "none": the modules in sequence.

    Args:
        in_channels: input channels C.
        spec: the stage's stride and modules.
        connectivity: "dense", "residual" or "none".
        layers: norm, activation and dtype of the network.
        rngs: random streams for initialization.
        projections: with "residual", whether each module's shortcut is a projection
            (None: where the shapes differ). A host network for narrower candidates
            (`covidnet_jax.shared_widths`) passes the candidates' choice; an identity
            shortcut between different widths then zero-pads or cuts the channels, which
            is exact because the surplus channels are masked to zero.

    Example:
        >>> stage = PepxStage(8, StageSpec(2, (ModuleSpec(4, 16, 4, 16),) * 2),
        ...                   connectivity="dense", layers=LayerConfig(), rngs=nnx.Rngs(0))
        >>> stage(jnp.ones((1, 16, 16, 8))).shape
        (1, 8, 8, 16)
    """

    def __init__(
        self,
        in_channels: int,
        spec: StageSpec,
        *,
        connectivity: str,
        layers: LayerConfig,
        rngs: nnx.Rngs,
        projections: tuple[bool, ...] | None = None,
    ):
        if projections is not None and len(projections) != len(spec.modules):
            raise ValueError(
                f"projections: expected {len(spec.modules)} flags (one per module), "
                f"got {projections!r}"
            )
        self.connectivity = connectivity
        self.side = (
            layers.conv_norm_act(
                in_channels, spec.width, kernel_size=1, stride=spec.stride, act=False, rngs=rngs
            )
            if connectivity == "dense"
            else None
        )
        modules, shortcuts = [], []
        channels = in_channels
        for k, module_spec in enumerate(spec.modules):
            stride = spec.stride if k == 0 else 1
            build = block_kind(module_spec.kind).build
            modules.append(build(channels, module_spec, stride=stride, layers=layers, rngs=rngs))
            needs_projection = (
                stride != 1 or channels != module_spec.out
                if projections is None
                else projections[k]
            )
            shortcuts.append(
                layers.conv_norm_act(
                    channels, module_spec.out, kernel_size=1, stride=stride, act=False, rngs=rngs
                )
                if connectivity == "residual" and needs_projection
                else None
            )
            channels = module_spec.out
        self.modules = nnx.List(modules)
        self.shortcuts = nnx.List(shortcuts)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x ceil(H/stride) x ceil(W/stride) x spec.width."""
        x = x_BxHxWxC
        if self.side is not None:
            acc = self.side(x) + self.modules[0](x)
            for module in self.modules[1:]:
                acc = acc + module(acc)
            return acc
        for module, shortcut in zip(self.modules, self.shortcuts, strict=True):
            if self.connectivity == "residual":
                y = module(x)
                x = y + (_fit_channels(x, y.shape[-1]) if shortcut is None else shortcut(x))
            else:
                x = module(x)
        return x


def _fit_channels(x_BxHxWxC: jax.Array, channels: int) -> jax.Array:
    """`x` with its channel axis zero-padded or cut to `channels` (identity when equal)."""
    c = x_BxHxWxC.shape[-1]
    if c >= channels:
        return x_BxHxWxC[..., :channels]
    return jnp.pad(x_BxHxWxC, ((0, 0), (0, 0), (0, 0), (0, channels - c)))


class Bottleneck(nnx.Module):
    """A ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1, residual add, activation.

    Args:
        in_channels: input channels C.
        inner: channels of the 1x1 reduction and the 3x3 conv.
        out_channels: output channels C'.
        stride: stride of the 3x3 conv (and of the projection shortcut).
        layers: norm, activation and dtype of the network.
        rngs: random streams for initialization.

    Example:
        >>> block = Bottleneck(64, 16, 64, stride=1, layers=LayerConfig(), rngs=nnx.Rngs(0))
        >>> block(jnp.ones((1, 8, 8, 64))).shape
        (1, 8, 8, 64)
    """

    def __init__(
        self,
        in_channels: int,
        inner: int,
        out_channels: int,
        *,
        stride: int = 1,
        layers: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.reduce = layers.conv_norm_act(in_channels, inner, kernel_size=1, rngs=rngs)
        self.conv = layers.conv_norm_act(inner, inner, kernel_size=3, stride=stride, rngs=rngs)
        self.restore = layers.conv_norm_act(
            inner, out_channels, kernel_size=1, act=False, rngs=rngs
        )
        self.shortcut = (
            layers.conv_norm_act(
                in_channels, out_channels, kernel_size=1, stride=stride, act=False, rngs=rngs
            )
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.activation = layers.activation

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x ceil(H/stride) x ceil(W/stride) x C'."""
        x = x_BxHxWxC
        y = self.restore(self.conv(self.reduce(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return ACTIVATION_FNS[self.activation](y + shortcut)


class Head(nnx.Module):
    """Classifier head: global average pool or flatten, hidden FC layers, logits.

    Dropout (if the rate is positive) precedes every FC layer. Logits are float32.

    Args:
        in_shape: (h, w, C) of the features it classifies.
        spec: pool kind, hidden widths and dropout rate.
        num_classes: number of logits K.
        layers: activation and dtype of the network.
        rngs: random streams for initialization (and dropout, in train mode).

    Example:
        >>> head = Head((4, 4, 8), HeadSpec("flatten", (16,)), 3, layers=LayerConfig(),
        ...             rngs=nnx.Rngs(0))
        >>> head(jnp.ones((2, 4, 4, 8))).shape
        (2, 3)
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        spec: HeadSpec,
        num_classes: int,
        *,
        layers: LayerConfig,
        rngs: nnx.Rngs,
    ):
        h, w, c = in_shape
        self.pool = spec.pool
        self.activation = layers.activation
        features = c if spec.pool == "avg" else h * w * c
        widths = [features, *spec.hidden, num_classes]
        self.dense = nnx.List(
            nnx.Linear(
                d_in,
                d_out,
                dtype=layers.dtype,
                param_dtype=jnp.float32,
                kernel_init=_DENSE_INIT,
                rngs=rngs,
            )
            for d_in, d_out in itertools.pairwise(widths)
        )
        self.dropout = (
            nnx.Dropout(spec.dropout, deterministic=True, rngs=rngs) if spec.dropout else None
        )
        self.masks = (
            nnx.List(_mask_variable(width, layers) for width in spec.hidden)
            if layers.width_masks
            else None
        )

    def __call__(self, features_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x h x w x C features to float32 logits B x K."""
        x = features_BxHxWxC
        x = jnp.mean(x, axis=(1, 2)) if self.pool == "avg" else x.reshape(x.shape[0], -1)
        for i, dense in enumerate(self.dense):
            if i:
                x = ACTIVATION_FNS[self.activation](x)
            if self.dropout is not None:
                x = self.dropout(x)
            x = dense(x)
            if self.masks is not None and i < len(self.masks):
                x = _apply_mask(self.masks[i], x)
        return x.astype(jnp.float32)


register_block("pepx", build=PEPX, count=count_pepx_module)
