"""Exact width masking (`covidnet_jax.shared_widths`): a narrow PEPX network trained on a
masked host network built for wider shapes equals the narrow network trained on its own,
and one compiled step serves several narrow widths.

The host runs get garbage in every surplus parameter (not the zeros `embed_train_state`
writes): the narrow computation must not depend on those values, which holds only if every
surplus channel is masked after its BatchNorm and activation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import search
from covidnet_jax import parallel
from covidnet_jax import shared_widths as sw
from covidnet_jax.arch import ArchSpec, HeadSpec, ModuleSpec, StageSpec, StemSpec, spec_from_json
from covidnet_jax.checkpointing import Checkpoints
from covidnet_jax.errors import SpecError
from covidnet_jax.evaluate import evaluate_workdir
from covidnet_jax.models import build_model
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings
from search.execution.evaluation import EvalRequest, EvalSuccess
from search.execution.training import TrainingEvaluator, load_experiment, load_prototype

BATCH = 4
STEPS = 20


def _spec(stem, modules, *, stride=1, kernel=3, connectivity="residual", **kw) -> ArchSpec:
    """A 32 px net: stem (stride 2, no pool), then stages of (proj1, expand, proj2, out)."""
    stages = modules if isinstance(modules[0][0], tuple) else (modules,)
    strides = (stride,) if len(stages) == 1 else (stride,) + (2,) * (len(stages) - 1)
    return ArchSpec(
        input_size=32,
        stem=StemSpec(channels=stem, kernel_size=3, stride=2, pool_size=0),
        stages=tuple(
            StageSpec(s, tuple(ModuleSpec(*m, kernel_size=kernel) for m in stage))
            for s, stage in zip(strides, stages, strict=True)
        ),
        connectivity=connectivity,
        **kw,
    )


def _batches(seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.random((BATCH, 32, 32, 3), dtype=np.float32),
            "label": rng.integers(0, 3, BATCH).astype(np.int32),
        }
        for _ in range(steps)
    ]


def _hyper(**kw):
    args = {"learning_rate": 3e-3, "weight_decay": 1e-3, "class_weights": np.ones(3), "seed": 0}
    return Hyper.create(**(args | kw))


def _with_garbage(params, layout, seed):
    """`params` (host layout, narrow values) with random values in every surplus entry."""
    narrow_ones = jax.tree.map(jnp.ones_like, sw.slice_arrays(params, layout))
    inside = sw.embed_arrays(narrow_ones, layout)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        p + (1 - m) * jax.random.normal(k, p.shape, p.dtype)
        for p, m, k in zip(leaves, jax.tree.leaves(inside), keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


class Pair:
    """A narrow spec's own steps and a host's steps, with states built from one init."""

    def __init__(self, narrow, host, settings=None, garbage=True):
        settings = StepSettings() if settings is None else settings
        self.mesh = parallel.make_mesh()
        self.layout = sw.width_layout(narrow, host)
        narrow_model = build_model(narrow, rngs=nnx.Rngs(0))
        host_model = sw.build_host_model(host, self.layout.skeleton, rngs=nnx.Rngs(1))
        self.narrow_fns = StepFunctions.for_model(
            narrow_model, key=("narrow", narrow.content_hash()), settings=settings, mesh=self.mesh
        )
        self.host_fns = StepFunctions.for_model(
            host_model,
            key=("host", self.layout.skeleton.key, host),
            settings=settings,
            mesh=self.mesh,
        )
        self.narrow_state = self.narrow_fns.init_state(narrow_model)
        host_state = sw.embed_train_state(self.narrow_state, self.layout)
        if garbage:
            host_state = host_state.replace(params=_with_garbage(host_state.params, self.layout, 7))
        self.host_state = self._put(host_state)

    def _put(self, state):
        return jax.device_put(state, parallel.replicated(self.mesh))

    def train(self, batches, hyper):
        losses = []
        for batch in batches:
            batch = parallel.shard_batch(batch, self.mesh)
            self.narrow_state, narrow_metrics = self.narrow_fns.train_step(
                self.narrow_state, batch, hyper
            )
            self.host_state, host_metrics = self.host_fns.train_step(self.host_state, batch, hyper)
            losses.append((float(narrow_metrics["loss"]), float(host_metrics["loss"])))
        return np.asarray(losses)


def _assert_trees_close(actual, expected, *, rtol=2e-4, atol=2e-5):
    actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    expected_leaves = jax.tree.leaves(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(actual_leaves, expected_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# One stage of one module, to keep compiles short (the two-module wiring is checked below).
# Stages feeding only BatchNorm'd convs are avoided here: a bias before them has an exact
# gradient of zero (BatchNorm removes any per-channel shift), and Adam turns the float noise
# in it into full-size steps that differ between any two programs (the narrow program against
# itself with 1e-7 perturbed weights too), so those are checked on one step's gradients.
@pytest.mark.parametrize("connectivity", ["dense", "residual", "none"])
@pytest.mark.parametrize(("stride", "kernel"), [(1, 3), (2, 5)])
def test_masked_training_equals_the_narrow_network(connectivity, stride, kernel):
    # residual, stride 1: an identity shortcut, between different widths in this host (not
    # the elementwise maximum of candidates, as a policy rounding widths up may choose);
    # stride 2: a projection.
    shape = {"stride": stride, "kernel": kernel, "connectivity": connectivity}
    narrow = _spec(6, ((3, 8, 4, 6),), **shape)
    wide = _spec(8, ((5, 10, 6, 12),), **shape)
    assert sw.dominates(wide, narrow)
    pair = Pair(narrow, wide)
    losses = pair.train(_batches(kernel + stride), _hyper())
    np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-4)
    sliced = sw.slice_train_state(pair.host_state, pair.layout)
    # params, BatchNorm statistics, optimizer state (Adam moments, count, learning rate)
    _assert_trees_close(sliced, pair.narrow_state)


def test_multi_stage_gradients_and_statistics_match():
    # Two stages of each connectivity, lr 0: one step's Adam moments are the gradients.
    for connectivity in ("dense", "residual"):  # "none": the flatten-head test
        narrow = _spec(
            4, (((3, 6, 3, 5), (2, 5, 3, 5)), ((3, 7, 2, 6),)), connectivity=connectivity
        )
        wide = _spec(6, (((4, 8, 4, 8), (4, 8, 4, 8)), ((5, 9, 4, 9),)), connectivity=connectivity)
        pair = Pair(narrow, sw.host_spec([narrow, wide]))
        losses = pair.train(_batches(3, steps=2), _hyper(learning_rate=0.0))
        np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-5)
        _assert_trees_close(sw.slice_train_state(pair.host_state, pair.layout), pair.narrow_state)


def test_flatten_head_hidden_layers_no_norm_adamw_and_eval():
    narrow = _spec(4, (((3, 6, 3, 5),), ((3, 7, 2, 6),)), connectivity="none", norm="none",
                   head=HeadSpec("flatten", (5,)))  # fmt: skip
    wide = _spec(6, (((4, 8, 4, 8),), ((5, 9, 4, 9),)), connectivity="none", norm="none",
                 head=HeadSpec("flatten", (9,)))  # fmt: skip
    pair = Pair(narrow, sw.host_spec([narrow, wide]), StepSettings(optimizer="adamw"))
    losses = pair.train(_batches(5), _hyper(weight_decay=1e-2))
    np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-4)
    _assert_trees_close(sw.slice_train_state(pair.host_state, pair.layout), pair.narrow_state)
    batch = parallel.shard_batch(_batches(9, 1)[0] | {"mask": np.ones(BATCH, bool)}, pair.mesh)
    narrow_eval = pair.narrow_fns.eval_step(
        pair.narrow_state.params, pair.narrow_state.model_state, batch
    )
    host_eval = pair.host_fns.eval_step(pair.host_state.params, pair.host_state.model_state, batch)
    np.testing.assert_array_equal(host_eval["confusion"], narrow_eval["confusion"])
    np.testing.assert_allclose(host_eval["loss_sum"], narrow_eval["loss_sum"], rtol=1e-5)


def test_zero_padded_surplus_stays_zero_and_slicing_is_exact():
    narrow = _spec(4, ((3, 6, 3, 5), (2, 5, 3, 5)), connectivity="dense")
    wide = _spec(6, ((4, 8, 4, 8), (4, 8, 4, 8)), connectivity="dense")
    pair = Pair(narrow, sw.host_spec([narrow, wide]), garbage=False)
    embedded = sw.embed_train_state(pair.narrow_state, pair.layout)
    _assert_trees_close(
        sw.slice_train_state(embedded, pair.layout), pair.narrow_state, rtol=0, atol=0
    )
    pair.train(_batches(1, steps=5), _hyper())
    params, opt_state = pair.host_state.params, pair.host_state.opt_state
    # re-embedding the slice gives the host arrays back: every surplus entry is still 0.0
    for tree in (params, opt_state):
        again = sw.embed_arrays(sw.slice_arrays(tree, pair.layout), pair.layout)
        _assert_trees_close(again, tree, rtol=0, atol=0)


def test_one_compiled_step_serves_two_narrow_widths(fresh_step_functions):
    narrow_a = _spec(4, ((3, 6, 3, 5), (2, 5, 3, 5)), connectivity="dense")
    narrow_b = _spec(6, ((2, 8, 4, 6), (4, 4, 2, 6)), connectivity="dense")
    host = sw.host_spec([narrow_a, narrow_b])
    assert sw.dominates(host, narrow_a) and sw.dominates(host, narrow_b)
    pair_a = Pair(narrow_a, host)
    pair_b = Pair(narrow_b, host)
    assert pair_b.host_fns is pair_a.host_fns  # one graph: the skeleton and host widths
    hyper = _hyper()
    batch = parallel.shard_batch(_batches(0, 1)[0], pair_a.mesh)
    compiled_a, seconds_a = pair_a.host_fns.compile_train(pair_a.host_state, batch, hyper)
    compiled_b, seconds_b = pair_b.host_fns.compile_train(pair_b.host_state, batch, hyper)
    assert seconds_a > 0.0 and seconds_b == 0.0 and compiled_b is compiled_a
    for pair in (pair_a, pair_b):
        losses = pair.train(_batches(2, steps=3), hyper)
        np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-5)
    assert pair_a.host_fns.train_step._cache_size() == 1  # the jitted path compiled once too


def test_layout_model_states_have_the_plain_and_host_networks_structures():
    for connectivity in ("dense", "residual"):
        narrow = _spec(4, ((2, 8, 4, 8), (4, 8, 2, 8)), connectivity=connectivity)
        host = _spec(8, ((4, 16, 4, 12), (4, 12, 4, 12)), connectivity=connectivity)
        layout = sw.width_layout(narrow, host)
        plain = nnx.state(build_model(narrow, rngs=nnx.Rngs(0)), nnx.Not(nnx.Param))
        assert jax.tree.structure(layout.narrow_model_state) == jax.tree.structure(plain)
        masked_host = sw.build_host_model(host, layout.skeleton, rngs=nnx.Rngs(0))
        host_state = nnx.state(masked_host, nnx.Not(nnx.Param))
        assert jax.tree.structure(layout.host_model_state) == jax.tree.structure(host_state)


def test_skeleton_and_domination_errors():
    narrow = _spec(4, ((3, 6, 3, 5),))
    other_kernel = _spec(4, ((3, 6, 3, 5),), kernel=5)
    assert sw.skeleton_of(narrow).key != sw.skeleton_of(other_kernel).key
    assert sw.skeleton_of(narrow) == sw.skeleton_of(_spec(5, ((2, 9, 4, 7),)))
    # widths that turn a residual identity into a projection change the skeleton
    assert sw.skeleton_of(narrow) != sw.skeleton_of(_spec(5, ((3, 6, 3, 5),)))
    with pytest.raises(SpecError, match="one skeleton"):
        sw.host_spec([narrow, other_kernel])
    with pytest.raises(SpecError, match="does not dominate"):
        sw.width_layout(_spec(5, ((2, 9, 4, 7),)), narrow)
    with pytest.raises(SpecError, match=r"head\.dropout"):
        sw.skeleton_of(dataclasses.replace(narrow, head=HeadSpec(dropout=0.5)))
    with pytest.raises(ValueError, match=r"stem/conv/kernel: expected shape"):
        layout = sw.width_layout(narrow, sw.host_spec([narrow, _spec(6, ((4, 8, 4, 7),))]))
        sw.embed_arrays({"stem": {"conv": {"kernel": jnp.zeros((3, 3, 3, 9))}}}, layout)


def test_host_registry_grows_hosts_per_skeleton():
    wide = _spec(8, ((4, 16, 4, 8),))
    narrow, wider_inside = _spec(8, ((2, 8, 4, 8),)), _spec(8, ((6, 8, 4, 8),))
    hosts = sw.HostRegistry(seeds=[wide])
    assert hosts.host_for(narrow) == wide  # the seed dominates it
    assert hosts.host_for(wider_inside) == _spec(8, ((6, 16, 4, 8),))  # grown: the max
    assert hosts.host_for(narrow) == _spec(8, ((6, 16, 4, 8),))
    other = _spec(8, ((2, 8, 4, 8),), kernel=5)
    assert hosts.host_for(other) == other  # another skeleton: its own host
    assert hosts.host_for(dataclasses.replace(other, head=HeadSpec(dropout=0.1))) is None


# -- candidate training and the search on shared executables ------------------------------

SEARCH_EXPERIMENT = """\
seed: 0
model: {{arch: {prototype}}}
data:
  covidx_dir: {data}
  synth: {{per_class: 12, image_size: 32, seed: 0}}
  resolution: 32
  channels: 3
  validation_fraction: 0.25
  augment: false
