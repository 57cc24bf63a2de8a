"""Calibrates the synthetic data set: a linear model must stay well below a small CNN.

Writes the synthetic set (default settings unless --covidx-dir is given), loads it at 64 px
through `load_data`, then reports test accuracy of

1. logistic regression on raw pixels (scikit-learn, C chosen on the validation split),
2. a small plain CNN (3 conv layers, global average pooling) trained briefly with the
   training pipeline's augmentations and Adam,
3. the `tiny` PEPX preset of the model library at the same input, if the library is present.

The CNNs are written here in plain Flax NNX + Optax so the calibration does not depend on the
trainer. Every number in bench/README.md "Synthetic data calibration" comes from this script.

Usage:
    python bench/synth_calibration.py                       # default synthetic set, 3 seeds
    python bench/synth_calibration.py --data-seeds 0 1 --seeds 0 1 --no-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidnet_jax.data import DataConfig, load_data, write_synthetic_dataset


class SmallCNN(nnx.Module):
    """3 x [conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool] (16, 32, 64) -> GAP -> dense.

    About 24k parameters. BatchNorm momentum 0.9 (the library's BN_MOMENTUM): with 0.99 the
    running averages lag the weights after a few hundred Adam steps and eval-mode predictions
    collapse to one class (measured: 0.38 eval-mode vs 0.775 with batch statistics), which
    would calibrate the optimiser, not the data. Evaluation is always in eval mode.
    """

    def __init__(self, channels: int, classes: int, *, rngs: nnx.Rngs) -> None:
        widths = ((channels, 16), (16, 32), (32, 64))
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in widths])
        self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for _, b in widths])
        self.head = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = x_BxHxWxC
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.max_pool(jax.nn.relu(norm(conv(x))), (2, 2), strides=(2, 2))
        return self.head(x.mean(axis=(1, 2)))


def _build_tiny(channels: int, classes: int, size: int, *, rngs: nnx.Rngs) -> nnx.Module | None:
    try:
        from covidnet_jax.models import build_model
        from covidnet_jax.presets import get_preset
    except ImportError:
        return None
    spec = get_preset("tiny").with_input_size(size).with_num_classes(classes)
    spec = dataclasses.replace(spec, input_channels=channels)
    model = build_model(spec, rngs=rngs)
    model.train()
    return model


def train_and_test(
    model: nnx.Module, data, *, steps: int, batch: int, seed: int, lr: float
) -> float:
    """Trains `model` with Adam for `steps` and returns its test accuracy."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, image, label):
        def loss_fn(model):
            logits = model(image)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, image):
        return model(image).argmax(-1)

    @nnx.jit
    def refresh_statistics(model, image):
        model(image)  # train mode: BatchNorm running averages move towards these batches

    for _, b in zip(range(steps), data.train_batches(batch, seed=seed), strict=False):
        train_step(model, optimizer, jnp.asarray(b["image"]), jnp.asarray(b["label"]))
    # BatchNorm running averages lag weights that move fast under Adam; re-estimate them
    # with the final weights on 30 shuffled training batches (no parameter update), so that
    # eval mode measures the trained network rather than stale statistics
    for _, b in zip(range(30), data.train_batches(batch, seed=seed + 1000), strict=False):
        refresh_statistics(model, jnp.asarray(b["image"]))
    model.eval()  # BatchNorm running statistics
    correct = total = 0
    for b in data.eval_batches("test", 64):
        pred = np.asarray(predict(model, jnp.asarray(b["image"])))
        correct += int(np.sum((pred == b["label"]) & b["mask"]))
        total += int(b["mask"].sum())
    return correct / total


