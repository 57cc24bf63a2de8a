"""Training throughput: the library's jitted train step against an eager PyTorch twin.

Both sides train the same PEPX network (a preset, `covidnet-c` by default, built from the
same `ArchSpec`; the twin's parameter count is checked against the JAX model's) with the same
optimizer (Adam, lr 2e-4) and softmax cross-entropy on the same random batch, in float32 on
the CPU, PyTorch in channels-last. For each (resolution, batch) it reports images/s of a full
training step (forward, backward, optimizer update), the JAX/PyTorch ratio, JAX's compile
time, and the fraction of the CPU's fp32 peak, measured in the same run with a large matmul.
Each framework runs alone in a fresh process per size (JAX first, then PyTorch), under the
malloc setting the `covidnet` command uses (`covidnet_jax.hostmem`: tcmalloc where the system
has it, else glibc with transparent huge pages; `COVIDNET_MALLOC=hugepages|off` to compare).

PyTorch is an optional extra (`pip install torch==2.13.0`, the CPU build); without it, or
with `--no-torch`, only JAX runs. `--device gpu` runs both on the first GPU (PyTorch needs a
CUDA build there), with TF32 allowed in PyTorch's matmuls and convs as it is in JAX's default
float32 precision.

    python bench/train_throughput.py                       # 64 px x 32 and 224 px x 8
    python bench/train_throughput.py --sizes 224:8 --steps 5 --json out.json
    python bench/train_throughput.py --device gpu --sizes 64:32,224:8,224:64

Results and what was tried are recorded in bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidnet_jax import hostmem


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64:32,224:8' -> [(64, 32), (224, 8)] (resolution, batch)."""
    sizes = []
    for item in text.split(","):
        res, _, batch = item.partition(":")
        sizes.append((int(res), int(batch)))
    return sizes


def time_steps(step: Callable[[], Any], sync: Callable[[Any], None], steps: int) -> float:
    """Seconds for `steps` calls of `step`, synchronised at the end."""
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    sync(out)
    return time.perf_counter() - start


# -- JAX ------------------------------------------------------------------------------------


def use_native_convs() -> None:
    """Makes `blocks.LayerConfig.conv` build plain `nnx.Conv` layers (the pre-fix baseline).

    The library's `conv.Conv` lowers depthwise convs to shifted multiply-adds and 1x1 convs to
    matmuls; `nnx.Conv` has the same parameter names, shapes and initialisation, so the two
    are compared on identical weights.
    """
    import jax.numpy as jnp
    from flax import nnx

    from covidnet_jax import blocks

    def conv(self, in_channels, out_channels, *, kernel_size, stride=1, groups=1, use_bias, rngs):
        return nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(kernel_size, kernel_size),
            strides=(stride, stride),
            padding="SAME",
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=blocks._CONV_INIT,
            rngs=rngs,
        )

    blocks.LayerConfig.conv = conv


