"""A whole search driven from Python with a block kind and a strategy the user registered:
no YAML, real JAX training, the user's strategy proposing and the user's block trained."""

from __future__ import annotations

import jax.numpy as jnp
import optuna
import pytest
from flax import nnx

import search
from covidnet_jax.arch import spec_from_json
from covidnet_jax.block_registry import register_block
from covidnet_jax.blocks import PEPX
from covidnet_jax.config import DataConfig, LoopConfig, ModelConfig, TrainConfig
from covidnet_jax.cost import LayerCost, count_pepx_module
from covidnet_jax.data.pipeline import SynthConfig
from search.config import (
    BudgetConfig,
    ConfirmConfig,
    RequirementsConfig,
    SearchSettings,
    SpaceConfig,
    StrategyConfig,
)


class GatedPEPX(nnx.Module):
    """A user's block: PEPX whose output is multiplied by one learned scalar gate."""

    def __init__(self, in_channels, spec, *, stride, layers, rngs):
        self.pepx = PEPX(in_channels, spec, stride=stride, layers=layers, rngs=rngs)
        self.gate = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x_BxHxWxC):
        return self.pepx(x_BxHxWxC) * self.gate[...]


def count_gated_pepx(counter, prefix, spec, *, stride, merge):
    count_pepx_module(counter, f"{prefix}.pepx", spec, stride=stride, merge=merge)
    h, w, c = counter.shape
    counter.add(LayerCost(f"{prefix}.gate", "scale", (h, w, c), 1, 0, h * w * c, h * w * c))


register_block("test_gated_pepx", build=GatedPEPX, count=count_gated_pepx, replace=True)

PROPOSALS: list[int] = []


def gated_everywhere(ctx: search.StrategyContext) -> optuna.samplers.BaseSampler:
    """A user's strategy: random designs, but every module of the user's kind."""
    fixed = {
        g.name: g.choices.index("test_gated_pepx")
        for g in ctx.space.genes
        if g.name.endswith(".kind")
    }
    PROPOSALS.append(ctx.trial_seed)
    return optuna.samplers.PartialFixedSampler(
        fixed, optuna.samplers.RandomSampler(seed=ctx.trial_seed)
    )


search.register_strategy("test_gated_everywhere", gated_everywhere, replace=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_python_search_with_a_users_block_and_strategy(tmp_path):
    training = TrainConfig(
        model=ModelConfig(arch="tiny"),
        data=DataConfig(
            covidx_dir=str(tmp_path / "data"),
            synth=SynthConfig(per_class=24, image_size=32),
            resolution=32,
            validation_fraction=0.25,
            augment=False,
        ),
        train=LoopConfig(steps=2, batch_size=8, eval_every=2, log_every=2, select="last"),
    )
    settings = SearchSettings(
        space=SpaceConfig(prototype="tiny", block_kinds=("pepx", "test_gated_pepx")),
        requirements=RequirementsConfig(max_macs=2.0e6, min_accuracy=0.0),
        strategy=StrategyConfig(name="test_gated_everywhere"),
        budget=BudgetConfig(max_trials=2, rungs=(2,), final_steps=2, max_wall_time_s=300),
        confirm=ConfirmConfig(seeds=0),
    )
    PROPOSALS.clear()
    result = search.run(search.SearchExperiment(training, settings), tmp_path / "run")

    assert len(PROPOSALS) >= 2, "the user's strategy built the trials' samplers"
    trained = [r for r in result.records if r.is_trained]
    assert trained
    for record in trained:
        kinds = {m.kind for s in spec_from_json(record.spec_json).stages for m in s.modules}
        assert kinds == {"test_gated_pepx"}, kinds
    assert result.best is not None and result.best.summary is not None
    declared = spec_from_json((result.artifact_dir / "best" / "spec.json").read_text())
    assert {m.kind for s in declared.stages for m in s.modules} == {"test_gated_pepx"}
