"""The search loop with the surrogate evaluator: pre-filter, dedupe, failures, ASHA, resume."""

from __future__ import annotations

from collections import Counter

import pytest
from search_support import PROTOTYPE, fast_tmp, run, settings

from search.execution.evaluation import EvalFailure, EvalRequest
from search.execution.surrogate import SurrogateEvaluator
from search.ledger import store

__all__ = ["fast_tmp"]


def test_infeasible_candidates_are_never_trained(fast_tmp):
    evaluator = SurrogateEvaluator()
    records, reason = run(fast_tmp, "s", settings(**{"strategy.name": "random"}), evaluator)
    statuses = Counter(r.status for r in records)
    assert reason == "trial budget spent"
    assert len(records) == 20
    assert statuses["infeasible"] > 0 and statuses["trained"] > 0
    infeasible = {r.spec_hash for r in records if r.status == "infeasible"}
    trained_hashes = [job[0] for job in evaluator.jobs]
    assert not infeasible & set(trained_hashes)
    for r in records:
        if r.status == "infeasible":
            assert r.macs > 3.0e6
            assert "macs" in r.attrs["reason"] and not r.rungs
    # Every training job belongs to a trained trial's rung, and vice versa.
    assert len(evaluator.jobs) == sum(len(r.rungs) for r in records if r.status == "trained")


def test_duplicate_specs_are_trained_once(fast_tmp):
    # A space of two designs: random proposals must repeat.
    data = settings(
        **{
            "space": {"prototype": "tiny", "connectivity": ["dense", "residual"]},
            "strategy.name": "random",
            "budget.max_trials": 8,
            "budget.rungs": [100],
        }
    )
    evaluator = SurrogateEvaluator()
    records, _ = run(fast_tmp, "d", data, evaluator)
    trained = Counter(job[0] for job in evaluator.jobs)
    assert sorted(trained.values()) == [1, 1]
    duplicates = [r for r in records if r.status == "duplicate"]
    assert len(duplicates) == 6
    for r in duplicates:
        original = records[r.attrs["duplicate_of"]]
        assert original.status == "trained" and original.spec_hash == r.spec_hash
        assert r.state == "COMPLETE"  # the sampler learns from the copied values


class ExplodingEvaluator(SurrogateEvaluator):
    """Raises on the first training job, like a bug in a training engine would."""

    def train(self, request: EvalRequest):
        if not self.jobs:
            self.jobs.append(("boom", 0, request.steps, None))
            raise RuntimeError("XLA says no")
        return super().train(request)


def test_failing_candidates_are_recorded_and_the_search_goes_on(fast_tmp):
    # Shrink proposes the prototype first; its training returns a NaN failure.
    data = settings(**{"strategy.name": "shrink", "budget.max_trials": 6})
    evaluator = SurrogateEvaluator(fail_hashes=frozenset({PROTOTYPE.content_hash()}))
    records, reason = run(fast_tmp, "f", data, evaluator)
    assert reason == "trial budget spent"
    assert records[0].spec_hash == PROTOTYPE.content_hash()
    assert records[0].status == "failed" and records[0].state == "FAIL"
    assert "NaN" in records[0].attrs["reason"]
    assert records[0].attrs["failure_kind"] == "nan"
    assert any(r.status == "trained" for r in records[1:])

    records, _ = run(fast_tmp, "e", settings(**{"budget.max_trials": 15}), ExplodingEvaluator())
    first_trained = next(r for r in records if r.status in ("failed", "trained"))
    assert first_trained.status == "failed"
    assert first_trained.attrs["reason"] == "RuntimeError: XLA says no"
    assert any(r.status == "trained" for r in records)


@pytest.mark.parametrize("strategy", ["random", "evolution", "shrink", "tpe", "nsga2"])
def test_proposals_are_deterministic_for_a_seed(fast_tmp, strategy):
    data = settings(**{"strategy.name": strategy, "budget.max_trials": 12, "seed": 3})
    first, _ = run(fast_tmp, "a", data)
    again, _ = run(fast_tmp, "b", data)
    assert [r.spec_hash for r in first] == [r.spec_hash for r in again]
    assert [r.status for r in first] == [r.status for r in again]
    if strategy != "shrink":  # shrink starts from the prototype whatever the seed
        other, _ = run(fast_tmp, "c", settings(**{**{"strategy.name": strategy}, "seed": 4}))
        assert [r.spec_hash for r in first] != [r.spec_hash for r in other][:12]


