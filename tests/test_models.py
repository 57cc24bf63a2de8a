"""Models built from specs: shapes, jit equality, determinism, train/eval modes, dtypes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covidnet_jax import presets
from covidnet_jax.arch import ArchSpec, HeadSpec, ModuleSpec, StageSpec
from covidnet_jax.blocks import LayerConfig, PepxStage, scaled_normal_init
from covidnet_jax.cost import count_cost
from covidnet_jax.errors import SpecError
from covidnet_jax.models import build_model


def _abstract_model_and_forward(spec, batch: int = 2):
    """The abstract model and its (logits, features) shapes; no parameter is materialized."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct(
        (batch, spec.input_size, spec.input_size, spec.input_channels), jnp.float32
    )

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), model.features(x)

    return nnx.merge(graphdef, state), jax.eval_shape(forward, state, x)


def _param_count(model) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", presets.list_presets())
def test_every_preset_forwards_at_small_input_and_matches_analytic_params(name):
    spec = presets.get_preset(name).with_input_size(64).with_num_classes(5)
    model, (logits, features) = _abstract_model_and_forward(spec)
    assert logits.shape == (2, 5)
    assert logits.dtype == jnp.float32
    assert features.ndim == 4 and features.shape[0] == 2
    assert _param_count(model) == count_cost(spec).params


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(presets.get_preset("tiny"), rngs=nnx.Rngs(0))


def _tiny_variant(**changes) -> ArchSpec:
    return dataclasses.replace(presets.get_preset("tiny"), **changes)


X = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))


def test_features_classify_split_and_jit_match_eager(tiny_model):
    features = tiny_model.features(X)
    assert features.shape == (2, 8, 8, 32)
    eager = tiny_model(X)
    np.testing.assert_allclose(tiny_model.classify(features), eager, rtol=1e-6, atol=1e-6)
    jitted = nnx.jit(lambda m, x: m(x))(tiny_model, X)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    assert eager.shape == (2, 3)


def test_same_seed_gives_identical_parameters_and_other_seed_differs(tiny_model):
    spec = presets.get_preset("tiny")
    params = [
        nnx.state(m, nnx.Param)
        for m in (tiny_model, *(build_model(spec, rngs=nnx.Rngs(s)) for s in (0, 1)))
    ]
    leaves = [jax.tree.leaves(p) for p in params]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1], strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves[0], leaves[2], strict=True))


def test_train_mode_updates_batch_stats_and_eval_mode_is_deterministic():
    spec = _tiny_variant(head=HeadSpec(dropout=0.5))
    model = build_model(spec, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    before = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    np.testing.assert_array_equal(forward(model, X), forward(model, X))  # built in eval mode
    model.train()
    first, second = forward(model, X), forward(model, X)
    assert not np.allclose(first, second)  # dropout draws new masks
    after = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    model.eval()
    np.testing.assert_array_equal(forward(model, X), forward(model, X))


def test_bfloat16_computation_keeps_float32_params_and_logits(tiny_model):
    model = build_model(presets.get_preset("tiny"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    logits, features = nnx.jit(lambda m, x: (m(x), m.features(x)))(model, X)
    assert logits.dtype == jnp.float32
    assert features.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    reference = nnx.jit(lambda m, x: m(x))(tiny_model, X)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)


def test_dense_stage_equals_explicit_dense_links(tiny_model):
    """The running sum equals the paper's wiring: module k reads side + all earlier outputs."""

    @nnx.jit
    def both(model, x):
        stage = model.stages[0]
        x = model.stem(x)
        side = stage.side(x)
        outputs = [stage.modules[0](x)]
        for module in stage.modules[1:]:
            outputs.append(module(side + sum(outputs)))
        return stage(x), side + sum(outputs)

    running, explicit = both(tiny_model, X)
    np.testing.assert_allclose(running, explicit, rtol=1e-5, atol=1e-5)


def test_residual_stage_projects_only_when_shapes_differ():
    spec = StageSpec(1, (ModuleSpec(4, 8, 4, 8), ModuleSpec(4, 8, 4, 8), ModuleSpec(4, 8, 4, 6)))
    stage = nnx.eval_shape(
        lambda: PepxStage(8, spec, connectivity="residual", layers=LayerConfig(), rngs=nnx.Rngs(0))
    )
    assert [s is None for s in stage.shortcuts] == [True, True, False]
    assert stage.side is None


@pytest.fixture(scope="module")
def plain_model():
    return build_model(_tiny_variant(norm="none", connectivity="none"), rngs=nnx.Rngs(0))


def test_pepx_matches_lax_reference_without_norm(plain_model):
    """A PEPX module without norm equals five convs written with lax.conv_general_dilated."""
    pepx = plain_model.stages[1].modules[0]
    x = jax.random.normal(jax.random.key(4), (2, 16, 16, 16))

    @jax.jit
    def reference(x):
        y = x
        for layer in (pepx.proj1, pepx.expand, pepx.depthwise, pepx.proj2, pepx.extend):
            conv = layer.conv
            y = jax.lax.conv_general_dilated(
                y,
                conv.kernel[...],
                window_strides=(conv.stride, conv.stride),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=conv.groups,
            )
            y = jax.nn.relu(y + conv.bias[...])
        return y

    expected = reference(x)
    assert expected.shape == (2, 8, 8, 32)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(pepx, x), expected, rtol=1e-5, atol=1e-5)


def test_build_model_refuses_non_specs():
    with pytest.raises(SpecError, match="spec: expected an ArchSpec"):
        build_model({"type": "pepx"}, rngs=nnx.Rngs(0))


def test_residual_and_plain_variants_give_finite_logits(plain_model):
    residual = build_model(_tiny_variant(connectivity="residual"), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    for model in (residual, plain_model):
        logits = forward(model, X)
        assert logits.shape == (2, 3)
        assert np.all(np.isfinite(logits))


def test_scaled_normal_init_has_the_variance_and_is_the_same_traced_and_eager():
    init = scaled_normal_init(2.0, "fan_out")
    key = jax.random.key(5)
    kernel = init(key, (3, 3, 64, 128))
    assert kernel.shape == (3, 3, 64, 128) and kernel.dtype == jnp.float32
    assert float(jnp.std(kernel)) == pytest.approx((2.0 / (3 * 3 * 128)) ** 0.5, rel=0.02)
    assert abs(float(jnp.mean(kernel))) < 0.01
    np.testing.assert_array_equal(jax.jit(init, static_argnums=1)(key, (3, 3, 64, 128)), kernel)
    assert float(jnp.std(scaled_normal_init(1.0, "fan_in")(key, (512, 10)))) == pytest.approx(
        (1.0 / 512) ** 0.5, rel=0.05
    )
    with pytest.raises(ValueError, match="mode: expected 'fan_in' or 'fan_out', got 'avg'"):
        scaled_normal_init(1.0, "avg")
