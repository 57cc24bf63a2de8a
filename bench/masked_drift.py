"""How far a width-masked run drifts from the candidate's own run over a whole training.

Each step of a masked run (`covidnet_jax.shared_widths`) computes the narrow network's step
to float summation order; over hundreds of steps the two trajectories separate the way any
two float orders do (another device, another XLA version). This measures by how much, on
the quickstart search's data and training settings, against the spread between two seeds
of the candidate's own runs (the noise every verdict already carries):

- the candidate is the quickstart prototype with every width scaled by `--narrow`;
- for each seed it trains `--steps` steps three times through the search's evaluator: on its
  own executable (`search.executables: exact`), masked on the prototype's host network
  (`shared`), and on its own executable with the batch split over 2 CPU devices (a child
  process): same initial parameters, same batches, same mathematics;
- at every validation it compares each run's validation accuracy and loss with the own
  run's, and at the end their parameters (relative L2 distance) and their validation
  predictions (agreement of the predicted classes). Two references: the 2-device run (what
  another float summation order alone does: any change of devices, XLA version or host
  network) and the own run of the next seed (the spread every verdict already carries).

    python bench/masked_drift.py
    python bench/masked_drift.py --seeds 3 --steps 600 --json bench/results/masked_drift.json

Results are recorded in bench/README.md ("Shared executables").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from covidnet_jax import shared_widths as sw
from covidnet_jax.data import load_data
from covidnet_jax.evaluate import load_trained, predict_batches

EXPERIMENT = "experiments/quickstart.yaml"


def train_runs(
    root: Path, narrow: float, steps: int, seeds: int, modes: tuple[str, ...]
) -> dict[tuple[str, int], Path]:
    """Trains every (mode, seed) run in this process; returns their workdirs."""
    from search.execution.evaluation import EvalRequest, EvalSuccess
    from search.execution.training import TrainingEvaluator, load_experiment, load_prototype

    runs = {}
    for mode in modes:
        experiment = load_experiment(EXPERIMENT, (f"search.executables={mode}",))
        evaluator = TrainingEvaluator.from_experiment(experiment)
        prototype = load_prototype(experiment)
        spec = sw.map_widths(prototype, lambda w: max(4, round(w * narrow / 4) * 4))
        for seed in range(seeds):
            name = f"{mode}-{jax.device_count()}dev"
            workdir = root / "trials" / f"{name}-{seed}"  # two levels below `root`
            shutil.rmtree(workdir, ignore_errors=True)
            request = EvalRequest(spec, steps, workdir, init_from=None, rung=0, seed=seed)
            result = evaluator.train(request)
            if not isinstance(result, EvalSuccess):
                raise SystemExit(f"{mode} seed {seed}: {result}")
            runs[name, seed] = workdir
            print(f"trained {name} seed {seed}: {spec.summary()}", flush=True)
    return runs


def train_on_two_devices(root: Path, narrow: float, steps: int, seeds: int) -> None:
    """The candidate's own runs with the batch split over 2 CPU devices (a child process:
    the device count is fixed at JAX's start). Same mathematics (BatchNorm statistics and
    gradients are reduced over the whole batch), another float summation order: the drift
    any change of devices brings, the reference for the masked runs'."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    command = [
        sys.executable, __file__, "--child", "--dir", str(root), "--narrow", str(narrow),
        "--steps", str(steps), "--seeds", str(seeds),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env)


def validations(workdir: Path) -> dict[int, dict]:
    """step -> the validation event of a run."""
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in events if e["event"] == "validation"}


def final_comparison(a: Path, b: Path) -> dict:
    """Relative L2 distance of two runs' final parameters, and how often their validation
    predictions agree."""
    first, second = load_trained(a), load_trained(b)
    leaves_a = jax.tree.leaves(first.params)
    leaves_b = jax.tree.leaves(second.params)
    diff = sum(
        float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )
    norm = sum(float(np.sum(np.asarray(x) ** 2)) for x in leaves_a)
    predictions = []
    for trained in (first, second):
        data = load_data(trained.config.data, seed=trained.config.seed)
        batches = data.eval_batches("validation", 64)
        probs, _ = predict_batches(trained.fns, trained.params, trained.model_state, batches)
        predictions.append(np.argmax(probs, axis=-1))
    return {
        "param_rel_l2": (diff / norm) ** 0.5,
        "prediction_agreement": float(np.mean(predictions[0] == predictions[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--narrow", type=float, default=0.5, help="candidate width factor")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (>= 2 for the reference)")
    parser.add_argument("--dir", type=Path, default=Path("runs/masked_drift_bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds: expected at least 2 (the seed-to-seed reference needs two)")
    if args.child:
        train_runs(args.dir, args.narrow, args.steps, args.seeds, ("exact",))
        return
    runs = train_runs(args.dir, args.narrow, args.steps, args.seeds, ("exact", "shared"))
    train_on_two_devices(args.dir, args.narrow, args.steps, args.seeds)
    for seed in range(args.seeds):
        runs["exact-2dev", seed] = args.dir / "trials" / f"exact-2dev-{seed}"
    logs = {key: validations(path) for key, path in runs.items()}
    steps = sorted(logs["exact-1dev", 0])
    seeds = range(args.seeds)
    pairs = {
        "masked vs own": [(("shared-1dev", s), ("exact-1dev", s)) for s in seeds],
        "own on 2 devices vs own": [(("exact-2dev", s), ("exact-1dev", s)) for s in seeds],
        "next seed vs own": [
            (("exact-1dev", (s + 1) % args.seeds), ("exact-1dev", s)) for s in seeds
        ],
    }
    print(f"\njax {jax.__version__}, candidate = quickstart prototype x {args.narrow}, "
          f"{args.seeds} seeds, mean |difference| of validation accuracy / loss (n = "
          f"{logs['exact-1dev', 0][steps[0]]['count']} images)")  # fmt: skip
    print(f"{'step':>5s} " + " ".join(f"{name:>34s}" for name in pairs))
    table = []
    for step in steps:
        row = {"step": step}
        cells = []
        for name, members in pairs.items():
            d_acc = statistics.mean(
                abs(logs[a][step]["accuracy"] - logs[b][step]["accuracy"]) for a, b in members
            )
            d_loss = statistics.mean(
                abs(logs[a][step]["loss"] - logs[b][step]["loss"]) for a, b in members
            )
            same = sum(logs[a][step]["confusion"] == logs[b][step]["confusion"] for a, b in members)
            row[name] = {"accuracy": d_acc, "loss": d_loss, "identical_confusion": same}
            cells.append(f"{d_acc:.4f} / {d_loss:.4f} ({same}/{len(members)} same)")
        table.append(row)
        print(f"{step:5d} " + " ".join(f"{c:>34s}" for c in cells))
    finals = {}
    for name, members in pairs.items():
        found = [final_comparison(runs[a], runs[b]) for a, b in members]
        finals[name] = found
        print(
            f"final, {name}: parameter relative L2 "
            + ", ".join(f"{f['param_rel_l2']:.2e}" for f in found)
            + "; prediction agreement "
            + ", ".join(f"{f['prediction_agreement']:.3f}" for f in found)
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": plain, "table": table, "final": finals}))


if __name__ == "__main__":
    main()
