"""conv.Conv: the XLA-friendly lowerings equal nnx.Conv (same parameters, same outputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covidnet_jax.conv import Conv, same_padding


def _init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


def _conv_pair(cin, cout, kernel, stride, groups, use_bias):
    """(conv.Conv, nnx.Conv) with the same arguments and initial weights."""
    ours = Conv(
        cin,
        cout,
        kernel_size=kernel,
        stride=stride,
        groups=groups,
        use_bias=use_bias,
        kernel_init=_init,
        rngs=nnx.Rngs(0),
    )
    reference = nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=_init,
        rngs=nnx.Rngs(0),
    )
    return ours, reference


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "groups", "size"),
    [
        (6, 6, 3, 1, 6, 9),  # depthwise
        (6, 6, 3, 2, 6, 9),  # depthwise, strided, odd size
        (6, 6, 5, 2, 6, 8),  # depthwise, 5x5, even size
        (5, 7, 1, 1, 1, 8),  # pointwise
        (5, 7, 1, 2, 1, 9),  # pointwise, strided
        (4, 6, 3, 2, 1, 9),  # general
        (4, 6, 3, 1, 2, 8),  # grouped, not depthwise
    ],
)
def test_matches_nnx_conv(cin, cout, kernel, stride, groups, size):
    use_bias = stride == 2  # both paths, half the compiles
    ours, reference = _conv_pair(cin, cout, kernel, stride, groups, use_bias)
    assert ours.kernel[...].shape == reference.kernel[...].shape
    np.testing.assert_array_equal(ours.kernel[...], reference.kernel[...])
    if use_bias:
        ours.bias[...] = reference.bias[...] = jnp.arange(cout, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, size, size, cin))
    expected = reference(x)
    assert ours(x).shape == expected.shape == (2, -(-size // stride), -(-size // stride), cout)
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5)
    # Gradients (what the training step runs) agree too.
    grad_ours = jax.grad(lambda k: jnp.sum(Conv.__call__(_with_kernel(ours, k), x) ** 2))(
        ours.kernel[...]
    )
    grad_ref = jax.grad(lambda k: jnp.sum(_with_kernel(reference, k)(x) ** 2))(
        reference.kernel[...]
    )
    np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-3)


def _with_kernel(module, kernel):
    graphdef, state = nnx.split(module)
    clone = nnx.merge(graphdef, state)
    clone.kernel = nnx.Param(kernel)
    return clone


def test_bfloat16_compute_keeps_float32_params():
    conv = Conv(
        4,
        4,
        kernel_size=3,
        groups=4,
        use_bias=True,
        dtype=jnp.bfloat16,
        kernel_init=_init,
        rngs=nnx.Rngs(0),
    )
    y = conv(jnp.ones((1, 5, 5, 4)))
    assert y.dtype == jnp.bfloat16
    assert conv.kernel[...].dtype == jnp.float32


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups: 4 must divide in_channels 6"):
        Conv(6, 8, kernel_size=3, groups=4, use_bias=False, kernel_init=_init, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("size", "kernel", "stride"), [(9, 3, 2), (8, 3, 2), (7, 5, 1), (1, 3, 1)])
def test_same_padding_matches_xla(size, kernel, stride):
    out, lo, hi = same_padding(size, kernel, stride)
    x = jnp.ones((1, size, size, 1))
    y = jax.lax.conv_general_dilated(
        x,
        jnp.ones((kernel, kernel, 1, 1)),
        (stride, stride),
        [(lo, hi), (lo, hi)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    z = jax.lax.conv_general_dilated(
        x,
        jnp.ones((kernel, kernel, 1, 1)),
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert y.shape[1] == out
    np.testing.assert_array_equal(y, z)


@pytest.mark.parametrize(
    ("kernel", "stride", "size"),
    [(3, 1, 9), (3, 1, 8), (3, 2, 9), (3, 2, 8), (5, 1, 7), (5, 2, 8), (5, 2, 7)],
)
def test_depthwise_gradients_match_nnx_conv(kernel, stride, size):
    """The hand-written VJP of the depthwise conv equals autodiff of nnx.Conv (input and kernel)."""
    channels = 3
    ours, reference = _conv_pair(channels, channels, kernel, stride, channels, False)
    x = jax.random.normal(jax.random.key(1), (2, size, size + 1, channels))
    out = -(-size // stride), -(-(size + 1) // stride)
    cotangent = jax.random.normal(jax.random.key(2), (2, *out, channels))

    def loss(module, kernel_, x_):
        return jnp.sum(_with_kernel(module, kernel_)(x_) * cotangent)

    grads_ours = jax.jit(jax.grad(lambda k, x_: loss(ours, k, x_), argnums=(0, 1)))(
        ours.kernel[...], x
    )
    grads_ref = jax.grad(lambda k, x_: loss(reference, k, x_), argnums=(0, 1))(
        reference.kernel[...], x
    )
    for got, want in zip(grads_ours, grads_ref, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_nnx_batch_norm(dtype):
    """blocks.batch_norm (hand-written VJP) equals nnx.BatchNorm: output, statistics, grads.

    Kept beside the conv tests because both are the training-step lowerings of blocks.py.
    """
    from covidnet_jax.blocks import batch_norm

    def make():
        norm = nnx.BatchNorm(
            5, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        norm.scale[...] = jnp.linspace(0.5, 2.0, 5)
        norm.bias[...] = jnp.linspace(-1.0, 1.0, 5)
        norm.mean[...] = jnp.full((5,), 0.3)
        norm.var[...] = jnp.full((5,), 2.0)
        return norm

    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(1), (3, 7, 6, 5))).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    def loss(apply, params, x_):
        graphdef, state = nnx.split(make())
        norm = nnx.merge(graphdef, state)
        norm.scale[...], norm.bias[...] = params
        y = apply(norm, x_)
        stats = (norm.mean[...], norm.var[...])
        return jnp.sum(y.astype(jnp.float32) * cotangent), (y, stats)

    params = (jnp.linspace(0.5, 2.0, 5), jnp.linspace(-1.0, 1.0, 5))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for train in (True, False):

        def ours(norm, x_, train=train):
            norm.use_running_average = not train
            return batch_norm(norm, x_)

        def reference(norm, x_, train=train):
            return norm(x_, use_running_average=not train)

        (got, got_aux), got_grads = jax.jit(
            jax.value_and_grad(lambda p, x_: loss(ours, p, x_), argnums=(0, 1), has_aux=True)
        )(params, x)
        (want, want_aux), want_grads = jax.value_and_grad(
            lambda p, x_: loss(reference, p, x_), argnums=(0, 1), has_aux=True
        )(params, x)
        assert got_aux[0].dtype == want_aux[0].dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        for a, b in zip(
            jax.tree.leaves((got_aux, got_grads)),
            jax.tree.leaves((want_aux, want_grads)),
            strict=True,
        ):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10
            )
