"""The jitted steps on a tiny local model: loss goes down, jit == eager, optimizer == optax."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from covidnet_jax import parallel, steps, train
from covidnet_jax.checkpointing import Checkpoints
from covidnet_jax.errors import CheckpointError
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings


class TinyNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        # No conv bias before BatchNorm: its exact gradient is zero, and Adam would turn
        # float noise in it into full-size updates that differ between programs.
        self.conv = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x_BxHxWxC):
        x = nnx.relu(self.norm(self.conv(x_BxHxWxC)))
        return self.head(x.mean(axis=(1, 2)))


def _batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((size, 8, 8, 3), dtype=np.float32),
        "label": rng.integers(0, 3, size).astype(np.int32),
    }


def _hyper(**kw):
    args = {"learning_rate": 0.01, "weight_decay": 0.0, "class_weights": np.ones(3), "seed": 0}
    args.update(kw)
    return Hyper.create(**args)


def _setup(key, settings=None, seed=0):
    settings = StepSettings() if settings is None else settings
    model = TinyNet(rngs=nnx.Rngs(seed))
    mesh = parallel.make_mesh()
    fns = StepFunctions.for_model(model, key=key, settings=settings, mesh=mesh)
    return model, fns, mesh


def _copy(tree):
    return jax.tree.map(jnp.array, tree)


def test_one_step_reduces_loss_on_a_fixed_batch():
    model, fns, mesh = _setup("steps-loss")
    state = fns.init_state(model)
    batch = parallel.shard_batch(_batch(), mesh)
    hyper = _hyper()
    train, _ = fns.compile_train(state, batch, hyper)
    state, first = train(state, batch, hyper)  # loss before the update
    state, second = train(state, batch, hyper)  # loss after one update
    assert float(second["loss"]) < float(first["loss"])
    assert int(state.step) == 2
    assert bool(first["finite"])


def test_jit_equals_eager():
    model, fns, mesh = _setup("steps-eager")
    state = fns.init_state(model)
    batch = parallel.shard_batch(_batch(1), mesh)
    hyper = _hyper(weight_decay=1e-3)
    eager_state, eager_metrics = steps._train_step(
        _copy(state), batch, hyper, graphdef=fns.graphdef_train, settings=fns.settings
    )
    jit_state, jit_metrics = fns.train_step(_copy(state), batch, hyper)
    for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jit_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager_metrics["loss"], jit_metrics["loss"], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_update_matches_optax(optimizer):
    settings = StepSettings(optimizer=optimizer)
    model, fns, mesh = _setup(f"steps-optax-{optimizer}", settings)
    state = fns.init_state(model)
    host_batch = _batch(2)
    batch = parallel.shard_batch(host_batch, mesh)
    lr, wd = 0.01, 0.1
    hyper = _hyper(learning_rate=lr, weight_decay=wd)

    def loss_fn(params):
        model_ = nnx.merge(fns.graphdef_train, params, _copy(state.model_state))
        logits = model_(jnp.asarray(host_batch["image"]))
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.asarray(host_batch["label"])
        ).mean()

    params = _copy(state.params)
    grads = jax.grad(loss_fn)(params)
    mask = jax.tree.map(lambda p: p.ndim > 1, params)
    if optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=wd, mask=mask)
    else:
        tx = optax.chain(optax.add_decayed_weights(wd, mask=mask), optax.adam(lr))
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)

    new_state, _ = fns.train_step(state, batch, hyper)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_weighted_cross_entropy_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 2], np.int32)
    weights = np.array([1.0, 1.0, 5.0], np.float32)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.mean([-log_softmax[0, 0] * 1.0, -log_softmax[1, 2] * 5.0])
    got = steps.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_schedules():
    hyper = _hyper(learning_rate=1.0, warmup_steps=10, total_steps=110, min_learning_rate=0.1)
    one = jnp.float32(1.0)

    def lr(step, kind, scale=one):
        return float(steps.scheduled_learning_rate(jnp.int32(step), hyper, scale, kind))

    assert lr(0, "warmup_cosine") == pytest.approx(0.1)
    assert lr(4, "warmup_cosine") == pytest.approx(0.5)
    assert lr(10, "warmup_cosine") == pytest.approx(1.0)
    assert lr(60, "warmup_cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr(110, "warmup_cosine") == pytest.approx(0.1)
    assert lr(500, "constant") == 1.0
    assert lr(3, "plateau", jnp.float32(0.49)) == pytest.approx(0.49)


def test_eval_step_confusion_matches_numpy():
    model, fns, mesh = _setup("steps-eval")
    state = fns.init_state(model)
    host = {**_batch(3, size=8), "mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)}
    batch = parallel.shard_batch(host, mesh)
    out = fns.eval_step(state.params, state.model_state, batch)
    model.eval()
    predicted = np.asarray(model(jnp.asarray(host["image"]))).argmax(-1)
    expected = np.zeros((3, 3), int)
    for t, p, m in zip(host["label"], predicted, host["mask"], strict=True):
        expected[t, p] += m
    np.testing.assert_array_equal(np.asarray(out["confusion"]), expected)
    probs = fns.predict(state.params, state.model_state, batch["image"])
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_compiled_once_per_signature_and_shared_per_key():
    model, fns, mesh = _setup("steps-cache")
    again = StepFunctions.for_model(
        TinyNet(rngs=nnx.Rngs(5)), key="steps-cache", settings=StepSettings(), mesh=mesh
    )
    assert again is fns
    state = fns.init_state(model)
    batch = parallel.shard_batch(_batch(), mesh)
    hyper = _hyper()
    first, seconds = fns.compile_train(state, batch, hyper)
    second, zero = fns.compile_train(state, batch, _hyper(learning_rate=0.5, seed=3))
    assert second is first and seconds > 0 and zero == 0.0


def test_init_state_does_not_alias_the_model():
    model, fns, mesh = _setup("steps-alias")
    kernel_before = np.asarray(model.conv.kernel[...]).copy()
    state = fns.init_state(model)
    batch = parallel.shard_batch(_batch(), mesh)
    fns.train_step(state, batch, _hyper())  # donates `state`
    np.testing.assert_array_equal(np.asarray(model.conv.kernel[...]), kernel_before)


def test_calibrate_batch_norm_sets_population_statistics_of_the_current_weights():
    model, fns, _ = _setup("tiny-calibrate")
    state = fns.init_state(model)
    batches = [_batch(seed)["image"] for seed in (1, 2, 3)]
    calibrated = fns.calibrate_batch_norm(state.params, state.model_state, iter(batches))
    conv_out = np.concatenate([np.asarray(model.conv(jnp.asarray(b))) for b in batches])
    np.testing.assert_allclose(
        calibrated["norm"]["mean"][...], conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        calibrated["norm"]["var"][...], conv_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # The input state is untouched (it may still be donated to the next train step).
    np.testing.assert_array_equal(state.model_state["norm"]["mean"][...], np.zeros(6))
    # Eval mode with calibrated statistics normalises the same images to mean 0, var 1.
    eval_model = nnx.merge(fns.graphdef_eval, state.params, calibrated)
    normed = np.concatenate([np.asarray(eval_model.norm(eval_model.conv(b))) for b in batches])
    np.testing.assert_allclose(normed.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


# -- The hand-written optimizer that optax's pieces replaced, kept verbatim as the reference.
# `_reference_train_step` is `steps._train_step` as it was before the switch: L2 decay (adam)
# or decoupled decay (adamw) of ndim > 1 parameters assembled around `optax.scale_by_adam`,
# the learning rate applied by hand, and the Adam moments as the whole optimizer state.


def _reference_learning_rate(step, hyper, lr_scale, schedule):
    if schedule != "warmup_cosine":
        return hyper.learning_rate * lr_scale
    step_f = step.astype(jnp.float32)
    warmup = hyper.warmup_steps.astype(jnp.float32)
    warm = hyper.learning_rate * (step_f + 1.0) / jnp.maximum(warmup, 1.0)
    decay_len = jnp.maximum(hyper.total_steps.astype(jnp.float32) - warmup, 1.0)
    progress = jnp.clip((step_f - warmup) / decay_len, 0.0, 1.0)
    cosine = hyper.min_learning_rate + (hyper.learning_rate - hyper.min_learning_rate) * 0.5 * (
        1.0 + jnp.cos(math.pi * progress)
    )
    return jnp.where(step_f < warmup, warm, cosine) * lr_scale


def _reference_decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _reference_adam():
    return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def _reference_state(state):
    """A copy of `state` (any optimizer layout) with fresh Adam moments as optimizer state."""
    state = _copy(state)  # the train step donates the original
    return state.replace(opt_state=_reference_adam().init(state.params))


def _reference_train_step(state, batch, hyper, *, graphdef, settings):
    images = batch["image"].astype(settings.compute_dtype)
    labels = batch["label"]
    step_key = jax.random.fold_in(jax.random.wrap_key_data(hyper.rng_key), state.step)

    def loss_fn(params, model_state):
        model_state = jax.tree.map(lambda x: x, model_state)
        model = nnx.merge(graphdef, params, model_state)
        nnx.reseed(model, dropout=step_key)
        logits = model(images)
        loss = steps.weighted_cross_entropy(logits, labels, hyper.class_weights)
        return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state
    )
    decay = jax.tree.map(
        lambda p, m: p * hyper.weight_decay if m else jnp.zeros_like(p),
        state.params,
        _reference_decay_mask(state.params),
    )
    if settings.optimizer == "adam":
        grads = jax.tree.map(jnp.add, grads, decay)
    updates, opt_state = _reference_adam().update(grads, state.opt_state, state.params)
    if settings.optimizer == "adamw":
        updates = jax.tree.map(jnp.add, updates, decay)
    lr = _reference_learning_rate(state.step, hyper, state.lr_scale, settings.schedule)
    params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "correct": jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32),
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics


def _assert_trees_close(actual, expected, **tolerance):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tolerance)


def _reference_hyper():
    # Decay on, a warm-up and a budget shorter than the run (the cosine's floor is reached),
    # unequal class weights: every traced field matters.
    return _hyper(
        learning_rate=0.02,
        weight_decay=0.05,
        warmup_steps=5,
        total_steps=18,
        min_learning_rate=1e-3,
        class_weights=np.array([1.0, 2.0, 0.5]),
    )


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine", "plateau"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optax_steps_equal_the_hand_written_ones(optimizer, schedule):
    settings = StepSettings(optimizer=optimizer, schedule=schedule)
    model, fns, mesh = _setup(f"steps-reference-{optimizer}-{schedule}", settings)
    batch = parallel.shard_batch(_batch(4), mesh)
    hyper = _reference_hyper()
    reference = jax.jit(
        functools.partial(_reference_train_step, graphdef=fns.graphdef_train, settings=settings)
    )
    state = fns.init_state(model)
    expected = _reference_state(state)
    for step in range(24):
        if step == 12:  # what a plateau reduction does between steps
            state = state.replace(lr_scale=jnp.float32(0.7))
            expected = expected.replace(lr_scale=jnp.float32(0.7))
        state, metrics = fns.train_step(state, batch, hyper)
        expected, expected_metrics = reference(expected, batch, hyper)
        for name in ("loss", "learning_rate", "correct"):
            np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-6)
    tolerance = {"rtol": 1e-5, "atol": 1e-7}
    _assert_trees_close(state.params, expected.params, **tolerance)
    _assert_trees_close(state.model_state, expected.model_state, **tolerance)
    for moment in ("mu", "nu"):
        _assert_trees_close(
            optax.tree.get(state.opt_state, moment),
            getattr(expected.opt_state, moment),
            **tolerance,
        )
    adam = optax.tree.get(state.opt_state, "ScaleByAdamState")
    assert int(state.step) == int(adam.count) == int(expected.opt_state.count) == 24


def test_a_checkpoint_of_the_hand_written_optimizer_resumes_with_the_same_updates(tmp_path):
    # A run saved before the switch holds a bare `ScaleByAdamState`; restoring it into
    # today's state maps its moments and count in, and training on matches the old code.
    settings = StepSettings(optimizer="adam", schedule="warmup_cosine")
    model, fns, mesh = _setup("steps-legacy-checkpoint", settings)
    batch = parallel.shard_batch(_batch(5), mesh)
    hyper = _reference_hyper()
    reference = jax.jit(
        functools.partial(_reference_train_step, graphdef=fns.graphdef_train, settings=settings)
    )
    expected = _reference_state(fns.init_state(model))
    for _ in range(6):
        expected, _ = reference(expected, batch, hyper)
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(6, expected, metadata={"spec_hash": "old"})
    with Checkpoints.open_existing(tmp_path) as ckpts:
        state, meta = ckpts.restore(fns.abstract_state(model))
    assert meta == {"spec_hash": "old"}
    assert jax.tree.structure(state) == jax.tree.structure(fns.abstract_state(model))
    assert int(state.opt_state.count) == 6 == int(state.step)
    for _ in range(6):
        state, _ = fns.train_step(state, batch, hyper)
        expected, _ = reference(expected, batch, hyper)
    tolerance = {"rtol": 1e-5, "atol": 1e-7}
    _assert_trees_close(state.params, expected.params, **tolerance)
    _assert_trees_close(optax.tree.get(state.opt_state, "mu"), expected.opt_state.mu, **tolerance)
    _assert_trees_close(optax.tree.get(state.opt_state, "nu"), expected.opt_state.nu, **tolerance)
    assert int(optax.tree.get(state.opt_state, "ScaleByAdamState").count) == 12


def test_a_checkpoint_of_another_model_is_still_refused(tmp_path):
    # The legacy mapping must not hide a real mismatch: old layout, other shapes.
    model, fns, _ = _setup("steps-legacy-mismatch")
    other = _reference_state(fns.init_state(model))
    other = other.replace(params=jax.tree.map(lambda x: jnp.zeros((*x.shape, 2)), other.params))
    other = other.replace(opt_state=_reference_adam().init(other.params))
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, other, metadata={})
    with (
        Checkpoints.open_existing(tmp_path) as ckpts,
        pytest.raises(CheckpointError, match="does not match this model"),
    ):
        ckpts.restore(fns.abstract_state(model))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_learning_rate_and_weight_decay_are_traced_into_optax(optimizer):
    # One compiled step for every trial: new values reach optax's injected
    # hyper-parameters without tracing the step again.
    settings = StepSettings(optimizer=optimizer, schedule="warmup_cosine")
    model, fns, mesh = _setup(f"steps-traced-{optimizer}", settings)
    batch = parallel.shard_batch(_batch(), mesh)
    for lr, wd, warmup in [(0.01, 0.0, 0), (0.003, 0.2, 3), (0.5, 1e-4, 1)]:
        hyper = _hyper(learning_rate=lr, weight_decay=wd, warmup_steps=warmup, total_steps=9)
        state, metrics = fns.train_step(fns.init_state(model), batch, hyper)
        injected = state.opt_state.hyperparams
        expected_lr = lr / warmup if warmup else lr
        assert float(injected["learning_rate"]) == pytest.approx(expected_lr, rel=1e-6)
        assert float(metrics["learning_rate"]) == pytest.approx(expected_lr, rel=1e-6)
        assert float(injected["weight_decay"]) == pytest.approx(wd, rel=1e-6)
    assert fns.train_step._cache_size() == 1


def test_plateau_follows_optax_reduce_on_plateau():
    # The host-side rule equals optax.contrib.reduce_on_plateau fed the validation losses:
    # improvements within the relative tolerance (1e-4) do not count, patience, factor and
    # the floor `min_scale`.
    factor, patience, min_scale = 0.7, 2, 0.3
    tx = optax.contrib.reduce_on_plateau(
        factor=factor, patience=patience, rtol=1e-4, atol=0.0, min_scale=min_scale
    )
    update = jax.jit(lambda state, value: tx.update({}, state, value=value)[1])
    expected = tx.init(jnp.zeros((), jnp.float32))
    plateau = train._Plateau()
    losses = [1.0, 0.9, 0.89995, 0.95, 0.8997, 0.91, 0.92, 0.5, 0.6, 0.7, 0.8, 0.9, 0.6, 0.7]
    reductions = 0
    for loss in losses:
        reduced = plateau.update(loss, factor=factor, patience=patience, min_scale=min_scale)
        scale_before = float(expected.scale)
        expected = update(expected, jnp.float32(loss))
        assert reduced == (float(expected.scale) < scale_before)
        assert plateau.lr_scale == pytest.approx(float(expected.scale), rel=1e-6)
        assert plateau.num_bad == int(expected.plateau_count)
        assert plateau.best_loss == pytest.approx(float(expected.best_value), rel=1e-6)
        reductions += reduced
    assert reductions == 4 and plateau.lr_scale == min_scale  # the last one stops at the floor
