"""Do the heatmaps fall on the lesions? Grad-CAM and integrated gradients vs random maps.

The synthetic data set knows where its lesions are (`masks/`). Over the images of a split
whose lesion mask is non-empty (pneumonia and COVID-19), each image's true class is
explained and scored two ways:

- pointing game: the hottest pixel of the map lies inside the lesion mask;
- mass inside the mask: the share of the map's total heat that falls on the lesion.

Random maps (uniform noise) hit as often as the lesion is large; a useful attribution must
clearly beat them. Results print as a table and go to a JSON file.

    python bench/explain_validation.py --model runs/quickstart/export --data data/synth
    python bench/explain_validation.py --workdir runs/smoke --data data/synth --limit 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from covidnet_jax.explain import load_lesion_set, localization_report


def _load_model(args: argparse.Namespace) -> tuple[nnx.Module, object, str]:
    if args.model:
        from covidnet_jax.arch import spec_from_json
        from covidnet_jax.export import load_export

        loaded = load_export(args.model)
        return loaded.restore_model(), spec_from_json(loaded.spec_json()), str(args.model)
    from covidnet_jax.evaluate import load_trained

    trained = load_trained(args.workdir)
    params, model_state = jax.device_get((trained.params, trained.model_state))
    model = nnx.merge(trained.fns.graphdef_eval, params, model_state)
    return model, trained.spec, f"{args.workdir} (step {trained.step})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an export folder (covidnet export)")
    source.add_argument("--workdir", help="a training workdir (its best checkpoint)")
    parser.add_argument("--data", required=True, help="the synthetic COVIDx folder with masks/")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--limit", type=int, help="score at most this many lesion images")
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--draws", type=int, default=200, help="random maps per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/explain_validation.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, spec, where = _load_model(args)
    lesions = load_lesion_set(
        args.data,
        resolution=spec.input_size,
        channels=spec.input_channels,
        class_names=tuple(spec.class_names),
        split=args.split,
        limit=args.limit,
    )
    report = localization_report(
        model, lesions, seed=args.seed, ig_steps=args.ig_steps, draws=args.draws
    )
    seconds = time.perf_counter() - start
    print(f"model: {where}  ({spec.summary()})")
    print(
        f"{len(lesions.paths)} {args.split} images with lesions, mean lesion share "
        f"{report.lesion_fraction:.3f}, model accuracy on them {report.accuracy:.3f}"
    )
    print(f"{'images':16s} {'map':24s} {'pointing game':>14s} {'mass in mask':>13s}")
    groups = [("all lesions", vars(report))]
    groups += [
        (f"{name} ({rates['random'].count})", rates) for name, rates in report.by_class.items()
    ]
    for group, rates in groups:
        for key, name in (
            ("grad_cam", "Grad-CAM (last stage)"),
            ("integrated_gradients", "integrated gradients"),
            ("random", "random (baseline)"),
        ):
            print(f"{group:16s} {name:24s} {rates[key].pointing:14.3f} {rates[key].mass:13.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": where,
        "spec": spec.summary(),
        "data": str(args.data),
        "split": args.split,
        "images": len(lesions.paths),
        "seconds": round(seconds, 1),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        **report.to_dict(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