@pytest.mark.parametrize("strategy", ["evolution", "tpe"])
def test_a_resumed_search_continues_the_same_strategy(fast_tmp, strategy):
    straight, _ = run(
        fast_tmp, "x", settings(**{"strategy.name": strategy, "budget.max_trials": 14})
    )
    run(fast_tmp, "y", settings(**{"strategy.name": strategy, "budget.max_trials": 8}))
    resumed, _ = run(
        fast_tmp, "y", settings(**{"strategy.name": strategy, "budget.max_trials": 14})
    )
    assert len(resumed) == 14
    assert [r.spec_hash for r in resumed] == [r.spec_hash for r in straight]


def test_successive_halving_promotes_the_best_fraction(fast_tmp):
    data = settings(
        **{
            "strategy.name": "random",
            "budget.max_trials": 30,
            "budget.rungs": [50, 150, 450],
            "budget.reduction_factor": 3,
            "requirements.max_macs": 1.0e7,
        }
    )
    evaluator = SurrogateEvaluator()
    records, _ = run(fast_tmp, "h", data, evaluator)
    trained = [r for r in records if r.status == "trained"]
    reached = [sum(1 for r in trained if len(r.rungs) > k) for k in range(3)]
    assert reached[0] == len(trained) > 10
    assert reached[0] > reached[1] > reached[2] >= 1
    # A promoted trial resumed from its own checkpoint: later rungs train only the extra steps.
    for _, start, steps, _ in evaluator.jobs:
        assert start in (0, 50, 150) and steps == {0: 50, 50: 150, 150: 450}[start]
    # The best at rung 0 among all candidates reached the last rung or ranked early enough
    # to be promoted when it finished: the first trial always goes to rung 1.
    assert len(trained[0].rungs) >= 2
    # Optuna's own states carry the fidelity: each rung's objective value (MACs here) is an
    # intermediate value at its step count; a candidate stopped below the last rung is
    # PRUNED, one that reached it COMPLETE; both carry the constraints of their last rung.
    study = store.load_study(store.open_storage(fast_tmp / "h"), "h")
    frozen = {t.number: t for t in study.get_trials()}
    for r in trained:
        t = frozen[r.number]
        assert sorted(t.intermediate_values) == [(50, 150, 450)[k] for k in range(len(r.rungs))]
        assert set(t.intermediate_values.values()) == {float(r.macs)}
        if len(r.rungs) < 3:
            # (Optuna records a pruned trial's last intermediate value as its value.)
            assert t.state.name == "PRUNED" and set(t.constraints) == {
                "macs",
                "accuracy",
                "sensitivity:COVID-19",
            }
            assert t.values == [float(r.macs)]
        else:
            assert t.state.name == "COMPLETE" and set(t.constraints) == {
                "macs",
                "accuracy",
                "sensitivity:COVID-19",
            }


def test_weight_inheritance_passes_the_parent_checkpoint(fast_tmp):
    data = settings(**{"budget.max_trials": 16, "strategy.startup_trials": 2})
    evaluator = SurrogateEvaluator()
    records, _ = run(fast_tmp, "w", data, evaluator)
    inherited = [job for job in evaluator.jobs if job[3] is not None]
    assert inherited
    by_hash = {r.spec_hash: r for r in records if r.status == "trained"}
    for spec_hash, start, _, init_from in inherited:
        child = by_hash[spec_hash]
        assert start == 0
        assert init_from == str(
            fast_tmp / "w" / "trials" / str(child.attrs["parent"]) / "checkpoint"
        )

    records, _ = run(
        fast_tmp,
        "n",
        settings(**{"strategy.inherit_weights": False}),
        evaluator := SurrogateEvaluator(),
    )
    assert all(job[3] is None for job in evaluator.jobs)


def test_the_search_gives_up_after_consecutive_infeasible_proposals(fast_tmp):
    data = settings(
        **{
            "strategy.name": "random",
            "requirements.max_macs": 10.0,
            "budget.max_trials": 50,
            "budget.max_consecutive_infeasible": 5,
        }
    )
    evaluator = SurrogateEvaluator()
    records, reason = run(fast_tmp, "g", data, evaluator)
    assert reason.startswith("gave up after 5 infeasible")
    assert len(records) == 5 and not evaluator.jobs


def test_a_training_failure_in_a_later_rung_keeps_the_earlier_rung(fast_tmp):
    class FailSecondRung(SurrogateEvaluator):
        def train(self, request: EvalRequest):
            if request.rung == 1:
                return EvalFailure("oom", "RESOURCE_EXHAUSTED: out of memory")
            return super().train(request)

    records, _ = run(fast_tmp, "r", settings(**{"budget.max_trials": 6}), FailSecondRung())
    failed = [r for r in records if r.status == "failed"]
    assert failed, "the first trained candidate is always promoted to rung 1"
    assert failed[0].attrs["failure_kind"] == "oom" and len(failed[0].rungs) == 1
