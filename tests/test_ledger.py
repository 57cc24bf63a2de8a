"""The trial ledger: what a trial records is written and read by `search.ledger.records` only.

Round trips through a real Optuna study (the attributes are JSON in the storage), the
proposal's origin recorded inside `study.ask()`, and one cost count per candidate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
from search_support import PROTOTYPE, fast_tmp, read, settings

from covidnet_jax.metrics import EvalMetrics, compute_metrics
from search.execution.runner import Worker
from search.execution.surrogate import SurrogateEvaluator, surrogate_job
from search.ledger.records import Candidate, Proposal, RungResult, TrialRecord
from search.ledger.requirements import Cost
from search.strategies import StrategySampler

__all__ = ["fast_tmp"]


def _metrics(correct: int, total: int) -> EvalMetrics:
    confusion = np.array([[correct, total - correct], [0, 0]], dtype=np.int64)
    return compute_metrics(confusion, ("a", "b"), loss=0.5)


def _stored(attrs: dict) -> TrialRecord:
    study = optuna.create_study()
    trial = study.ask()
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 1.0)
    return TrialRecord.from_trial(study.trials[0])


def test_a_trained_record_reads_back_what_the_writers_wrote():
    candidate = Candidate.build(
        PROTOTYPE, lambda spec: Cost(macs=123, params=45, activation_bytes=6)
    )
    rung = RungResult(
        rung=0,
        steps=50,
        metrics=_metrics(9, 10),
        compile_s=1.5,
        train_s=2.5,
        checkpoint="trials/0/checkpoints",
        violations={"macs": 0.0, "accuracy": 0.05},
    )
    attrs = {
        **Proposal({"g": 1}, parent=3, operator="narrow s1.m0.width").to_attrs(),
        **TrialRecord.running_attrs("host:1"),
        **candidate.to_attrs(),
        **TrialRecord.rung_attrs(rung),
        **TrialRecord.trained_attrs(rung, compile_s=1.5, train_s=2.5),
        **TrialRecord.end_attrs("trained", "misses accuracy", rung.violations),
    }
    record = _stored(attrs)

    assert (record.parent, record.operator, record.worker) == (3, "narrow s1.m0.width", "host:1")
    assert record.spec_hash == PROTOTYPE.content_hash() == candidate.spec_hash
    assert record.spec_json == PROTOTYPE.to_json(indent=None)
    assert record.summary == PROTOTYPE.summary()
    assert (record.macs, record.params_count, record.activation_bytes) == (123, 45, 6)
    assert [r.to_attr() for r in record.rungs] == [rung.to_attr()]
    assert (record.checkpoint, record.compile_s, record.train_s) == (rung.checkpoint, 1.5, 2.5)
    assert record.status == "trained" and record.reason == "misses accuracy"
    assert record.violations == rung.violations and not record.feasible
    assert record.is_trained and record.is_proposal


def test_a_retry_carries_the_proposal_and_rungs_but_not_the_result():
    rung = RungResult(0, 50, _metrics(8, 10), 1.0, 2.0, "trials/4/checkpoints", {})
    lost = _stored(
        {
            **Proposal({"g": 1}, parent=2, operator="widen").to_attrs(),
            **TrialRecord.proposal_index_attrs(4),
            **TrialRecord.rung_attrs(rung),
            **TrialRecord.lost_attrs("worker h:1 stopped", abandoned=False),
            **TrialRecord.failure_attrs("oom"),
        }
    )
    retry = _stored(lost.retry_attrs(losses=1, failures=0))

    assert (retry.retry_of, retry.origin, retry.losses, retry.failures) == (lost.number, 0, 1, 0)
    assert (retry.parent, retry.operator) == (2, "widen")
    assert [r.to_attr() for r in retry.rungs] == [rung.to_attr()]
    assert retry.failure_kind == "" and not retry.is_proposal


def test_a_duplicate_copies_the_result_only_when_asked():
    original = _stored(
        {**TrialRecord.end_attrs("trained", "", {"macs": 0.0}), "rung": 1, "checkpoint": "c"}
    )
    assert original.duplicate_attrs(result=False) == {"duplicate_of": 0}
    copied = original.duplicate_attrs(result=True)
    assert copied["duplicate_of"] == 0 and copied["checkpoint"] == "c" and copied["feasible"]


def test_the_proposal_origin_is_in_the_trial_as_soon_as_it_is_asked(fast_tmp):
    """Evolution's parent and operator are recorded inside `study.ask()`: a worker killed
    right after the ask leaves a trial that still says where it came from."""
    job = surrogate_job(
        settings(**{"strategy.name": "shrink"}), fast_tmp / "s", prototype=PROTOTYPE
    )
    recorded = []
    sampler = StrategySampler(
        job.space(),
        job.settings.strategy,
        job.settings.objective,
        job.settings.seed,
        on_proposal=lambda number, proposal: recorded.append((number, proposal)),
    )
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    assert [(n, p.operator, p.parent) for n, p in recorded] == [(trial.number, "prototype", None)]
    assert recorded[0][1].genome == job.space().prototype_genome()


def test_a_search_records_every_proposal_origin_and_costs_each_candidate_once(fast_tmp):
    data = settings(
        **{
            "strategy.name": "evolution",
            "strategy.startup_trials": 2,
            "budget.max_trials": 10,
            "requirements.max_macs": 1.0e7,
        }
    )
    job = surrogate_job(data, fast_tmp / "e", prototype=PROTOTYPE)
    real_cost_model = job.make_cost_model()
    counted: list[str] = []

    def counting_cost_model(spec):
        counted.append(spec.content_hash())
        return real_cost_model(spec)

    job = dataclasses.replace(job, make_cost_model=lambda: counting_cost_model)
    Worker(job, SurrogateEvaluator()).run()
    records = read(fast_tmp / "e")

    proposals = [r for r in records if r.is_proposal]
    assert len(proposals) == 10
    assert all(r.operator for r in proposals), [(r.number, r.attrs) for r in proposals]
    assert any(r.parent is not None for r in proposals)
    # Evolution checks each child's cost before proposing it; the record reuses that count.
    assert len(counted) == len(set(counted)), "a spec was costed twice"
    assert {r.spec_hash for r in proposals if r.spec_hash} <= set(counted)
