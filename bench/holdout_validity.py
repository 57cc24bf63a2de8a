"""Do the search's verdicts hold on unseen data? The quickstart under two decision rules.

For each search seed, the quickstart search (`--config`) runs twice in fresh workdirs, one
after the other, as `make search` would run it, except for the settings this benchmark sets:

- `point`: the rule the framework had before intervals: a requirement holds when the
  validation rate itself clears the minimum, and the top-ranked feasible design is declared
  without confirmation runs (`search.requirements.decision=point`, `search.confirm.seeds=0`);
- `lower_bound`: the default: each rate is judged by its one-sided 95% lower confidence
  bound, and the design is declared only after `search.confirm.seeds` further runs (other
  training seeds, other validation patients) also meet the requirements.

- `main_8775d42`: the quickstart as it was before (400 images per class, ~145 validation
  images, the point rule, no confirmation, 300 final steps), for the before/after.

The first two arms use the same data, space, budget and final training budget; the seed sets
both the training seed and the search seed. Per run it reports the selected design's MACs, its
validation and test metrics with 95% intervals, whether every outcome requirement holds on the
test split (the test rate at or above the minimum), and the three-way verdict (met / not met /
inconclusive, from one-sided 95% bounds on the test split). The test split decides nothing:
it is scored once, after the search.

Target (issue 14): the lower-bound rule's design meets every requirement on test for >= 4 of
5 seeds, with median MACs no more than 1.3x the point rule's.

Example (the run in bench/README.md; `--wall-time` shortens each search's proposal phase;
workdirs that already hold a finished search are reused, so arms can be added later):
    python bench/holdout_validity.py --seeds 0,1,2,3,4 --wall-time 240
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RULES = {
    "point": ["search.requirements.decision=point", "search.confirm.seeds=0"],
    "lower_bound": ["search.requirements.decision=lower_bound"],
    # The quickstart as main had it at 8775d42 (the measurement): 400 images per
    # class, 15% validation (~145 images), the point rule, no confirmation, 300 final steps.
    # (Candidates are now judged on their last checkpoint; main took the best of a run's.)
    "main_8775d42": [
        "search.requirements.decision=point",
        "search.confirm.seeds=0",
        "search.budget.final_steps=300",
        "data.validation_fraction=0.15",
        "data.covidx_dir=data/quickstart400",
        "data.synth.per_class=400",
    ],
}


def run_search(config: str, workdir: Path, seed: int, rule: str, wall_time: float) -> float:
    """Runs one quickstart search; returns its wall time in seconds."""
    overrides = [
        f"seed={seed}",
        f"search.seed={seed}",
        f"search.budget.max_wall_time_s={wall_time}",
        *RULES[rule],
    ]
    # The installed entry point (it preloads the malloc XLA:CPU steps are measured with).
    command = [
        str(Path(sys.executable).parent / "covidnet"),
        "search",
        "--config",
        config,
        "--workdir",
        str(workdir),
        "--no-live",
    ]
    for item in overrides:
        command += ["--set", item]
    start = time.time()
    log = workdir.with_suffix(".log")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def summarize(workdir: Path) -> dict[str, Any]:
    """The selected design of one finished search, from its leaderboard and best/metrics.json."""
    board = json.loads((workdir / "leaderboard.json").read_text(encoding="utf-8"))
    counts = board["counts"]
    best = board.get("best")
    found: dict[str, Any] = {
        "trained": counts.get("trained", 0),
        "feasible": counts.get("feasible", 0),
        "confirmation_runs": len(board.get("confirmation", [])),
    }
    if best is None:
        return {**found, "design": None}
    requirements = best["requirements"]
    holds = all(r["test"]["value"] >= r["minimum"] for r in requirements)
    return {
        **found,
        "design": best["trial"],
        "macs": best["macs"],
        "steps": best["steps"],
        "requirements": [
            {
                "name": r["name"],
                "minimum": r["minimum"],
                "validation": _short(r["validation"]),
                "test": _short(r["test"]),
                "verdict": r["verdict"],
            }
            for r in requirements
        ],
        "holds_on_test": holds,
        "verdict": best["verdict"],
    }


def _short(estimate: dict[str, Any]) -> dict[str, Any]:
    return {k: estimate[k] for k in ("value", "low", "high", "trials")}


def _fmt(estimate: dict[str, Any]) -> str:
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def table(results: list[dict[str, Any]]) -> str:
    """The per-seed Markdown table and the target line."""
    lines = [
        "| seed | rule | trained | MACs | val accuracy [95% CI] | test accuracy [95% CI] | "
        "test COVID-19 sensitivity | all hold on test | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["design"] is None:
            lines.append(
                f"| {r['seed']} | {r['rule']} | {r['trained']} | no design declared | - | - | - "
                "| no | - |"
            )
            continue
        reqs = {q["name"]: q for q in r["requirements"]}
        acc = reqs.get("accuracy")
        sens = next((q for n, q in reqs.items() if n.startswith("sensitivity:")), None)
        lines.append(
            f"| {r['seed']} | {r['rule']} | {r['trained']} | {r['macs']:,} | "
            f"{_fmt(acc['validation']) if acc else '-'} | {_fmt(acc['test']) if acc else '-'} | "
            f"{_fmt(sens['test']) if sens else '-'} | {'yes' if r['holds_on_test'] else 'no'} | "
            f"{r['verdict']} |"
        )
    for rule in dict.fromkeys(r["rule"] for r in results):
        mine = [r for r in results if r["rule"] == rule]
        held = sum(1 for r in mine if r.get("holds_on_test"))
        macs = [r["macs"] for r in mine if r["design"] is not None]
        median = statistics.median(macs) if macs else float("nan")
        lines.append(
            f"\n{rule}: every requirement holds on test for {held} of {len(mine)} seeds; "
            f"median MACs {median:,.0f}"
        )
    point = [r["macs"] for r in results if r["rule"] == "point" and r["design"] is not None]
    lower = [r["macs"] for r in results if r["rule"] == "lower_bound" and r["design"] is not None]
    if point and lower:
        lines.append(
            f"median MACs ratio lower_bound / point: "
            f"{statistics.median(lower) / statistics.median(point):.2f} (target <= 1.3)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated search seeds")
    parser.add_argument(
        "--rules",
        default=",".join(RULES),
        help=f"comma-separated arms, of {', '.join(RULES)} (default: all)",
    )
    parser.add_argument(
        "--wall-time", type=float, default=360.0, help="proposal phase of each search, seconds"
    )
    parser.add_argument("--root", default="runs/holdout_validity", help="where the runs go")
    parser.add_argument(
        "--out", default="bench/results/holdout_validity.json", help="results JSON file"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rules = args.rules.split(",")
    for rule in rules:
        if rule not in RULES:
            parser.error(f"--rules: unknown arm {rule!r}; expected some of {', '.join(RULES)}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for rule in rules:
            workdir = root / f"{rule}-seed{seed}"
            if not (workdir / "leaderboard.json").exists():
                elapsed = run_search(args.config, workdir, seed, rule, args.wall_time)
            else:
                elapsed = float("nan")  # reused from an earlier run of this benchmark
            result = {"seed": seed, "rule": rule, "elapsed_s": elapsed, **summarize(workdir)}
            results.append(result)
            print(json.dumps(result), flush=True)
            out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"results: {out}; machine load at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
