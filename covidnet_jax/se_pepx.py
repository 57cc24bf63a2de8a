"""Block kind "se_pepx": a PEPX module followed by squeeze-excitation on its output channels.

Registered through `covidnet_jax.block_registry.register_block`, the same public path a
user's own block takes; this module is the worked example of one: the NNX module, its cost
function, its extra spec field (`se_ratio`, default 4), that field's check and the values a
search may give it (2, 4, 8).

Squeeze-excitation (Hu et al., 2018) rescales each output channel by a gate computed from the
whole feature map: `y * sigmoid(W2 act(W1 mean_hw(y) + b1) + b2)`, with `W1` reducing the
`out` channels to `max(1, out // se_ratio)`.

Example:
    >>> from covidnet_jax.arch import ModuleSpec
    >>> from covidnet_jax.blocks import LayerConfig
    >>> spec = ModuleSpec(4, 16, 4, 16, kind="se_pepx")
    >>> block = SePEPX(8, spec, stride=2, layers=LayerConfig(), rngs=nnx.Rngs(0))
    >>> block(jnp.ones((2, 16, 16, 8))).shape
    (2, 8, 8, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from covidnet_jax.arch import ModuleSpec
from covidnet_jax.block_registry import register_block
from covidnet_jax.blocks import ACTIVATION_FNS, PEPX, LayerConfig, scaled_normal_init
from covidnet_jax.cost import CostCounter, LayerCost, count_pepx_module
from covidnet_jax.errors import SpecError
from covidnet_jax.typed_yaml import describe

MAX_SE_RATIO = 1024
SIGMOID_FLOPS = 3
"""Flops per element XLA's cost analysis counts for `jax.nn.sigmoid` (a logistic op)."""

_DENSE_INIT = scaled_normal_init(1.0, "fan_in")


def se_channels(spec: ModuleSpec) -> int:
    """Channels of the squeeze (the gate's hidden layer): `max(1, out // se_ratio)`."""
    return max(1, spec.out // int(spec.options["se_ratio"]))


class SqueezeExcite(nnx.Module):
    """Squeeze-excitation: per-channel gates from the global average of the input.

    Args:
        channels: channels C of the input (and of the gate).
        reduced: channels of the gate's hidden layer.
        layers: the network's activation (after the hidden layer) and dtype.
        rngs: random streams for initialization.

    Example:
        >>> se = SqueezeExcite(8, 2, layers=LayerConfig(), rngs=nnx.Rngs(0))
        >>> se(jnp.ones((2, 4, 4, 8))).shape
        (2, 4, 4, 8)
    """

    def __init__(self, channels: int, reduced: int, *, layers: LayerConfig, rngs: nnx.Rngs):
        def dense(d_in: int, d_out: int) -> nnx.Linear:
            return nnx.Linear(
                d_in,
                d_out,
                dtype=layers.dtype,
                param_dtype=jnp.float32,
                kernel_init=_DENSE_INIT,
                rngs=rngs,
            )

        self.reduce = dense(channels, reduced)
        self.restore = dense(reduced, channels)
        self.activation = layers.activation

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x H x W x C (each channel scaled by its gate in (0, 1))."""
        squeezed_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
        hidden = ACTIVATION_FNS[self.activation](self.reduce(squeezed_BxC))
        gate_BxC = jax.nn.sigmoid(self.restore(hidden))
        return x_BxHxWxC * gate_BxC[:, None, None, :]


class SePEPX(nnx.Module):
    """A PEPX module (`blocks.PEPX`) whose output goes through `SqueezeExcite`.

    Args:
        in_channels: input channels C.
        spec: a `ModuleSpec` of kind "se_pepx" (widths, kernel size, `options.se_ratio`).
        stride: stride of the depthwise conv.
        layers: norm, activation and dtype of the network.
        rngs: random streams for initialization.
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
        self.pepx = PEPX(in_channels, spec, stride=stride, layers=layers, rngs=rngs)
        self.se = SqueezeExcite(spec.out, se_channels(spec), layers=layers, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Maps B x H x W x C to B x ceil(H/stride) x ceil(W/stride) x spec.out."""
        return self.se(self.pepx(x_BxHxWxC))


def count_se_pepx(
    counter: CostCounter, prefix: str, module: ModuleSpec, *, stride: int, merge: bool
) -> None:
    """Counts a `SePEPX`: its PEPX layers, then the gate's two FC layers.

    The average pool is counted on `se.reduce` (one flop per averaged input), the gate's
    multiply (and the stage's merge addition, with `merge`) on `se.restore`. Alone, the
    gate's flops are exactly XLA's; inside a network XLA may fuse the PEPX output's norm
    and activation into both the pool and the multiply and count them twice (up to 7% of
    a toy network's flops), which this estimate does not follow.
    """
    count_pepx_module(counter, f"{prefix}.pepx", module, stride=stride, merge=False)
    h, w, c = counter.shape
    r = se_channels(module)
    elements = h * w * c
    counter.add(
        LayerCost(
            f"{prefix}.se.reduce",
            "fc",
            (r,),
            params=c * r + r,
            macs=c * r,
            flops=elements + 2 * c * r + r + counter.act_flops * r,
            saved_elements=c + 2 * r,
        )
    )
    counter.add(
        LayerCost(
            f"{prefix}.se.restore",
            "fc",
            (c,),
            params=r * c + c,
            macs=r * c,
            flops=2 * r * c + c + SIGMOID_FLOPS * c + elements * (1 + int(merge)),
            saved_elements=2 * c + elements,
        )
    )


def check_se_pepx(module: ModuleSpec) -> None:
    """`options.se_ratio` is an int in [1, 1024]."""
    ratio = module.options["se_ratio"]
    if not isinstance(ratio, int) or isinstance(ratio, bool) or not 1 <= ratio <= MAX_SE_RATIO:
        raise SpecError(
            f"options.se_ratio: expected an int in [1, {MAX_SE_RATIO}], got {describe(ratio)}"
        )


register_block(
    "se_pepx",
    build=SePEPX,
    count=count_se_pepx,
    fields={"se_ratio": 4},
    validate=check_se_pepx,
    genes={"se_ratio": (2, 4, 8)},
)
