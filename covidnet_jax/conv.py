"""The library's convolution layer: SAME-padded NHWC convs lowered the way XLA runs them fast.

PEPX networks are 1x1 convs around one depthwise kxk conv. XLA:CPU lowers a convolution
with `feature_group_count == channels`, and even more so its two gradients, to a slow
generic loop: at 224 px that made a whole training step 2x slower than an eager PyTorch twin
(bench/README.md, "Training throughput"). `Conv` therefore computes

- depthwise convs as k*k shifted slices times a per-channel weight, which XLA fuses into one
  elementwise loop (and the gradients into slices, pads and reductions): on CPU 45x, 28x and
  7x faster than the grouped convolution for the forward pass, input and kernel gradients
  (one 3x3 conv at 8x56x56x136), and 2x faster for a whole step on an H100 at batch 8;
- 1x1 convs as a `dot_general` over the channel axis (strided by slicing first);
- everything else with `lax.conv_general_dilated`.

Parameter names, shapes and initialisation are those of `nnx.Conv` (`kernel` KxKx(Cin/G)xCout,
`bias` Cout), so checkpoints and parameter counts do not depend on the lowering, and the
outputs equal `nnx.Conv`'s to float rounding (tests/test_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, padding before, padding after) of one axis under XLA's SAME padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _shifted_sum(padded: jax.Array, kernel_KxKx1xC: jax.Array, stride: int, ho: int, wo: int):
    """sum over taps (i, j) of padded[:, i::stride, j::stride] * kernel[i, j]: B x ho x wo x C."""
    k = kernel_KxKx1xC.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            term = _window(padded, i, j, stride, ho, wo) * kernel_KxKx1xC[i, j, 0]
            out = term if out is None else out + term
    return out


def _window(padded: jax.Array, i: int, j: int, stride: int, ho: int, wo: int) -> jax.Array:
    """The input pixels that tap (i, j) of a strided kernel sees: B x ho x wo x C."""
    b, _, _, c = padded.shape
    return lax.slice(
        padded,
        (0, i, j, 0),
        (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
        (1, stride, stride, 1),
    )


def _same_pad(x_BxHxWxC: jax.Array, k: int, stride: int) -> tuple[jax.Array, int, int]:
    """(x zero-padded for a SAME kxk conv, output height, output width)."""
    _, h, w, _ = x_BxHxWxC.shape
    ho, top, bottom = same_padding(h, k, stride)
    wo, left, right = same_padding(w, k, stride)
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return padded, ho, wo


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x_BxHxWxC: jax.Array, kernel_KxKx1xC: jax.Array, stride: int) -> jax.Array:
    """A SAME-padded depthwise conv as k*k shifted multiply-adds.

    The gradient is hand-written (`_depthwise_bwd`): plain autodiff of the shifted form keeps
    all k*k shifted copies of the input alive from the forward pass to the backward pass (one
    memory pass each to write and to read); saving only the input and re-slicing it in the
    backward pass avoids those writes in the forward pass.

    Args:
        x_BxHxWxC: input.
        kernel_KxKx1xC: one kxk filter per channel (the `nnx.Conv` kernel layout).
        stride: spatial stride.

    Returns:
        B x ceil(H/stride) x ceil(W/stride) x C.
    """
    padded, ho, wo = _same_pad(x_BxHxWxC, kernel_KxKx1xC.shape[0], stride)
    return _shifted_sum(padded, kernel_KxKx1xC, stride, ho, wo)


def _depthwise_fwd(x_BxHxWxC, kernel_KxKx1xC, stride):
    return depthwise_conv(x_BxHxWxC, kernel_KxKx1xC, stride), (x_BxHxWxC, kernel_KxKx1xC)


def _depthwise_bwd(stride, residuals, g_BxHoxWoxC):
    x_BxHxWxC, kernel_KxKx1xC = residuals
    k = kernel_KxKx1xC.shape[0]
    _, h, w, _ = x_BxHxWxC.shape
    _, top, bottom = same_padding(h, k, stride)
    _, left, right = same_padding(w, k, stride)
    # Input gradient: spread g back onto the stride grid (interior padding), pad so that
    # every tap lands inside, and correlate with the flipped kernel (a stride-1 conv).
    spread = lax.pad(
        g_BxHoxWoxC,
        jnp.zeros((), g_BxHoxWoxC.dtype),
        (
            (0, 0, 0),
            (k - 1 - top, k - 1 - bottom, stride - 1),
            (k - 1 - left, k - 1 - right, stride - 1),
            (0, 0, 0),
        ),
    )
    dx = _shifted_sum(spread, kernel_KxKx1xC[::-1, ::-1], 1, h, w)
    # Kernel gradient: one reduction over (B, H, W) per tap.
    padded, ho, wo = _same_pad(x_BxHxWxC, k, stride)
    taps = [
        jnp.sum(_window(padded, i, j, stride, ho, wo) * g_BxHoxWoxC, axis=(0, 1, 2))
        for i in range(k)
        for j in range(k)
    ]
    dkernel = jnp.stack(taps).reshape(kernel_KxKx1xC.shape).astype(kernel_KxKx1xC.dtype)
    return dx.astype(x_BxHxWxC.dtype), dkernel


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def pointwise_conv(x_BxHxWxC: jax.Array, kernel_1x1xCxD: jax.Array, stride: int) -> jax.Array:
    """A 1x1 conv as a matmul over the channel axis: B x ceil(H/s) x ceil(W/s) x D."""
    if stride > 1:
        x_BxHxWxC = x_BxHxWxC[:, ::stride, ::stride, :]
    b, h, w, c = x_BxHxWxC.shape
    # A 2-D (B*H*W) x C matmul: contracting the 4-D array directly made XLA:CPU transpose
    # the output gradient to C x (B*H*W) for the kernel gradient (one extra pass per layer).
    y = lax.dot_general(
        x_BxHxWxC.reshape(b * h * w, c), kernel_1x1xCxD[0, 0], (((1,), (0,)), ((), ()))
    )
    return y.reshape(b, h, w, -1)


class Conv(nnx.Module):
    """SAME-padded NHWC convolution with the lowering chosen from its shape.

    Example:
        >>> conv = Conv(8, 8, kernel_size=3, groups=8, rngs=nnx.Rngs(0))  # depthwise
        >>> conv(jnp.ones((2, 16, 16, 8))).shape
        (2, 16, 16, 8)

    Args:
        in_channels: input channels C.
        out_channels: output channels D.
        kernel_size: square kernel size k.
        stride: spatial stride.
        groups: feature groups (C for a depthwise conv).
        use_bias: add a learned bias.
        dtype: computation dtype; parameters are float32.
        kernel_init: initializer `(key, shape, dtype) -> array` of the kernel.
        rngs: random streams (keyword-only, required).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool,
        dtype: Any = jnp.float32,
        kernel_init: Callable[..., jax.Array],
        rngs: nnx.Rngs,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: {groups} must divide in_channels {in_channels} "
                f"and out_channels {out_channels}"
            )
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None
        self.stride = stride
        self.groups = groups
        self.dtype = dtype
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        self.pointwise = kernel_size == 1 and groups == 1

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = x_BxHxWxC.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.depthwise:
            y = depthwise_conv(x, kernel, self.stride)
        elif self.pointwise:
            y = pointwise_conv(x, kernel, self.stride)
        else:
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