optimizer: {{name: adam, learning_rate: 0.003}}
train: {{batch_size: 8, eval_every: 2, log_every: 2, keep_checkpoints: 1, keep_best: 1,
         bn_calibration_batches: 2}}
search:
  executables: shared
  space:   # widths only: one skeleton
    stage_width: {{min: 0.5, max: 1.0, step: 0.25}}
    module_width: {{min: 0.5, max: 1.0, step: 0.25}}
  requirements: {{min_accuracy: 0.0}}
  strategy: {{name: shrink}}
  budget: {{max_trials: 4, rungs: [2]}}
"""


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """A directory for experiments that share one synthetic data set."""
    return tmp_path_factory.mktemp("shared")


def _experiment(root: Path, name: str, prototype: ArchSpec) -> Path:
    """An experiment file around `prototype` (a test that asserts a compile happened also
    takes `fresh_step_functions`: the compiled steps of a process outlive a test)."""
    (root / f"{name}.json").write_text(prototype.to_json())
    path = root / f"{name}.yaml"
    path.write_text(SEARCH_EXPERIMENT.format(prototype=root / f"{name}.json", data=root / "synth"))
    return path


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """'stages/0/modules/1/proj1/conv/kernel' -> shape, whatever the key types."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        shapes["/".join(keys[:-1] if keys[-1] == "value" else keys)] = tuple(leaf.shape)
    return shapes


