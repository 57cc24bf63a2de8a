"""What a shared executable costs and saves: compile time and step time, padded vs narrow.

A candidate of the quickstart search (the prototype `experiments/quickstart_prototype.json`,
64 px, batch 16, every width scaled by `--narrow`) trains either on its own executable or,
width-masked (`covidnet_jax.shared_widths`), on a host network's: the prototype itself (what a
shrinking search starts from) and the prototype scaled by 1.5 (the largest widths of the
quickstart space). For each it reports the train- and eval-step compile times and the train
step time, and their ratios to the narrow candidate's own executable measured in the same
run (step times interleaved, median of `--repeats` windows, so a loaded machine slows both
alike). The analytic FLOPs ratio (`cost.count_cost`) is printed beside the measured one.

What that buys a whole search is measured by bench/search_throughput.py.

With `--cache-check` it only checks JAX's persistent compilation cache across processes:
two processes, one after the other, train the same candidate on one cache directory, with
JAX's default write threshold (compiles >= 1 s) and with every compile written (what search
workers set): compile seconds, cache hits and misses.

    python bench/shared_executables.py
    python bench/shared_executables.py --narrow 0.5 --steps 20 --repeats 5 --json out.json
    python bench/shared_executables.py --cache-check --search-dir /tmp/shared_bench

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
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from covidnet_jax import parallel, presets
from covidnet_jax import shared_widths as sw
from covidnet_jax.arch import ArchSpec
from covidnet_jax.cost import count_cost
from covidnet_jax.models import build_model
from covidnet_jax.steps import Hyper, StepFunctions, StepSettings

PROTOTYPE = "experiments/quickstart_prototype.json"


def scale_widths(spec: ArchSpec, factor: float) -> ArchSpec:
    """Every width times `factor`, rounded to a multiple of 4 (at least 4), as the space does."""
    return sw.map_widths(spec, lambda value: max(4, round(value * factor / 4) * 4))


class Runner:
    """One executable (narrow or host) and a train state of the narrow candidate on it."""

    def __init__(self, name, narrow, host, mesh, batch, hyper, eval_batch):
        self.name, self.batch, self.hyper = name, batch, hyper
        narrow_model = build_model(narrow, rngs=nnx.Rngs(0))
        if host is None:
            model, key = narrow_model, ("bench-narrow", narrow)
        else:
            layout = sw.width_layout(narrow, host)
            model = sw.build_host_model(host, layout.skeleton, rngs=nnx.Rngs(0))
            key = ("bench-host", layout.skeleton.key, host)
        self.fns = StepFunctions.for_model(model, key=key, settings=StepSettings(), mesh=mesh)
        state = StepFunctions.for_model(
            narrow_model, key=("bench-narrow", narrow), settings=StepSettings(), mesh=mesh
        ).init_state(narrow_model)
        if host is not None:
            state = sw.embed_train_state(state, layout)
        self.state = jax.device_put(state, parallel.replicated(mesh))
        self.flops = count_cost(narrow if host is None else host).flops
        self.train, self.train_compile_s = self.fns.compile_train(self.state, batch, hyper)
        _, self.eval_compile_s = self.fns.compile_eval(
            self.state.params, self.state.model_state, eval_batch
        )
        self.windows: list[float] = []

    def time_window(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, _ = self.train(self.state, self.batch, self.hyper)
        jax.block_until_ready(self.state.step)
        self.windows.append((time.perf_counter() - start) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--narrow", type=float, default=0.5, help="candidate width factor")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per executable")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--search-dir", type=Path, default=Path("runs/shared_executables_bench"))
    parser.add_argument(
        "--cache-check", action="store_true", help="only: compile cold vs warm across processes"
    )
    parser.add_argument("--cache-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-min-compile-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_child is not None:
        cache_child(args.cache_child, args.cache_workdir, args.cache_min_compile_s)
        return
    if args.cache_check:
        rows = cache_check(args.search_dir / "cache_check")
        if args.json:
            args.json.write_text(json.dumps({"cache_check": rows}))
        return

    prototype = presets.load_spec(PROTOTYPE)
    narrow = scale_widths(prototype, args.narrow)
    hosts = {
        "host = prototype (1.0x)": prototype,
        "host = space max (1.5x)": scale_widths(prototype, 1.5),
    }
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    size = prototype.input_size
    batch = parallel.shard_batch(
        {
            "image": rng.random((args.batch, size, size, 3), dtype=np.float32),
            "label": rng.integers(0, 3, args.batch).astype(np.int32),
        },
        mesh,
    )
    eval_batch = parallel.shard_batch(
        {
            "image": np.zeros((args.batch, size, size, 3), np.float32),
            "label": np.zeros(args.batch, np.int32),
            "mask": np.ones(args.batch, bool),
        },
        mesh,
    )
    hyper = jax.device_put(
        Hyper.create(learning_rate=3e-3, weight_decay=0.0, class_weights=np.ones(3), seed=0),
        parallel.replicated(mesh),
    )
    # A throwaway compile first: the first one in a process pays one-time costs.
    Runner("warm-up", scale_widths(prototype, 0.25), None, mesh, batch, hyper, eval_batch)
    runners = [
        Runner(f"narrow ({args.narrow}x) exact", narrow, None, mesh, batch, hyper, eval_batch)
    ]
    runners += [Runner(n, narrow, h, mesh, batch, hyper, eval_batch) for n, h in hosts.items()]
    for runner in runners:
        runner.time_window(2)  # warm the executable
        runner.windows.clear()
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for runner in runners:
            runner.time_window(args.steps)

    base = runners[0]
    base_step = statistics.median(base.windows)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"batch {args.batch} x {size} px, narrow {narrow.summary()}"
    )
    columns = ("train compile s", "eval compile s", "step ms", "step ratio", "FLOPs ratio")
    header = f"{'executable':28s} " + " ".join(f"{c:>15s}" for c in columns)
    print(header)
    rows = []
    for r in runners:
        step = statistics.median(r.windows)
        row = {
            "executable": r.name,
            "train_compile_s": round(r.train_compile_s, 2),
            "eval_compile_s": round(r.eval_compile_s, 2),
            "step_ms": round(step * 1e3, 2),
            "step_ratio": round(step / base_step, 2),
            "flops_ratio": round(r.flops / base.flops, 2),
        }
        rows.append(row)
        values = [v for k, v in row.items() if k != "executable"]
        print(f"{r.name:28s} " + " ".join(f"{v:15.2f}" for v in values))
    if args.json:
        plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"rows": rows, "args": plain_args}))


EXPERIMENT = "experiments/quickstart.yaml"


def cache_child(cache_dir: Path, workdir: Path, min_compile_s: float | None) -> None:
    """One worker-like process: trains one quickstart candidate (the prototype with halved
    widths, 10 steps) through `TrainingEvaluator` with the search's compile cache at
    `cache_dir`; prints its compile seconds and JAX's persistent-cache events as JSON."""
    from search.execution.evaluation import EvalRequest
    from search.execution.training import TrainingEvaluator, load_experiment, load_prototype

    counts: dict[str, float] = {}

    def count(event: str, *_: object, **__: object) -> None:
        counts[event.rsplit("/", 1)[-1]] = counts.get(event.rsplit("/", 1)[-1], 0) + 1

    def seconds(event: str, duration: float, *_: object, **__: object) -> None:
        name = event.rsplit("/", 1)[-1]
        counts[name] = counts.get(name, 0.0) + duration

    jax.monitoring.register_event_listener(count)
    jax.monitoring.register_event_duration_secs_listener(seconds)
    if min_compile_s is not None:  # the environment: search workers keep it
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_s)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    overrides = (f"compile_cache_dir={cache_dir}", "search.executables=exact")
    experiment = load_experiment(EXPERIMENT, overrides)
    evaluator = TrainingEvaluator.from_experiment(experiment)
    spec = scale_widths(load_prototype(experiment), 0.5)
    request = EvalRequest(spec=spec, steps=10, workdir=workdir / "trials/0", init_from=None, rung=0)
    result = evaluator.train(request)
    events = [json.loads(line) for line in (workdir / "trials/0/metrics.jsonl").open()]
    compile_event = next(e for e in events if e["event"] == "compile")
    print(
        json.dumps(
            {
                "compile_s": round(result.compile_s, 3),
                "train_step_s": compile_event["train_step_s"],
                "eval_step_s": compile_event["eval_step_s"],
                "cache_hits": counts.get("cache_hits", 0),
                "cache_misses": counts.get("cache_misses", 0),
                "compile_time_saved_s": round(counts.get("compile_time_saved_sec", 0.0), 3),
                "cache_files": len(list(cache_dir.iterdir())),
            }
        )
    )


