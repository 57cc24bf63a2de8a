"""A design exploration driven from Python: no YAML file, no command line.

    python examples/python_api.py              # a tiny search in a temporary folder
    python examples/python_api.py runs/api     # ... kept in runs/api (run again: resumes)

It builds the experiment from the config dataclasses, writes a small synthetic COVIDx-format
data set, searches a few designs around the `tiny` prototype for a couple of training steps
each (about a minute on 2 CPU cores), then prints the leaderboard and the declared design
from the result object. Scale `per_class`, `rungs`, `final_steps` and `max_trials` up for a
search that means something (experiments/quickstart.yaml is the same experiment as a file).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console

import search
from covidnet_jax.config import DataConfig, LoopConfig, ModelConfig, TrainConfig
from covidnet_jax.data.pipeline import SynthConfig
from search.config import (
    BudgetConfig,
    ClassRequirement,
    ConfirmConfig,
    RequirementsConfig,
    SearchSettings,
    SpaceConfig,
    WidthRange,
)


def build_experiment(data_dir: Path) -> search.SearchExperiment:
    """The experiment: how each candidate trains, and what the search looks for."""
    training = TrainConfig(
        model=ModelConfig(arch="tiny"),
        data=DataConfig(
            covidx_dir=str(data_dir),
            synth=SynthConfig(per_class=24, image_size=32),  # written on first use
            resolution=32,
            validation_fraction=0.25,
            augment=False,
        ),
        train=LoopConfig(steps=4, batch_size=8, eval_every=2, log_every=2, select="last"),
    )
    settings = SearchSettings(
        space=SpaceConfig(
            prototype="tiny",
            module_width=WidthRange(min=0.5, max=1.0, step=0.5),
            connectivity=("dense", "residual"),
        ),
        requirements=RequirementsConfig(
            max_macs=2.0e6,
            # Loose enough for a few training steps to meet: the point is the plumbing.
            min_accuracy=0.0,
            classes={"COVID-19": ClassRequirement(min_sensitivity=0.0)},
        ),
        objective="min_macs",
        budget=BudgetConfig(max_trials=3, rungs=(4,), final_steps=4, max_wall_time_s=300),
        confirm=ConfirmConfig(seeds=0),
        workers=1,
    )
    return search.SearchExperiment(training=training, search=settings)


def report(result) -> None:
    """Prints the leaderboard and the declared design of a `search.SearchResult`."""
    print(f"\nstopped: {'; '.join(result.stop_reasons)}; trials by status: {result.counts}")
    print("\nleaderboard (best first):")
    rows = json.loads(result.leaderboard_json.read_text(encoding="utf-8"))["rows"]
    for row in rows:
        verdict = "feasible" if row["feasible"] else f"infeasible: {row['reason']}"
        print(
            f"  #{row['rank']} trial {row['trial']}: {row['macs']:,} MACs, "
            f"validation accuracy {row['val_accuracy']:.3f}, {verdict}"
        )
        print(f"      {row['summary']}")
    best = result.best
    print(f"\ndeclared design: {best.message}")
    if best.summary is not None:
        print(f"  {best.summary['summary']}")
        print(f"  spec, checkpoint and test metrics: {result.artifact_dir / 'best'}")
        for requirement in best.reports:
            test = "not scored" if requirement.test is None else requirement.test.format()
            print(
                f"  {requirement.name} >= {requirement.minimum}: validation "
                f"{requirement.validation.format()}, test {test} -> {requirement.verdict}"
            )


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="covidnet-api-") as scratch:
        workdir = Path(argv[0]) if argv else Path(scratch) / "run"
        data_dir = (workdir.parent if argv else Path(scratch)) / "data"
        experiment = build_experiment(data_dir)
        # One line per finished trial; leave `console` out for a silent run.
        result = search.run(experiment, workdir, console=Console(), lines=True)
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
