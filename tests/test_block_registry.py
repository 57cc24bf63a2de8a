"""Bring your own block: registered kinds build, count their cost exactly and are searched."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from search_support import fast_tmp, run, settings

from covidnet_jax import block_registry, parallel, presets
from covidnet_jax.arch import ArchSpec, ModuleSpec, spec_from_json
from covidnet_jax.block_registry import block_kind, register_block, registered_blocks
from covidnet_jax.blocks import PEPX, LayerConfig
from covidnet_jax.cost import count_cost, count_pepx_module
from covidnet_jax.errors import ConfigError, SpecError
from covidnet_jax.models import build_model
from covidnet_jax.se_pepx import SePEPX, SqueezeExcite, se_channels
from covidnet_jax.shared_widths import HostRegistry, skeleton_of
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings
from search.config import SpaceConfig
from search.strategies.space import SearchSpace

__all__ = ["fast_tmp"]


def _with_kind(spec: ArchSpec, kind: str, **options) -> ArchSpec:
    """`spec` with every module of `kind` (widths and kernels kept)."""
    return dataclasses.replace(
        spec,
        stages=tuple(
            dataclasses.replace(
                stage,
                modules=tuple(
                    dataclasses.replace(m, kind=kind, options=options) for m in stage.modules
                ),
            )
            for stage in spec.stages
        ),
    )


TINY = presets.get_preset("tiny")
SE_TINY = _with_kind(TINY, "se_pepx")


def _param_count(model) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _xla_flops(module, input_shape) -> float:
    graphdef, state = nnx.split(module)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


# Registry ---------------------------------------------------------------------------------


def test_the_built_in_kinds_are_registered():
    assert {"pepx", "se_pepx"} <= set(registered_blocks())
    assert block_kind("pepx").build is PEPX
    assert block_kind("se_pepx").fields == {"se_ratio": 4}


def test_an_unknown_kind_lists_what_is_registered():
    with pytest.raises(SpecError) as err:
        ModuleSpec(4, 8, 4, 8, kind="mbconv")
    message = str(err.value)
    assert message.startswith("kind: unknown block kind 'mbconv'; registered: ")
    assert "pepx, se_pepx" in message
    assert "\n" not in message
    data = json.loads(TINY.to_json())
    data["stages"][1]["modules"][0]["kind"] = "mbconv"
    with pytest.raises(SpecError, match=r"^stages\[1\]\.modules\[0\]\.kind: unknown block kind"):
        spec_from_json(json.dumps(data))


def test_an_unknown_kind_in_the_search_space_is_refused_naming_the_key(fast_tmp):
    data = settings(**{"space.block_kinds": ["pepx", "mbconv"]})
    with pytest.raises(ConfigError) as err:
        run(fast_tmp, "unknown", data)
    assert re.match(
        r"search\.space\.block_kinds\[1\]: unknown block kind 'mbconv'; registered: .*se_pepx",
        str(err.value),
    )


def test_a_kind_is_registered_once_unless_replaced():
    with pytest.raises(ValueError, match="'se_pepx' is registered already"):
        register_block("se_pepx", build=SePEPX, count=count_pepx_module)
    try:
        register_block("twin", build=PEPX, count=count_pepx_module)
        register_block("twin", build=PEPX, count=count_pepx_module, replace=True)
        with pytest.raises(ValueError, match=r"field 'ratio' of 'bad'.*got 'x'"):
            register_block("bad", build=PEPX, count=count_pepx_module, fields={"ratio": "x"})
        with pytest.raises(ValueError, match="expected a name of letters"):
            register_block("no spaces", build=PEPX, count=count_pepx_module)
    finally:
        block_registry._BLOCKS.pop("twin", None)


def test_options_are_checked_and_filled_with_the_defaults():
    module = ModuleSpec(4, 8, 4, 8, kind="se_pepx")
    assert module.options == {"se_ratio": 4}
    assert module == ModuleSpec(4, 8, 4, 8, kind="se_pepx", options={"se_ratio": 4})
    assert hash(module) == hash(ModuleSpec(4, 8, 4, 8, kind="se_pepx", options={"se_ratio": 4}))
    with pytest.raises(SpecError, match=r"^options\.se_ratio: expected an int in \[1, 1024\]"):
        ModuleSpec(4, 8, 4, 8, kind="se_pepx", options={"se_ratio": 0})
    with pytest.raises(SpecError, match=r"^options\.ratio: not a field of block kind 'se_pepx'"):
        ModuleSpec(4, 8, 4, 8, kind="se_pepx", options={"ratio": 2})
    with pytest.raises(SpecError, match=r"^options\.se_ratio: not a field of block kind 'pepx'"):
        ModuleSpec(4, 8, 4, 8, options={"se_ratio": 2})


# JSON and hashes --------------------------------------------------------------------------


def test_pepx_modules_serialize_as_before_kinds_existed():
    data = json.loads(TINY.to_json())
    for stage in data["stages"]:
        for module in stage["modules"]:
            assert set(module) == {"proj1", "expand", "proj2", "out", "kernel_size"}
    assert TINY.content_hash() == "27dde3ba9d6ec30e"  # as tests/test_arch.py pins it


def test_se_pepx_round_trips_through_json_with_its_kind_and_options():
    spec = _with_kind(TINY, "se_pepx", se_ratio=2)
    data = json.loads(spec.to_json())
    assert data["stages"][0]["modules"][0]["kind"] == "se_pepx"
    assert data["stages"][0]["modules"][0]["options"] == {"se_ratio": 2}
    assert spec_from_json(spec.to_json()) == spec
    assert spec.content_hash() not in (TINY.content_hash(), SE_TINY.content_hash())
    assert "se_pepx(se_ratio=2):" in spec.summary()


# Build, cost, training --------------------------------------------------------------------


def test_se_pepx_builds_and_its_params_match_the_analytic_count():
    model = build_model(SE_TINY, rngs=nnx.Rngs(0))
    block = model.stages[0].modules[0]
    assert isinstance(block, SePEPX)
    assert model(jnp.ones((2, 32, 32, 3))).shape == (2, 3)
    assert block(jnp.ones((2, 16, 16, 8))).shape == (2, 16, 16, 16)
    report = count_cost(SE_TINY)
    assert _param_count(model) == report.params
    # Every SE gate adds 2 * C * C/ratio multiply-adds to the PEPX network's.
    gates = [m.out * se_channels(m) for stage in SE_TINY.stages for m in stage.modules]
    assert report.macs == count_cost(TINY).macs + 2 * sum(gates)
    for layer in report.layers:
        if ".se." in layer.name:
            node = model
            for part in layer.name.split("."):
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            assert node.kernel.shape[-1] == layer.output_shape[-1], layer.name


@pytest.mark.parametrize(("channels", "ratio", "activation"), [(16, 4, "relu"), (20, 3, "silu")])
def test_the_gate_alone_costs_exactly_what_xla_counts(channels, ratio, activation):
    spec = ArchSpec(
        input_size=10,
        stem=presets.get_preset("tiny").stem,
        stages=TINY.stages[:1],
        connectivity="none",  # no merge addition counted on the gate
        activation=activation,
    )
    module = ModuleSpec(4, 8, 4, channels, kind="se_pepx", options={"se_ratio": ratio})
    spec = dataclasses.replace(
        spec, stages=(dataclasses.replace(spec.stages[0], modules=(module,)),)
    )
    layers = {layer.name: layer for layer in count_cost(spec).layers}
    reduce, restore = (
        layers["stages.0.modules.0.se.reduce"],
        layers["stages.0.modules.0.se.restore"],
    )
    gate = SqueezeExcite(
        channels, se_channels(module), layers=LayerConfig(activation=activation), rngs=nnx.Rngs(0)
    )
    h, w, _ = layers["stages.0.modules.0.pepx.extend"].output_shape
    assert _xla_flops(gate, (1, h, w, channels)) == reduce.flops + restore.flops
    assert reduce.macs + restore.macs == 2 * channels * se_channels(module)
    assert _param_count(gate) == reduce.params + restore.params


@pytest.mark.parametrize("connectivity", ["dense", "residual", "none"])
def test_se_network_flops_agree_with_xla(connectivity):
    """Within 8%, as `test_cost.test_analytic_cost_matches_built_model_and_xla` allows."""
    spec = dataclasses.replace(SE_TINY, connectivity=connectivity)
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    report = count_cost(spec)
    assert _param_count(model) == report.params
    assert _xla_flops(model, (1, 32, 32, 3)) == pytest.approx(report.flops, rel=0.08)


def test_se_pepx_trains_a_step():
    model = build_model(SE_TINY, rngs=nnx.Rngs(0))
    mesh = parallel.make_mesh()
    fns = StepFunctions.for_model(model, key="se", settings=StepSettings(), mesh=mesh)
    state = fns.init_state(model)
    before = _se_params(state)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(
        {
            "image": rng.random((4, 32, 32, 3), dtype=np.float32),
            "label": rng.integers(0, 3, 4).astype(np.int32),
        },
        mesh,
    )
    hyper = Hyper.create(learning_rate=0.01, weight_decay=0.0, class_weights=np.ones(3), seed=0)
    state, metrics = fns.train_step(state, batch, hyper)
    assert bool(metrics["finite"])
    after = _se_params(state)
    assert len(before) == 4 * 3  # reduce and restore kernel and bias, 3 modules
    assert all(not np.allclose(before[k], after[k]) for k in before)


def _se_params(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in leaves
        if "'se'" in jax.tree_util.keystr(path)
    }


def test_shared_executables_refuse_other_kinds_and_fall_back_to_exact():
    skeleton_of(TINY)
    with pytest.raises(SpecError, match=r"^stages\[0\]\.modules\[0\]\.kind: shared executables"):
        skeleton_of(SE_TINY)
    assert HostRegistry().host_for(SE_TINY) is None  # shared/auto: its own executable


# Search -----------------------------------------------------------------------------------


def test_the_default_space_has_no_kind_genes_and_keeps_the_prototypes_kinds(fast_tmp):
    records, _ = run(fast_tmp, "plain", settings(**{"budget.max_trials": 3}))
    assert not any(name.endswith(".kind") for r in records for name in r.params)


def test_a_search_over_pepx_and_se_pepx_proposes_and_trains_both(fast_tmp):
    data = settings(
        **{"space.block_kinds": ["pepx", "se_pepx"], "strategy.name": "random"},
        **{"budget.max_trials": 12},
    )
    records, _ = run(fast_tmp, "kinds", data)
    trained = [r for r in records if r.is_proposal and r.status == "trained"]
    kinds = [
        {m.kind for stage in spec_from_json(r.spec_json).stages for m in stage.modules}
        for r in trained
    ]
    assert any("se_pepx" in k for k in kinds) and any("pepx" in k for k in kinds)
    ratios = {
        m.options["se_ratio"]
        for r in trained
        for stage in spec_from_json(r.spec_json).stages
        for m in stage.modules
        if m.kind == "se_pepx"
    }
    assert len(ratios) > 1  # the se_ratio genes are searched too
    assert any(name.endswith(".kind") for name in trained[0].params)


def test_a_kinds_fields_are_genes_active_only_where_the_module_is_of_that_kind():
    config = SpaceConfig(prototype="tiny", block_kinds=("pepx", "se_pepx"))
    space = SearchSpace(config, TINY)
    names = [g.name for g in space.genes]
    slots = ("s0.m0", "s0.m1", "s1.m0")
    assert names == [
        name for slot in slots for name in (f"{slot}.kind", f"{slot}.se_pepx.se_ratio")
    ]
    genome = space.prototype_genome()
    assert space.decode(genome) == TINY
    assert genome["s0.m0.se_pepx.se_ratio"] == 1  # the default, 4, among (2, 4, 8)
    assert space.describe(genome)["s0.m0.se_pepx.se_ratio"] == "unused"
    mutated = [child for _, child in space.mutation_options(genome)]
    assert all(child["s0.m0.se_pepx.se_ratio"] == 1 for child in mutated)
    se_genome = {**genome, "s0.m0.kind": 1, "s0.m0.se_pepx.se_ratio": 0}
    module = space.decode(se_genome).stages[0].modules[0]
    assert (module.kind, module.options) == ("se_pepx", {"se_ratio": 2})
    assert space.describe(se_genome)["s0.m0.se_pepx.se_ratio"] == 2
    assert "change s0.m0.se_pepx.se_ratio" in [d for d, _ in space.mutation_options(se_genome)]
    with pytest.raises(ValueError, match=r"genes\['ratio'\] of 'bad': expected ascending"):
        register_block("bad", build=PEPX, count=count_pepx_module, genes={"ratio": (2, 4)})


def _readme_block(containing: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_the_readme_block_example_registers_a_block_that_builds_and_counts(fast_tmp):
    namespace: dict = {"__name__": "readme_block"}
    exec(compile(_readme_block("register_block("), "README.md", "exec"), namespace)
    try:
        spec = _with_kind(TINY, "scaled_pepx")
        model = build_model(spec, rngs=nnx.Rngs(0))
        assert model(jnp.ones((1, 32, 32, 3))).shape == (1, 3)
        assert _param_count(model) == count_cost(spec).params
        assert spec_from_json(spec.to_json()) == spec
        data = settings(
            **{"space.block_kinds": ["pepx", "scaled_pepx"], "strategy.name": "random"},
            **{"budget.max_trials": 6},
        )
        records, _ = run(fast_tmp, "readme", data)
        assert any("scaled_pepx" in r.spec_json for r in records if r.status == "trained")
    finally:
        block_registry._BLOCKS.pop("scaled_pepx", None)  # the block registers once
