"""The pure, jitted training, evaluation and prediction steps of one model graph.

The model is split once into a static graph (`nnx.GraphDef`, one for train mode and one
for eval mode) and its state (`params`: the `nnx.Param`s; `model_state`: everything else,
e.g. BatchNorm statistics). Steps are pure functions of that state, jitted with the static
settings bound by `functools.partial` outside `jit`, the train state donated, and
shardings from a data-parallel mesh (`covidnet_jax.parallel`).

Everything that varies between runs of the same design without changing shapes (learning
rate, weight decay, schedule lengths, class weights, the root RNG key) is a traced
argument (`Hyper`), so one compiled step serves every trial of a spec in a process. The
optimizer is optax's own (`make_optimizer`: `optax.adam` after masked L2 decay, or
`optax.adamw`) wrapped in `optax.inject_hyperparams`; each step writes the traced learning
rate and weight decay into its state. `StepFunctions.for_model` memoises the jitted
functions per (spec hash, settings, mesh), and `compile_*` memoises the ahead-of-time
compiled executables per argument signature.

Example:
    >>> fns = StepFunctions.for_model(model, key="tiny", settings=settings, mesh=mesh)
    >>> state = fns.init_state(model)
    >>> train, compile_s = fns.compile_train(state, batch, hyper)  # once per signature
    >>> state, step_metrics = train(state, batch, hyper)  # no host sync
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from covidnet_jax import parallel

Batch = dict[str, jax.Array]

_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (all leaves are arrays).

    Attributes:
        step: int32 scalar, the number of updates applied.
        params: the model's `nnx.Param`s.
        model_state: the model's other variables (BatchNorm running statistics).
        opt_state: the state of `make_optimizer(settings.optimizer)` over `params`: an
            `optax.InjectStatefulHyperparamsState` holding the learning rate and weight
            decay of the last update and, inside, the `optax.ScaleByAdamState` moments.
        lr_scale: float32 scalar multiplying the scheduled learning rate
            (reduce-on-plateau lowers it; 1.0 otherwise).
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    lr_scale: jax.Array


@struct.dataclass
class Hyper:
    """Traced hyper-parameters (changing them never recompiles).

    Attributes:
        learning_rate: peak learning rate.
        weight_decay: L2 (adam) or decoupled (adamw) decay of weight matrices and kernels.
        warmup_steps: linear warm-up length (warmup_cosine).
        total_steps: schedule length (warmup_cosine).
        min_learning_rate: end of the cosine.
        class_weights: float32 K, weight of each class in the loss.
        rng_key: the run's root key; the step is folded in for dropout.
    """

    learning_rate: jax.Array
    weight_decay: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array
    min_learning_rate: jax.Array
    class_weights: jax.Array
    rng_key: jax.Array

    @classmethod
    def create(
        cls,
        *,
        learning_rate: float,
        weight_decay: float,
        class_weights: np.ndarray,
        seed: int,
        warmup_steps: int = 0,
        total_steps: int = 1,
        min_learning_rate: float = 0.0,
    ) -> Hyper:
        """Builds the traced hyper-parameters from Python numbers."""
        return cls(
            learning_rate=jnp.float32(learning_rate),
            weight_decay=jnp.float32(weight_decay),
            warmup_steps=jnp.int32(warmup_steps),
            total_steps=jnp.int32(total_steps),
            min_learning_rate=jnp.float32(min_learning_rate),
            class_weights=jnp.asarray(class_weights, dtype=jnp.float32),
            rng_key=jax.random.key_data(jax.random.key(seed)),
        )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings that change the compiled program.

    Attributes:
        optimizer: "adam" (weight decay as L2 on the gradient) or "adamw" (decoupled).
        schedule: "constant" and "plateau" use `learning_rate * lr_scale`;
            "warmup_cosine" warms up linearly then decays to `min_learning_rate`.
        compute_dtype: dtype the images are cast to (the model's own dtype is set when
            it is built).
    """

    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "warmup_cosine", "plateau"] = "constant"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"


def scheduled_learning_rate(
    step: jax.Array, hyper: Hyper, lr_scale: jax.Array, schedule: str
) -> jax.Array:
    """The learning rate used for the update at `step` (float32 scalar).

    Written here rather than taken from `optax.schedules`: optax's schedule constructors
    check their step counts in Python (`if transition_steps <= 0`), so they cannot take
    the traced `warmup_steps`/`total_steps` and would bake each trial's budget into the
    compiled step; and the warm-up here reaches the peak one step earlier
    (`lr * (step + 1) / warmup_steps`) than optax's linear warm-up from zero.
    """
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


