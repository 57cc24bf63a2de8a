"""The end of a search: confirmation over seeds and validation splits, fallback, the verdict."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from search_support import read, run, settings

from covidnet_jax.metrics import compute_metrics
from covidnet_jax.typed_yaml import from_dict
from search.config import SearchSettings
from search.execution.evaluation import EvalRequest, EvalSuccess
from search.execution.finish import RunLog, feasible_ranked, finish_best
from search.execution.surrogate import SurrogateEvaluator


class Judged(SurrogateEvaluator):
    """The surrogate, except that chosen (spec hash, validation draw) runs score poorly."""

    def __init__(self, poor: set[tuple[str, int]] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.poor = set(poor)
        self.requests: list[EvalRequest] = []

    def train(self, request: EvalRequest):
        self.requests.append(request)
        outcome = super().train(request)
        if (request.spec.content_hash(), request.validation_draw) in self.poor:
            k = request.spec.num_classes
            confusion = np.full((k, k), 30) + np.eye(k, dtype=int) * 10  # accuracy ~0.4
            return dataclasses.replace(
                outcome, metrics=compute_metrics(confusion, request.spec.class_names)
            )
        assert isinstance(outcome, EvalSuccess)
        return outcome


def _search(tmp_path):
    data = settings(**{"budget.max_trials": 12, "strategy.name": "random"})
    records, _ = run(tmp_path, "finish", data)
    search = from_dict(SearchSettings, data, path="search")
    ranked = feasible_ranked(records, search)
    assert len(ranked) >= 3, "the fixture needs three feasible designs"
    return records, search, ranked, tmp_path / "finish"


def test_confirmation_falls_back_to_the_next_candidate(tmp_path):
    records, search, ranked, workdir = _search(tmp_path)
    first, second = ranked[0], ranked[1]
    evaluator = Judged(poor={(first.spec_hash, 1)})  # its first confirmation run fails
    attrs: dict = {}
    best = finish_best(
        workdir, records, search, evaluator, train_seed=5, log=RunLog(attrs, attrs.__setitem__)
    )
    assert best.summary is not None and best.summary["trial"] == second.number
    tried = [(r.trial, r.index, r.holds) for r in best.tried]
    assert tried == [
        (first.number, 0, True),
        (first.number, 1, False),  # stopped there: its run 2 was never trained
        (second.number, 0, True),
        (second.number, 1, True),
        (second.number, 2, True),
    ]
    # Runs k > 0 train from scratch with seed + k, judged on validation draw k.
    confirmations = [r for r in evaluator.requests if r.validation_draw > 0]
    assert [(r.seed, r.validation_draw, r.init_from) for r in confirmations] == [
        (6, 1, None),
        (6, 1, None),
        (7, 2, None),
    ]
    assert all(r.steps == search.budget.full_fidelity_steps for r in evaluator.requests)
    # Every run is recorded in the store, and in best/metrics.json with the verdicts.
    assert sorted(attrs) == sorted(f"confirmation:{t}:{i}" for t, i, _ in tried)
    summary = json.loads((workdir / "best" / "metrics.json").read_text())
    assert [r["holds"] for r in summary["confirmation"]] == [True, False, True, True, True]
    assert summary["decision"]["rule"] == "point" and summary["verdict"] in (
        "met",
        "not met",
        "inconclusive",
    )
    assert [r["name"] for r in summary["requirements"]] == ["accuracy", "sensitivity:COVID-19"]
    assert (workdir / "best" / "train").is_dir()
    assert not (workdir / "confirmation" / f"{second.number}_0").exists()  # moved to best/

    # A resumed finish reuses the recorded runs and the declared design: nothing retrains.
    again = Judged(poor={(first.spec_hash, 1)})
    repeat = finish_best(
        workdir, records, search, again, train_seed=5, log=RunLog(attrs, attrs.__setitem__)
    )
    assert repeat.summary["trial"] == second.number and again.requests == []


def test_no_candidate_confirmed_declares_nothing(tmp_path):
    records, search, ranked, workdir = _search(tmp_path)
    search = dataclasses.replace(
        search, confirm=dataclasses.replace(search.confirm, max_candidates=2)
    )
    evaluator = Judged(poor={(r.spec_hash, 1) for r in ranked})
    best = finish_best(workdir, records, search, evaluator)
    assert best.summary is None and "no design was confirmed" in best.message
    assert len(best.tried) == 4 and not (workdir / "best" / "metrics.json").exists()


def test_without_confirmation_seeds_the_final_run_alone_decides(tmp_path):
    records, search, ranked, workdir = _search(tmp_path)
    search = dataclasses.replace(search, confirm=dataclasses.replace(search.confirm, seeds=0))
    evaluator = Judged()
    best = finish_best(workdir, records, search, evaluator)
    assert best.summary["trial"] == ranked[0].number
    assert [r.index for r in best.tried] == [0] and "not re-confirmed" in best.message
    assert read(workdir)  # the study is intact