def cache_check(root: Path) -> list[dict]:
    """Two processes, one after the other, train the same candidate on one compile cache:
    the second finds what the first wrote. With JAX's default threshold (only compiles of
    >= 1 s are written) and with every compile written (threshold 0)."""
    rows = []
    print("\npersistent compile cache across processes (same candidate, same cache dir)")
    print(f"{'min compile s':>13s} {'process':>8s} {'compile s':>10s} {'train step s':>13s} "
          f"{'eval steps s':>13s} {'hits':>5s} {'misses':>7s} {'cache files':>12s}")  # fmt: skip
    for threshold in (1.0, 0.0):  # JAX's default; what search workers set
        base = root / f"threshold_{threshold}"
        shutil.rmtree(base, ignore_errors=True)
        for process in ("cold", "warm"):
            command = [
                sys.executable, __file__, "--cache-child", str(base / "cache"),
                "--cache-workdir", str(base / process), "--cache-min-compile-s", str(threshold),
            ]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = {"min_compile_s": threshold, "process": process}
            row |= json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{row['min_compile_s']:13g} {process:>8s} {row['compile_s']:10.2f} "
                f"{row['train_step_s']:13.2f} {row['eval_step_s']:13.2f} "
                f"{row['cache_hits']:5.0f} {row['cache_misses']:7.0f} {row['cache_files']:12d}"
            )
    return rows


if __name__ == "__main__":
    main()