def weighted_cross_entropy(
    logits_BxK: jax.Array, labels_B: jax.Array, class_weights_K: jax.Array
) -> jax.Array:
    """Mean over the batch of `w[label] * CE(logits, label)` (the released COVID-Net loss).

    Args:
        logits_BxK: float logits.
        labels_B: int labels in [0, K).
        class_weights_K: float32 per-class weights.

    Returns:
        A float32 scalar.
    """
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK.astype(jnp.float32), labels_B)
    return jnp.mean(ce_B * class_weights_K[labels_B])


def _decay_mask(params: Any) -> Any:
    # Decay kernels and weight matrices only; biases and norm scales stay free.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _adam_with_l2(
    learning_rate: jax.Array, weight_decay: jax.Array
) -> optax.GradientTransformation:
    # "adam": L2 regularisation, `weight_decay * p` added to the gradient before Adam.
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_decay_mask),
        optax.adam(learning_rate, b1=_ADAM_B1, b2=_ADAM_B2, eps=_ADAM_EPS),
    )


def _adamw(learning_rate: jax.Array, weight_decay: jax.Array) -> optax.GradientTransformation:
    # "adamw": decoupled decay, `weight_decay * p` added to Adam's update.
    return optax.adamw(
        learning_rate,
        b1=_ADAM_B1,
        b2=_ADAM_B2,
        eps=_ADAM_EPS,
        weight_decay=weight_decay,
        mask=_decay_mask,
    )


_OPTIMIZERS = {"adam": _adam_with_l2, "adamw": _adamw}


