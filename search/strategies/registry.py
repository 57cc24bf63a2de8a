"""The strategies a search can name (`search.strategy.name`), and how to add one.

A strategy is a factory that builds an Optuna sampler for one trial from a `StrategyContext`.
The built-in ones (random, tpe, nsga2 from Optuna; evolution and shrink, written here as
`GenomeSampler`s) are registered below through the same public path a user takes:

    >>> import optuna
    >>> from search.strategies.registry import register_strategy
    >>> register_strategy("qmc", lambda ctx: optuna.samplers.QMCSampler(seed=ctx.trial_seed))

Any Optuna `BaseSampler` works. To propose whole designs from the trial records (with a parent
and an operator), subclass `search.strategies.genome.GenomeSampler` and implement `propose`.

The factory travels to the search's worker processes inside the job (pickled by reference),
so it must be importable there: a module-level function or class (one defined at the top of
the script that starts the search works too; a lambda works only with one worker).
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.samplers import BaseSampler

from covidnet_jax.errors import ConfigError
from search.strategies.context import StrategyContext
from search.strategies.evolution import EvolutionSampler
from search.strategies.shrink import ShrinkSampler

StrategyFactory = Callable[[StrategyContext], BaseSampler]

_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> None:
    """Makes `name` a strategy the search config can name.

    Args:
        name: the `search.strategy.name` value.
        factory: builds the trial's sampler from a `StrategyContext`.
        replace: allow replacing a registered strategy of the same name.

    Raises:
        ValueError: `name` is registered already (and `replace` is false), or is empty.
    """
    if not name or not name.strip():
        raise ValueError("register_strategy: expected a non-empty name")
    if name in _STRATEGIES and not replace:
        raise ValueError(
            f"register_strategy: {name!r} is registered already (pass replace=True to replace it)"
        )
    _STRATEGIES[name] = factory


def registered_strategies() -> tuple[str, ...]:
    """The registered strategy names, sorted."""
    return tuple(sorted(_STRATEGIES))


def strategy_factory(name: str) -> StrategyFactory:
    """The factory registered as `name`.

    Raises:
        ConfigError: no strategy is registered under that name (the message lists them).
    """
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"search.strategy.name: unknown strategy {name!r}; registered: "
            f"{', '.join(registered_strategies())} (add one with "
            "search.strategies.registry.register_strategy)"
        ) from None


def _random(ctx: StrategyContext) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=ctx.trial_seed)


def _tpe(ctx: StrategyContext) -> BaseSampler:
    return optuna.samplers.TPESampler(
        seed=ctx.trial_seed,
        n_startup_trials=ctx.strategy.startup_trials,
        multivariate=True,
        constant_liar=True,
    )


def _nsga2(ctx: StrategyContext) -> BaseSampler:
    return optuna.samplers.NSGAIISampler(
        seed=ctx.trial_seed, population_size=ctx.strategy.population_size
    )


def _evolution(ctx: StrategyContext) -> BaseSampler:
    return EvolutionSampler(ctx)


def _shrink(ctx: StrategyContext) -> BaseSampler:
    return ShrinkSampler(ctx)


for _name, _factory in (
    ("random", _random),
    ("tpe", _tpe),
    ("nsga2", _nsga2),
    ("evolution", _evolution),
    ("shrink", _shrink),
):
    register_strategy(_name, _factory)
