"""`search.executables: auto`: per candidate, run padded on a compiled host or compile a new
executable (`shared_widths.choose_executable`), from measured compile and step times.

The decision function is tested on fake cost tables; the stateful policy on tiny specs (it
only counts MACs); the evaluator trains two tiny candidates under `auto`.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from covidnet_jax import shared_widths as sw
from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec, StemSpec
from covidnet_jax.errors import ConfigError
from covidnet_jax.train import TrainFailure
from search.config import SearchSettings, SpaceConfig
from search.execution import training
from search.execution.evaluation import EvalFailure, EvalRequest, EvalSuccess
from search.execution.training import TrainingEvaluator, load_experiment, load_prototype
from tests.test_shared_executables import _experiment


def _spec(stem: int, modules: tuple[tuple[int, int, int, int], ...]) -> ArchSpec:
    return ArchSpec(
        input_size=32,
        stem=StemSpec(channels=stem, kernel_size=3, stride=2, pool_size=0),
        stages=(StageSpec(1, tuple(ModuleSpec(*m, kernel_size=3) for m in modules)),),
        connectivity="dense",
    )


# -- the decision on a fake cost table -----------------------------------------------------


def test_cheap_padding_reuses_the_cheapest_host():
    choice = sw.choose_executable(
        narrow_step_s=0.010, steps=100, compile_s=10.0, hosts={"wide": 0.015, "wider": 0.020}
    )
    assert (choice.compile, choice.host) == (False, "wide")
    assert choice.predicted_s == pytest.approx(1.5)


def test_expensive_padding_with_a_cheap_compile_compiles():
    # 1000 steps x 10 ms surplus = 10 s of padding against a 2 s compile.
    choice = sw.choose_executable(
        narrow_step_s=0.010, steps=1000, compile_s=2.0, hosts={"wide": 0.020}
    )
    assert (choice.compile, choice.host) == (True, None)
    assert choice.predicted_s == pytest.approx(12.0)
    # the same padding against a 20 s compile: reuse
    assert not sw.choose_executable(
        narrow_step_s=0.010, steps=1000, compile_s=20.0, hosts={"wide": 0.020}
    ).compile


def test_no_host_compiles_the_seed_when_padding_it_costs_less_than_a_compile():
    choice = sw.choose_executable(narrow_step_s=0.010, steps=100, compile_s=10.0, hosts={})
    assert (choice.compile, choice.host) == (True, None)
    seeded = sw.choose_executable(
        narrow_step_s=0.010, steps=100, compile_s=10.0, hosts={}, seed=("proto", 0.015)
    )
    assert (seeded.compile, seeded.host) == (True, "proto")
    # 100 steps x 0.2 s surplus = 20 s > one 10 s compile: the candidate's own widths
    costly = sw.choose_executable(
        narrow_step_s=0.010, steps=100, compile_s=10.0, hosts={}, seed=("proto", 0.21)
    )
    assert (costly.compile, costly.host) == (True, None)


# -- calibration from timings ---------------------------------------------------------------


def test_step_times_calibrate_from_measurements():
    prior = sw.fit_step_times([], prior_seconds_per_mac=1e-8)
    assert (prior.intercept_s, prior.seconds_per_mac) == (0.0, 1e-8)
    # one executable size: proportional, the median seconds per MAC
    one = sw.fit_step_times([(1e6, 0.010), (1e6, 0.012), (1e6, 0.011)])
    assert (one.intercept_s, one.predict(2e6)) == (0.0, pytest.approx(0.022))
    # several sizes: the line (bench/README.md: 7 ms overhead + 3 ns per MAC, made up here)
    line = sw.fit_step_times([(m, 0.007 + 3e-9 * m) for m in (0.5e6, 1.4e6, 2.8e6)])
    assert line.intercept_s == pytest.approx(0.007)
    assert line.seconds_per_mac == pytest.approx(3e-9)
    # a line through a negative intercept is not believed: proportional
    odd = sw.fit_step_times([(1e6, 0.001), (3e6, 0.009)])
    assert odd.intercept_s == 0.0


def test_policy_reuses_the_seed_then_compiles_when_measured_padding_is_dear():
    proto = _spec(8, ((8, 16, 8, 16), (8, 16, 8, 16)))
    narrow = _spec(4, ((4, 8, 4, 8), (4, 8, 4, 8)))
    policy = sw.ExecutablePolicy(seeds=[proto])
    assert policy.compile_s == sw.PRIOR_COMPILE_S
    # Nothing compiled: the padding of a 10-step rung on the seed is cheap, so the seed
    # is compiled (and shrinking candidates inside it reuse it).
    assert policy.host_for(narrow, steps=10) == proto
    assert policy.choices[-1].compile
    macs = sw.count_cost(proto).macs
    policy.record(proto, compile_s=4.0, steps=10, train_s=10 * 2e-8 * macs)
    assert policy.compile_samples == [4.0]
    assert policy.step_samples == [(macs, pytest.approx(2e-8 * macs))]
    assert policy.host_for(narrow, steps=10) == proto
    assert not policy.choices[-1].compile
    policy.record(proto, compile_s=0.0, steps=10, train_s=10 * 2e-8 * macs)
    assert policy.compile_samples == [4.0]  # a reused executable's compile is not a sample
    # A long rung whose padding costs more than the measured compile: its own executable,
    # which then serves it.
    assert policy.host_for(narrow, steps=10**6) == narrow
    assert policy.choices[-1].compile
    assert policy.compiled[sw.skeleton_of(narrow).key] == [proto]  # not before a run on it
    narrow_macs = sw.count_cost(narrow).macs
    policy.record(narrow, compile_s=3.0, steps=10**6, train_s=10**6 * 2e-8 * narrow_macs)
    assert policy.compiled[sw.skeleton_of(narrow).key] == [proto, narrow]
    assert policy.compile_samples == [4.0, 3.0]
    assert policy.host_for(narrow, steps=10**6) == narrow
    assert not policy.choices[-1].compile
    # wider than every compiled host, and than the seed: its own widths
    wider = _spec(12, ((8, 16, 8, 16), (8, 16, 8, 16)))
    assert policy.host_for(wider, steps=10) == wider
    # not shareable: its own plain executable
    dropout = dataclasses.replace(narrow, head=dataclasses.replace(narrow.head, dropout=0.1))
    assert policy.host_for(dropout, steps=10) is None


def test_a_run_that_trains_nothing_or_fails_does_not_make_a_host_compiled():
    # Chosen for a compile, but the rung was already complete (0 steps, no compile): the
    # next candidate must still count that compile, and time it when it happens.
    proto = _spec(8, ((8, 16, 8, 16), (8, 16, 8, 16)))
    narrow = _spec(4, ((4, 8, 4, 8), (4, 8, 4, 8)))
    policy = sw.ExecutablePolicy(seeds=[proto])
    assert policy.host_for(narrow, steps=0) == proto and policy.choices[-1].compile
    policy.record(proto, compile_s=0.0, steps=0, train_s=0.0)
    assert policy.compiled[sw.skeleton_of(proto).key] == []
    assert policy.host_for(narrow, steps=10) == proto and policy.choices[-1].compile
    policy.record(proto, compile_s=5.0, steps=10, train_s=0.01)
    assert policy.compile_samples == [5.0]
    assert policy.compiled[sw.skeleton_of(proto).key] == [proto]


def test_a_failed_host_and_larger_ones_are_not_used_again():
    proto = _spec(8, ((8, 16, 8, 16), (8, 16, 8, 16)))
    wider = _spec(8, ((8, 16, 8, 24), (8, 16, 8, 24)))
    narrow = _spec(4, ((4, 8, 4, 8), (4, 8, 4, 8)))
    # shared: the registry grows from the prototype
    hosts = sw.HostRegistry(seeds=[proto])
    assert hosts.host_for(narrow) == proto
    hosts.forget(proto)
    assert hosts.host_for(narrow) == narrow  # a fresh host of its own widths
    assert hosts.host_for(wider) is None  # would grow past the failed host: own executable
    assert hosts.host_for(narrow) == narrow
    # auto: the failed seed is neither reused nor compiled again
    policy = sw.ExecutablePolicy(seeds=[proto])
    macs = sw.count_cost(proto).macs
    assert policy.host_for(narrow, steps=10) == proto
    policy.record(proto, compile_s=4.0, steps=10, train_s=10 * 2e-8 * macs)
    policy.forget(proto)
    assert policy.compiled[sw.skeleton_of(proto).key] == []
    assert policy.host_for(narrow, steps=10) == narrow and policy.choices[-1].compile
    assert policy.host_for(wider, steps=10) is None


# -- the setting and the evaluator ----------------------------------------------------------


def test_executables_setting_accepts_auto_and_names_bad_values():
    assert SearchSettings(space=SpaceConfig(prototype="tiny"), executables="auto")
    with pytest.raises(ConfigError, match="executables"):
        SearchSettings(space=SpaceConfig(prototype="tiny"), executables="sometimes")


def test_search_workers_cache_every_compile_unless_the_environment_says(tmp_path, monkeypatch):
    path = _experiment(tmp_path, "cache", _spec(8, ((4, 16, 4, 12),)))
    training = load_experiment(path).training
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    try:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        jax.config.update(name, 1.0)
        TrainingEvaluator(training)
        assert getattr(jax.config, name) == 0.0
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2.5")
        jax.config.update(name, 2.5)
        TrainingEvaluator(training)
        assert getattr(jax.config, name) == 2.5
    finally:
        jax.config.update(name, before)


def _evaluator(root, name: str, executables: str) -> tuple[TrainingEvaluator, ArchSpec]:
    """An evaluator of a two-module dense experiment under `search.executables`, and its
    prototype as the search loads it."""
    path = _experiment(root, name, _spec(8, ((4, 16, 4, 12), (4, 12, 4, 12))))
    experiment = load_experiment(path, (f"search.executables={executables}",))
    return TrainingEvaluator.from_experiment(experiment), load_prototype(experiment)


@pytest.mark.slow
@pytest.mark.parametrize("executables", ["shared", "auto"])
def test_a_host_that_runs_out_of_memory_is_dropped_and_the_candidate_trains_alone(
    tmp_path, monkeypatch, executables
):
    evaluator, prototype = _evaluator(tmp_path, f"oom_{executables}", executables)
    real = training.train_and_evaluate
    hosts = []

    def device_too_small_for_the_prototype(config, workdir, *, host=None, **kwargs):
        # The prototype's program does not fit; the narrower candidates' programs do.
        hosts.append(host)
        if host == prototype:
            return TrainFailure(
                kind="out_of_memory",
                reason="RESOURCE_EXHAUSTED: out of memory (simulated)",
                step=0,
                workdir=str(workdir),
                last_good_step=None,
            )
        return real(config, workdir, host=host, **kwargs)

    monkeypatch.setattr(training, "train_and_evaluate", device_too_small_for_the_prototype)
    narrow = _spec(6, ((4, 8, 4, 8), (2, 12, 4, 8)))
    first = evaluator.train(EvalRequest(narrow, 4, tmp_path / "trials/0", None, 0))
    assert isinstance(first, EvalSuccess), first
    assert hosts == [prototype, None]  # the host failed; the candidate, alone, trained
    narrower = _spec(4, ((2, 8, 4, 8), (2, 8, 4, 8)))
    second = evaluator.train(EvalRequest(narrower, 4, tmp_path / "trials/1", None, 0))
    assert isinstance(second, EvalSuccess), second
    assert hosts[2] != prototype and len(hosts) == 3  # not offered the failed host again
    # the prototype itself now goes straight to its own plain executable: one attempt,
    # and on a device it does not fit, the failure would be its own
    third = evaluator.train(EvalRequest(prototype, 4, tmp_path / "trials/2", None, 0))
    assert hosts[3:] == [None] and isinstance(third, EvalSuccess), third


@pytest.mark.slow
def test_out_of_memory_placing_the_host_state_is_a_failure_of_the_host(tmp_path, monkeypatch):
    # The real trainer: the (larger) host state does not fit on the device.
    from covidnet_jax import train as train_module

    evaluator, prototype = _evaluator(tmp_path, "oom_place", "shared")
    place = train_module._Run._on_host

    def exhausted(run, state, dtype):
        if run.host == prototype:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (simulated)")
        return place(run, state, dtype)

    monkeypatch.setattr(train_module._Run, "_on_host", exhausted)
    narrow = _spec(6, ((4, 8, 4, 8), (2, 12, 4, 8)))
    run_dir = tmp_path / "trials/0"
    result = evaluator.train(EvalRequest(narrow, 4, run_dir, None, 0))
    assert isinstance(result, EvalSuccess), result
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events if e["event"] == "failure"] == ["out_of_memory"]
    assert evaluator.hosts.host_for(narrow) == narrow  # the prototype's host is gone


def test_a_compile_error_of_the_candidate_itself_keeps_the_host(tmp_path, monkeypatch):
    # Both programs fail to compile: the candidate's own failure, not the host's.
    evaluator, prototype = _evaluator(tmp_path, "compile_error", "shared")
    hosts = []

    def nothing_compiles(config, workdir, *, host=None, **kwargs):
        hosts.append(host)
        return TrainFailure("compile_error", "ValueError: (simulated)", 0, str(workdir), None)

    monkeypatch.setattr(training, "train_and_evaluate", nothing_compiles)
    narrow = _spec(6, ((4, 8, 4, 8), (2, 12, 4, 8)))
    for i in range(2):
        result = evaluator.train(EvalRequest(narrow, 4, tmp_path / f"trials/{i}", None, 0))
        assert isinstance(result, EvalFailure) and result.kind == "compile", result
    assert hosts == [prototype, None, prototype, None]


@pytest.mark.slow
def test_auto_evaluator_compiles_once_and_records_timings(tmp_path, fresh_step_functions):
    evaluator, prototype = _evaluator(tmp_path, "auto", "auto")
    assert evaluator.hosts is None and evaluator.policy is not None
    narrower = _spec(6, ((4, 8, 4, 8), (2, 12, 4, 8)))
    results = [
        evaluator.train(
            EvalRequest(spec=s, steps=4, workdir=tmp_path / f"trials/{i}", init_from=None, rung=0)
        )
        for i, s in enumerate([narrower, prototype])
    ]
    assert all(isinstance(r, EvalSuccess) for r in results), results
    # the first candidate compiled the seed (the prototype), the second ran on it
    assert results[0].compile_s > 0.0 and results[1].compile_s == 0.0
    assert [c.compile for c in evaluator.policy.choices] == [True, False]
    assert evaluator.policy.compile_samples == [pytest.approx(results[0].compile_s)]
    assert len(evaluator.policy.step_samples) == 2
    # a resumed rung predicts only the steps it still trains (6 - 4)
    model = evaluator.policy.step_model
    evaluator.train(
        EvalRequest(spec=narrower, steps=6, workdir=tmp_path / "trials/0", init_from=None, rung=1)
    )
    assert evaluator.policy.choices[-1].predicted_s == pytest.approx(
        2 * model.predict(sw.count_cost(prototype).macs)
    )