def make_optimizer(name: str) -> optax.GradientTransformationExtraArgs:
    """The optax optimizer `name`, with a traced learning rate and weight decay.

    `optax.inject_hyperparams` keeps both in the optimizer state
    (`opt_state.hyperparams["learning_rate" | "weight_decay"]`); the train step writes the
    scheduled learning rate and `Hyper.weight_decay` there before every update, so the
    values given here (0.0) are placeholders and one compiled step serves every trial.
    Weight decay applies to parameters with ndim > 1 (kernels, weight matrices).

    Args:
        name: "adam" (decay as L2 on the gradient: `optax.add_decayed_weights` chained
            before `optax.adam`) or "adamw" (decoupled: `optax.adamw`).

    Returns:
        An `optax.GradientTransformationExtraArgs`.

    Example:
        >>> tx = make_optimizer("adamw")
        >>> opt_state = tx.init(params)
        >>> opt_state.hyperparams["learning_rate"] = jnp.float32(1e-3)
        >>> updates, opt_state = tx.update(grads, opt_state, params)
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(_OPTIMIZERS)}, got {name!r}")
    return optax.inject_hyperparams(_OPTIMIZERS[name], hyperparam_dtype=jnp.float32)(
        learning_rate=0.0, weight_decay=0.0
    )


def _train_step(
    state: TrainState,
    batch: Batch,
    hyper: Hyper,
    *,
    graphdef: nnx.GraphDef,
    settings: StepSettings,
) -> tuple[TrainState, dict[str, jax.Array]]:
    images = batch["image"].astype(settings.compute_dtype)
    labels = batch["label"]
    step_key = jax.random.fold_in(jax.random.wrap_key_data(hyper.rng_key), state.step)

    def loss_fn(params, model_state):
        # Fresh Variable objects at this trace level: BatchNorm updates its statistics in
        # place, which NNX only allows on Variables created inside the current trace.
        model_state = jax.tree.map(lambda x: x, model_state)
        model = nnx.merge(graphdef, params, model_state)
        # Dropout masks depend on (root key, step) only, so a resumed run draws the same
        # masks; a model without a "dropout" stream is left untouched.
        nnx.reseed(model, dropout=step_key)
        logits = model(images)
        loss = weighted_cross_entropy(logits, labels, hyper.class_weights)
        return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state
    )
    lr = scheduled_learning_rate(state.step, hyper, state.lr_scale, settings.schedule)
    opt_state = state.opt_state._replace(
        hyperparams={"learning_rate": lr, "weight_decay": hyper.weight_decay}
    )
    updates, opt_state = make_optimizer(settings.optimizer).update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)  # of the loss alone, before any weight decay
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


def _eval_step(
    params: nnx.State,
    model_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    settings: StepSettings,
) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, params, model_state)
    logits_BxK = model(batch["image"].astype(settings.compute_dtype)).astype(jnp.float32)
    labels_B = batch["label"]
    mask_B = batch["mask"]
    num_classes = logits_BxK.shape[-1]
    predicted_BxK = jax.nn.one_hot(jnp.argmax(logits_BxK, -1), num_classes, dtype=jnp.int32)
    true_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.int32) * mask_B[:, None]
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
    return {
        "confusion": true_BxK.T @ predicted_BxK,
        "loss_sum": jnp.sum(jnp.where(mask_B, ce_B, 0.0)),
    }


def _predict(
    params: nnx.State,
    model_state: nnx.State,
    images_BxHxWxC: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    settings: StepSettings,
) -> jax.Array:
    model = nnx.merge(graphdef, params, model_state)
    logits = model(images_BxHxWxC.astype(settings.compute_dtype)).astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def _batch_norms(model: nnx.Module) -> list[nnx.BatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def _batch_moments(
    params: nnx.State,
    model_state: nnx.State,
    images_BxHxWxC: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    settings: StepSettings,
) -> list[tuple[jax.Array, jax.Array]]:
    # `graphdef` is in train mode with BatchNorm momentum 0, so after one forward pass every
    # BatchNorm's statistics are exactly this batch's mean and (biased) variance.
    model_state = jax.tree.map(lambda x: x, model_state)
    model = nnx.merge(graphdef, params, model_state)
    model(images_BxHxWxC.astype(settings.compute_dtype))
    return [(bn.mean[...], bn.var[...] + jnp.square(bn.mean[...])) for bn in _batch_norms(model)]


def _signature(*args: Any) -> Hashable:
    return tuple(
        (path, leaf.shape, str(leaf.dtype), getattr(leaf, "sharding", None))
        for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]
    )


@dataclasses.dataclass
class StepFunctions:
    """Jitted steps of one model graph, plus their compiled executables per signature.

    Attributes:
        graphdef_train: static graph in train mode (BatchNorm uses batch statistics).
        graphdef_eval: static graph in eval mode (running statistics).
        settings: the static settings.
        mesh: the data-parallel mesh the steps are sharded over.
        train_step: jitted `(TrainState, batch, Hyper) -> (TrainState, metrics)`,
            the state donated. `batch` is {"image": BxHxWxC, "label": int32 B}.
        eval_step: jitted `(params, model_state, batch) -> {"confusion": int32 KxK,
            "loss_sum": float32}`; `batch` also carries "mask": bool B.
        predict: jitted `(params, model_state, images_BxHxWxC) -> probabilities_BxK`.
        batch_moments: jitted `(params, model_state, images_BxHxWxC) -> [(mean, mean of
            squares)]`, one pair per BatchNorm in module order (see `calibrate_batch_norm`).
    """

    graphdef_train: nnx.GraphDef
    graphdef_eval: nnx.GraphDef
    settings: StepSettings
    mesh: Mesh
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    predict: Callable[..., Any]
    batch_moments: Callable[..., Any]
    _compiled: dict[Hashable, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_model(
        cls, model: nnx.Module, *, key: Hashable, settings: StepSettings, mesh: Mesh
    ) -> StepFunctions:
        """The step functions of `model`'s graph, memoised per (key, settings, mesh) (LRU).

        Args:
            model: a model built from the spec whose hash is `key` (its values are
                not used; only its graph).
            key: identifies the graph, e.g. `spec.content_hash()`.
            settings: static settings.
            mesh: the data-parallel mesh.
        """
        return cls.for_builder(lambda: model, key=key, settings=settings, mesh=mesh)

    @classmethod
    def for_builder(
        cls,
        build: Callable[[], nnx.Module],
        *,
        key: Hashable,
        settings: StepSettings,
        mesh: Mesh,
    ) -> StepFunctions:
        """`for_model` of the model `build()` returns, called only when the functions are
        not memoised yet (e.g. an `nnx.eval_shape` of a network, which costs a trace)."""
        cache_key = (key, settings, tuple(mesh.devices.flat), mesh.axis_names)
        cached = _STEP_CACHE.get(cache_key)
        if cached is not None:
            _STEP_CACHE.move_to_end(cache_key)
            return cached
        model = build()
        model.train()
        graphdef_train = nnx.graphdef(model)
        momenta = [bn.momentum for bn in _batch_norms(model)]
        for bn in _batch_norms(model):
            bn.momentum = 0.0
        graphdef_moments = nnx.graphdef(model)
        for bn, momentum in zip(_batch_norms(model), momenta, strict=True):
            bn.momentum = momentum
        model.eval()
        graphdef_eval = nnx.graphdef(model)
        replicated = parallel.replicated(mesh)
        batch = parallel.batch_sharding(mesh)
        fns = cls(
            graphdef_train=graphdef_train,
            graphdef_eval=graphdef_eval,
            settings=settings,
            mesh=mesh,
            train_step=jax.jit(
                functools.partial(_train_step, graphdef=graphdef_train, settings=settings),
                in_shardings=(replicated, batch, replicated),
                out_shardings=(replicated, replicated),
                donate_argnums=0,
            ),
            eval_step=jax.jit(
                functools.partial(_eval_step, graphdef=graphdef_eval, settings=settings),
                in_shardings=(replicated, replicated, batch),
                out_shardings=replicated,
            ),
            predict=jax.jit(
                functools.partial(_predict, graphdef=graphdef_eval, settings=settings),
                in_shardings=(replicated, replicated, batch),
                out_shardings=replicated,
            ),
            batch_moments=jax.jit(
                functools.partial(_batch_moments, graphdef=graphdef_moments, settings=settings),
                in_shardings=(replicated, replicated, batch),
                out_shardings=replicated,
            ),
        )
        _STEP_CACHE[cache_key] = fns
        while len(_STEP_CACHE) > STEP_CACHE_SIZE:  # a long search sees many designs
            _STEP_CACHE.popitem(last=False)
        return fns

    def init_state(self, model: nnx.Module) -> TrainState:
        """A fresh train state from `model`'s current values, replicated over the mesh."""
        params = nnx.state(model, nnx.Param)
        model_state = nnx.state(model, nnx.Not(nnx.Param))
        state = TrainState(
            step=jnp.int32(0),
            params=params,
            model_state=model_state,
            opt_state=make_optimizer(self.settings.optimizer).init(params),
            lr_scale=jnp.float32(1.0),
        )
        # A copy, so donating the state never invalidates the live `model`.
        return jax.device_put(state, parallel.replicated(self.mesh), may_alias=False)

    def calibrate_batch_norm(
        self, params: nnx.State, model_state: nnx.State, images: Iterable[jax.Array]
    ) -> nnx.State:
        """`model_state` with BatchNorm statistics re-estimated under `params` ("precise BN").

        The running averages of a short run lag its weights; this replaces them with the
        mean and variance over all of `images` (batches of equal size), computed in train
        mode with the current weights, layer after layer as the forward pass sees them.

        Args:
            params: the weights.
            model_state: the state whose BatchNorm statistics are replaced (not modified).
            images: batches, BxHxWxC each, sharded over the mesh's batch axis.

        Returns:
            The new model state; a model without BatchNorm gets `model_state` back.
        """
        model = nnx.merge(self.graphdef_eval, params, jax.tree.map(lambda x: x, model_state))
        norms = _batch_norms(model)
        if not norms:
            return model_state
        sums, count = None, 0
        for batch_images in images:
            moments_fn, _ = self.compile_moments(params, model_state, batch_images)
            moments = moments_fn(params, model_state, batch_images)
            sums = moments if sums is None else jax.tree.map(jnp.add, sums, moments)
            count += 1
        if sums is None:
            raise ValueError("calibrate_batch_norm: no batches given")
        for bn, (total, total_sq) in zip(norms, sums, strict=True):
            mean = total / count
            bn.mean[...] = mean
            bn.var[...] = jnp.maximum(total_sq / count - jnp.square(mean), 0.0)
        return jax.device_put(nnx.state(model, nnx.Not(nnx.Param)), parallel.replicated(self.mesh))

    def abstract_state(self, model: nnx.Module) -> TrainState:
        """The train state's shapes, dtypes and shardings (an Orbax restore target)."""
        replicated = parallel.replicated(self.mesh)
        shapes = jax.eval_shape(lambda: self.init_state(model))
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
        )

    def compile_train(
        self, state: TrainState, batch: Batch, hyper: Hyper
    ) -> tuple[Callable[..., Any], float]:
        """The compiled train step for these argument signatures.

        Returns:
            (executable, seconds spent compiling now: 0.0 when memoised in this process).
        """
        return self._compile("train", self.train_step, state, batch, hyper)

    def compile_eval(
        self, params: nnx.State, model_state: nnx.State, batch: Batch
    ) -> tuple[Callable[..., Any], float]:
        """The compiled eval step for these argument signatures (see `compile_train`)."""
        return self._compile("eval", self.eval_step, params, model_state, batch)

    def compile_moments(
        self, params: nnx.State, model_state: nnx.State, images: jax.Array
    ) -> tuple[Callable[..., Any], float]:
        """The compiled `batch_moments` for these argument signatures (see `compile_train`)."""
        return self._compile("moments", self.batch_moments, params, model_state, images)

    def _compile(self, kind: str, fn: Any, *args: Any) -> tuple[Callable[..., Any], float]:
        key = (kind, _signature(*args))
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled, 0.0
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        self._compiled[key] = compiled
        return compiled, time.perf_counter() - start


STEP_CACHE_SIZE = 32
"""Designs whose compiled steps are kept per process (least recently used go first)."""
_STEP_CACHE: collections.OrderedDict[Hashable, StepFunctions] = collections.OrderedDict()