def logistic_regression(data) -> tuple[float, float]:
    """Test accuracy of logistic regression on raw pixels, C picked on validation."""
    from sklearn.linear_model import LogisticRegression

    def arrays(split):
        xs, ys = [], []
        for b in data.eval_batches(split, 256):
            xs.append(b["image"][b["mask"]].reshape(int(b["mask"].sum()), -1))
            ys.append(b["label"][b["mask"]])
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = arrays("train")
    x_va, y_va = arrays("validation")
    x_te, y_te = arrays("test")
    # standardised pixels (still a linear model on raw pixels): lbfgs converges in seconds
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    x_tr, x_va, x_te = ((x - mean) / std for x in (x_tr, x_va, x_te))
    best = (-1.0, 0.0)
    for c in (0.001, 0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=500).fit(x_tr, y_tr)
        best = max(best, (clf.score(x_va, y_va), c))
    clf = LogisticRegression(C=best[1], max_iter=500).fit(
        np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    )
    return clf.score(x_te, y_te), best[1]


def calibrate(args: argparse.Namespace, data_seed: int) -> None:
    """Logistic regression and the CNNs on one synthetic set (or --covidx-dir)."""
    with tempfile.TemporaryDirectory(prefix="synth-calib-") as tmp:
        _calibrate_in(args, data_seed, Path(tmp))


def _calibrate_in(args: argparse.Namespace, data_seed: int, tmp: Path) -> None:
    print(f"== data seed {data_seed}" if args.covidx_dir is None else f"== {args.covidx_dir}")
    covidx_dir = args.covidx_dir
    if covidx_dir is None:
        covidx_dir = tmp / "synth"
        started = time.perf_counter()
        kwargs = {"per_class": args.per_class} if args.per_class else {}
        summary = write_synthetic_dataset(covidx_dir, seed=data_seed, **kwargs)
        print(
            f"synth: {summary.settings} written in {time.perf_counter() - started:.1f} s; "
            f"train {summary.class_counts['train']}, test {summary.class_counts['test']}"
        )
    config = DataConfig(
        covidx_dir=str(covidx_dir),
        resolution=args.resolution,
        channels=1,
        cache_dir=str(tmp / "cache"),
    )
    data = load_data(config, seed=0)
    print(data.report.summary())

    started = time.perf_counter()
    acc, c = logistic_regression(data)
    print(
        f"logistic regression (raw pixels, C={c}): test accuracy {acc:.3f} "
        f"({time.perf_counter() - started:.1f} s)"
    )

    results: dict[str, list[float]] = {"small CNN": [], "tiny PEPX": []}
    for seed in args.seeds:
        started = time.perf_counter()
        model = SmallCNN(1, len(data.class_names), rngs=nnx.Rngs(seed))
        acc = train_and_test(model, data, steps=args.steps, batch=args.batch, seed=seed, lr=args.lr)
        results["small CNN"].append(acc)
        print(
            f"small CNN seed {seed}: test accuracy {acc:.3f} "
            f"({args.steps} steps x {args.batch}, {time.perf_counter() - started:.1f} s)"
        )
        if args.no_tiny:
            continue
        started = time.perf_counter()
        tiny = _build_tiny(1, len(data.class_names), args.resolution, rngs=nnx.Rngs(seed))
        if tiny is None:
            continue
        acc = train_and_test(tiny, data, steps=args.steps, batch=args.batch, seed=seed, lr=args.lr)
        results["tiny PEPX"].append(acc)
        print(
            f"tiny PEPX seed {seed}: test accuracy {acc:.3f} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    for name, accs in results.items():
        if accs:
            print(
                f"{name}: mean {np.mean(accs):.3f}, min {min(accs):.3f}, max {max(accs):.3f} "
                f"over init seeds {args.seeds}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--covidx-dir", default=None, help="default: write the synthetic set")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument(
        "--data-seeds", type=int, nargs="+", default=[0], help="seeds of the synthetic sets"
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny PEPX preset")
    args = parser.parse_args()

    if args.covidx_dir is not None and len(args.data_seeds) > 1:
        parser.error("--covidx-dir is one data set; give one --data-seeds value with it")
    for data_seed in args.data_seeds:
        calibrate(args, data_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