def _compiles(run_dir: Path) -> list[float]:
    """Train-step compile seconds of every "compile" event of a run (0.0: memoised)."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["train_step_s"] for e in events if e["event"] == "compile"]


@pytest.mark.slow
def test_candidates_share_one_compile_and_checkpoint_their_own_network(
    shared_root, fresh_step_functions
):
    prototype = _spec(8, (((4, 16, 4, 12), (4, 12, 4, 12)),), connectivity="dense")
    experiment = load_experiment(_experiment(shared_root, "dense", prototype))
    evaluator = TrainingEvaluator.from_experiment(experiment)
    prototype = load_prototype(experiment)
    assert evaluator.hosts.host_for(prototype) == prototype  # seeded with it
    narrower = [
        _spec(6, (((4, 8, 4, 8), (2, 12, 4, 8)),), connectivity="dense"),
        _spec(4, (((2, 16, 4, 4), (4, 4, 2, 4)),), connectivity="dense"),
    ]
    root = shared_root / "runs"
    results = []
    for i, spec in enumerate([prototype, *narrower]):
        request = EvalRequest(
            spec=spec, steps=4, workdir=root / f"trials/{i}", init_from=None, rung=0
        )
        results.append(evaluator.train(request))
    assert all(isinstance(r, EvalSuccess) for r in results), results
    assert results[0].compile_s > 0.0
    assert [r.compile_s for r in results[1:]] == [0.0, 0.0]
    for i, (spec, result) in enumerate(zip([prototype, *narrower], results, strict=True)):
        run_dir = root / f"trials/{i}"
        saved = Checkpoints.open_existing(run_dir).restore_arrays()
        assert _shapes(saved["params"]) == _shapes(
            nnx.state(build_model(spec, rngs=nnx.Rngs(0)), nnx.Param)
        )
        assert not any("mask" in path for path in _shapes(saved["model_state"]))
        # the narrow checkpoint, evaluated as a plain network, gives what the host reported
        evaluated = evaluate_workdir(run_dir, split="validation", scores=False).metrics
        np.testing.assert_array_equal(evaluated.confusion, result.metrics.confusion)


@pytest.mark.slow
def test_a_shared_search_compiles_once_per_skeleton(shared_root, fresh_step_functions):
    prototype = _spec(8, (((4, 16, 4, 8), (4, 12, 4, 12)),), connectivity="residual", kernel=5)
    path = _experiment(shared_root, "residual", prototype)
    workdir = shared_root / "search_run"
    result = search.run(str(path), workdir, finish=False, workers=1)
    trained = [workdir / "trials" / str(r.number) for r in result.records if r.status == "trained"]
    compiles = [s for run_dir in trained for s in _compiles(run_dir)]
    assert len(compiles) == len(trained) >= 3
    # A residual shortcut is an identity or a projection depending on widths, so this
    # shrinking search meets several skeletons; each compiles once (`exact`: every design).
    skeletons = {
        sw.skeleton_of(spec_from_json((run_dir / "spec.json").read_text())).key
        for run_dir in trained
    }
    assert sum(s > 0.0 for s in compiles) == len(skeletons) < len(trained)
    # The setting changes how trials compile, not what they are: a resume may switch it.
    again = search.run(
        str(path), workdir, finish=False, workers=1, overrides=["search.executables=exact"]
    )
    assert len(again.records) == len(result.records)


@pytest.mark.slow
def test_an_export_of_a_design_trained_on_a_host_predicts_as_the_narrow_network(shared_root):
    from covidnet_jax import export
    from covidnet_jax.cost import count_cost
    from covidnet_jax.evaluate import load_trained, predict_batches

    prototype = _spec(8, ((4, 16, 4, 12),), stride=2, kernel=5, connectivity="dense")
    experiment = load_experiment(_experiment(shared_root, "export", prototype))
    evaluator = TrainingEvaluator.from_experiment(experiment)
    prototype = load_prototype(experiment)
    narrow = _spec(4, ((2, 8, 4, 8),), stride=2, kernel=5, connectivity="dense")
    assert evaluator.hosts.host_for(narrow) == prototype  # trains masked on the prototype
    run_dir = shared_root / "export_runs/trials/0"
    result = evaluator.train(EvalRequest(narrow, 6, run_dir, init_from=None, rung=0))
    assert isinstance(result, EvalSuccess), result

    out = export.export_training_run(run_dir, shared_root / "export_out")
    loaded = export.load_export(out)
    assert json.loads(loaded.spec_json()) == json.loads(narrow.to_json())
    cost = count_cost(narrow)
    assert (loaded.manifest["params"], loaded.manifest["macs"]) == (cost.params, cost.macs)

    trained = load_trained(run_dir)  # the checkpoint as a plain narrow network
    data = evaluator.data(narrow.input_size)
    want, labels = predict_batches(
        trained.fns, trained.params, trained.model_state, data.eval_batches("validation", 8)
    )
    images = np.concatenate(
        [b["image"][b["mask"]] for b in data.eval_batches("validation", 8)], axis=0
    )
    got = loaded.predict_batch(images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ... and both agree with what the host network reported for the trial
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (labels, got.argmax(axis=1)), 1)
    np.testing.assert_array_equal(confusion, result.metrics.confusion)