def matmul_peak_jax(device: Any, n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large matmul on `device` (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    b = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = min(
        time_steps(lambda: mm(a, b), lambda o: o.block_until_ready(), 1) for _ in range(repeats)
    )
    return 2 * n**3 / best


class JaxBench:
    """The library's own train step (covidnet_jax.steps) on one device."""

    def __init__(self, spec: Any, batch: int, device: Any, dtype: str) -> None:
        import jax
        from flax import nnx

        from covidnet_jax import parallel
        from covidnet_jax.models import build_model
        from covidnet_jax.steps import Hyper, StepFunctions, StepSettings

        compute = "bfloat16" if dtype == "bfloat16" else "float32"
        jnp_dtype = jax.numpy.bfloat16 if compute == "bfloat16" else jax.numpy.float32
        model = build_model(spec, rngs=nnx.Rngs(0), dtype=jnp_dtype)
        mesh = parallel.make_mesh([device])
        settings = StepSettings(compute_dtype=compute)
        self.fns = StepFunctions.for_model(
            model, key=(spec.content_hash(), compute, "bench"), settings=settings, mesh=mesh
        )
        self.params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        rng = np.random.default_rng(0)
        size = spec.input_size
        host = {
            "image": rng.random((batch, size, size, spec.input_channels), dtype=np.float32),
            "label": rng.integers(0, spec.num_classes, batch).astype(np.int32),
        }
        self.batch = parallel.shard_batch(host, mesh)
        self.hyper = jax.device_put(
            Hyper.create(
                learning_rate=2e-4,
                weight_decay=0.0,
                class_weights=np.ones(spec.num_classes),
                seed=0,
            ),
            parallel.replicated(mesh),
        )
        self.state = self.fns.init_state(model)
        self.step, self.compile_s = self.fns.compile_train(self.state, self.batch, self.hyper)
        cost = self.step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def run(self, steps: int) -> float:
        def one():
            self.state, metrics = self.step(self.state, self.batch, self.hyper)
            return metrics

        return time_steps(one, lambda m: m["loss"].block_until_ready(), steps)


# -- PyTorch twin ---------------------------------------------------------------------------


def build_torch_twin(spec: Any):
    """The PEPX network of `spec` in PyTorch, wired like covidnet_jax.blocks."""
    import torch
    from torch import nn

    acts = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU}
    use_norm = spec.norm == "batchnorm"

    def conv_norm_act(cin, cout, k, stride=1, groups=1, act=True):
        layers = [
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=not use_norm)
        ]
        if use_norm:
            layers.append(nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))
        if act:
            layers.append(acts[spec.activation]())
        return nn.Sequential(*layers)

    def pepx(cin, m, stride):
        return nn.Sequential(
            conv_norm_act(cin, m.proj1, 1),
            conv_norm_act(m.proj1, m.expand, 1),
            conv_norm_act(m.expand, m.expand, m.kernel_size, stride, groups=m.expand),
            conv_norm_act(m.expand, m.proj2, 1),
            conv_norm_act(m.proj2, m.out, 1),
        )

    class Stage(nn.Module):
        def __init__(self, cin, stage):
            super().__init__()
            self.dense = spec.connectivity == "dense"
            self.residual = spec.connectivity == "residual"
            self.side = (
                conv_norm_act(cin, stage.width, 1, stage.stride, act=False) if self.dense else None
            )
            mods, shortcuts, c = [], [], cin
            for k, m in enumerate(stage.modules):
                s = stage.stride if k == 0 else 1
                mods.append(pepx(c, m, s))
                proj = self.residual and (s != 1 or c != m.out)
                shortcuts.append(
                    conv_norm_act(c, m.out, 1, s, act=False) if proj else nn.Identity()
                )
                c = m.out
            self.mods = nn.ModuleList(mods)
            self.shortcuts = nn.ModuleList(shortcuts)

        def forward(self, x):
            if self.dense:
                acc = self.side(x) + self.mods[0](x)
                for m in self.mods[1:]:
                    acc = acc + m(acc)
                return acc
            for m, sc in zip(self.mods, self.shortcuts, strict=True):
                x = m(x) + sc(x) if self.residual else m(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            st = spec.stem
            self.stem = conv_norm_act(spec.input_channels, st.channels, st.kernel_size, st.stride)
            self.pool = (
                nn.MaxPool2d(st.pool_size, st.pool_stride) if st.pool_size else nn.Identity()
            )
            stages, c = [], st.channels
            for stage in spec.stages:
                stages.append(Stage(c, stage))
                c = stage.width
            self.stages = nn.Sequential(*stages)
            size = spec.input_size
            for s in [st.stride, st.pool_stride if st.pool_size else 1] + [
                g.stride for g in spec.stages
            ]:
                size = -(-size // s)
            features = c if spec.head.pool == "avg" else c * size * size
            widths = [features, *spec.head.hidden, spec.num_classes]
            head: list[nn.Module] = [nn.Flatten()]
            for i in range(len(widths) - 1):
                if i:
                    head.append(acts[spec.activation]())
                head.append(nn.Linear(widths[i], widths[i + 1]))
            self.avg = spec.head.pool == "avg"
            self.head = nn.Sequential(*head)

        def forward(self, x):
            x = self.stages(self.pool(self.stem(x)))
            x = x.mean(dim=(2, 3)) if self.avg else x
            return self.head(x)

    return Net().to(memory_format=torch.channels_last)


class TorchBench:
    """Eager PyTorch: channels-last, Adam (foreach), cross-entropy."""

    def __init__(self, spec: Any, batch: int, device: str = "cpu") -> None:
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.net = build_torch_twin(spec).to(device)
        self.net.train()
        self.params = sum(p.numel() for p in self.net.parameters())
        self.opt = torch.optim.Adam(self.net.parameters(), lr=2e-4)
        size = spec.input_size
        self.x = torch.rand(batch, spec.input_channels, size, size).to(
            device, memory_format=torch.channels_last
        )
        self.y = torch.randint(0, spec.num_classes, (batch,)).to(device)

    def run(self, steps: int) -> float:
        torch = self.torch

        def one():
            self.opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
            loss.backward()
            self.opt.step()
            return loss

        return time_steps(one, lambda loss: float(loss.detach()), steps)


def matmul_peak_torch(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large matmul in PyTorch (best of `repeats`)."""
    import torch

    a = torch.ones(n, n, device=device)
    b = torch.ones(n, n, device=device)
    a @ b
    sync = (lambda o: float(o[0, 0])) if device != "cpu" else (lambda o: None)
    best = min(time_steps(lambda: a @ b, sync, 1) for _ in range(repeats))
    return 2 * n**3 / best


# -- one framework per process ----------------------------------------------------------------


def measure_jax(arch: str, res: int, batch: int, steps: int, repeats: int, opts: dict) -> dict:
    """In a child process: JAX's matmul peak, compile time and timed repeats."""
    if opts["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from covidnet_jax.presets import load_spec

    device = jax.devices(opts["device"])[0]
    if opts["convs"] == "native":
        use_native_convs()
    peak = matmul_peak_jax(device)
    jb = JaxBench(load_spec(arch).with_input_size(res), batch, device, opts["dtype"])
    jb.run(2)  # warm-up (first executions, allocator)
    return {
        "device": str(device),
        "jax": jax.__version__,
        "peak": peak,
        "params": jb.params,
        "compile_s": jb.compile_s,
        "xla_flops": jb.xla_flops,
        "step_s": [jb.run(steps) for _ in range(repeats)],
    }


def usable_cpus() -> int:
    """The cores this process may run on (a `taskset` limit counts); `os.cpu_count()` counts
    the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def measure_torch(arch: str, res: int, batch: int, steps: int, repeats: int, opts: dict) -> dict:
    """In a child process: PyTorch's matmul peak and timed repeats of the twin."""
    import torch

    from covidnet_jax.presets import load_spec

    device = "cuda" if opts["device"] == "gpu" else "cpu"
    if device == "cuda":
        # JAX's default float32 precision on a GPU runs matmuls and convs in TF32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(usable_cpus())
    peak = matmul_peak_torch(device)
    tb = TorchBench(load_spec(arch).with_input_size(res), batch, device)
    tb.run(2)
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "peak": peak,
        "params": tb.params,
        "step_s": [tb.run(steps) for _ in range(repeats)],
    }


def in_child(fn: Callable[..., dict], *args: Any) -> dict:
    """Runs `fn(*args)` in a fresh spawned process and returns its result.

    Each framework runs alone in its process: in one process, PyTorch's OpenMP threads and
    XLA's thread pool were both resident, and JAX's step measured 15% slower at 64 px
    (62.0 against 72.6 images/s) than with PyTorch not loaded.
    """
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="covidnet-c", help="preset or spec JSON (default covidnet-c)"
    )
    parser.add_argument(
        "--sizes", default="64:32,224:8", help="RES:BATCH list (default 64:32,224:8)"
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps per repeat (default: auto)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    parser.add_argument(
        "--convs",
        choices=("native", "fast"),
        default="fast",
        help="fast: the library's conv.Conv (depthwise convs as shifted multiply-adds, 1x1 "
        "convs as matmuls); native: nnx.Conv everywhere (the baseline before the fix)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if argv is None:
        # The malloc setting `covidnet` runs under (tcmalloc, else huge pages, for XLA's
        # per-step buffers), for both frameworks alike; COVIDNET_MALLOC chooses.
        hostmem.reexec_tuned([str(Path(__file__).resolve()), *sys.argv[1:]])

    from covidnet_jax.cost import count_cost
    from covidnet_jax.presets import load_spec

    torch_ok = not args.no_torch
    if torch_ok and importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed: the twin is skipped (pip install torch==2.13.0)")
        torch_ok = False

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "load_average": load,
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "arch": args.arch,
        "dtype": args.dtype,
        "convs": args.convs,
    }
    print(json.dumps(header))
    if torch_ok and load is not None and load[0] > 1.0:
        # Measured: at load 2-8 PyTorch's eager step slowed 5-11x, JAX's under 2x, which
        # turned parity on an idle machine into "3-5x faster" (bench/README.md).
        print(
            f"WARNING: load average {load[0]:.1f} at the start: other processes skew the "
            "JAX / PyTorch ratio (PyTorch suffers far more); measure on an idle machine",
            file=sys.stderr,
        )
    opts = {"device": args.device, "convs": args.convs, "dtype": args.dtype}
    rows = []
    peak = 0.0
    for res, batch in parse_sizes(args.sizes):
        macs = count_cost(load_spec(args.arch).with_input_size(res)).macs
        train_flops = 6.0 * macs * batch  # forward 2 MACs, backward twice the forward
        steps = args.steps or max(2, min(20, int(2e11 / train_flops)))
        size = (args.arch, res, batch, steps, args.repeats, opts)
        jx = in_child(measure_jax, *size)
        tr = in_child(measure_torch, *size) if torch_ok else None
        if tr is not None and tr["params"] != jx["params"]:
            raise SystemExit(
                f"twin mismatch: torch {tr['params']} vs jax {jx['params']} parameters"
            )
        peak = max(peak, jx["peak"], tr["peak"] if tr else 0.0)
        jax_ips = steps * batch / statistics.median(jx["step_s"])
        torch_ips = steps * batch / statistics.median(tr["step_s"]) if tr else None
        row = {
            "resolution": res,
            "batch": batch,
            "steps": steps,
            "device": jx["device"],
            "params": jx["params"],
            "gmacs_per_image": macs / 1e9,
            "jax_images_per_s": jax_ips,
            "torch_images_per_s": torch_ips,
            "ratio": jax_ips / torch_ips if torch_ips else None,
            "ratio_best": min(tr["step_s"]) / min(jx["step_s"]) if tr else None,
            "jax_compile_s": jx["compile_s"],
            "jax_fraction_of_peak": jax_ips / batch * train_flops / peak,
            "torch_fraction_of_peak": torch_ips / batch * train_flops / peak if torch_ips else None,
            "matmul_peak_gflops_jax": jx["peak"] / 1e9,
            "matmul_peak_gflops_torch": tr["peak"] / 1e9 if tr else None,
            "xla_flops_per_step": jx["xla_flops"],
            "jax_step_s": sorted(jx["step_s"]),
            "torch_step_s": sorted(tr["step_s"]) if tr else [],
            "torch_device": tr["device"] if tr else None,
            "versions": {"jax": jx["jax"], "torch": tr["torch"] if tr else None},
        }
        rows.append(row)
        print(json.dumps(row))

    print()
    print(
        f"{args.arch}, {args.dtype}, {args.convs} convs, {rows[0]['device'] if rows else '-'}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s; LD_PRELOAD={header['ld_preload'] or '-'}; "
        f"GLIBC_TUNABLES={header['glibc_tunables'] or '-'}"
    )
    print(
        f"{'res':>4} {'batch':>5} {'JAX img/s':>10} {'torch img/s':>12} {'ratio':>6} "
        f"{'compile s':>9} {'JAX %peak':>9} {'torch %peak':>11}"
    )
    for r in rows:
        t = f"{r['torch_images_per_s']:.1f}" if r["torch_images_per_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        tp = f"{100 * r['torch_fraction_of_peak']:.1f}" if r["torch_fraction_of_peak"] else "-"
        print(
            f"{r['resolution']:>4} {r['batch']:>5} {r['jax_images_per_s']:>10.1f} {t:>12} "
            f"{ratio:>6} {r['jax_compile_s']:>9.1f} {100 * r['jax_fraction_of_peak']:>9.1f} "
            f"{tp:>11}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
