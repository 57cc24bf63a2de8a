"""`covidnet explain`: where the model looks, as a heatmap over the image.

    covidnet explain --model runs/quickstart/export chest.png
        # -> runs/quickstart/export/explain/chest_gradcam.png
    covidnet explain --model EXPORT chest.png --out heat.png --class COVID-19
    covidnet explain --model EXPORT chest.png --method both     # + .../explain/chest_ig.png

Grad-CAM weights the feature maps of the last PEPX stage by the gradient of the class score;
integrated gradients attributes the score to pixels along the path from a black image. The
overlay PNG has the size of IMAGE: preprocessing's crop is undone, and the rows it dropped
stay uncoloured. Heatmaps show where the score is sensitive, not why a finding is present.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from covidnet_jax.commands.train import add_max_image_pixels, check_max_image_pixels
from covidnet_jax.disk import ensure_writable
from covidnet_jax.errors import UserError


class ExplainError(UserError):
    """Bad arguments to `covidnet explain`."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `explain` subcommand."""
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM / integrated-gradients heatmap of an image, as an overlay PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--model", required=True, metavar="EXPORT", help="an export folder")
    parser.add_argument(
        "--out",
        metavar="PNG",
        help="overlay file (default: EXPORT/explain/IMAGE_STEM_gradcam.png, beside the model)",
    )
    parser.add_argument(
        "--class", dest="class_name", metavar="NAME", help="class to explain (default: predicted)"
    )
    parser.add_argument(
        "--method",
        choices=("gradcam", "ig", "both"),
        default="gradcam",
        help="Grad-CAM (default), integrated gradients, or both (the second file gets _ig)",
    )
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients path points")
    add_max_image_pixels(parser)
    parser.set_defaults(func=_run_explain)


def _outputs(image: Path, out: str | None, method: str, model: Path) -> dict[str, Path]:
    """Method -> overlay file: `--out` for the first map (`_ig` added for the second), else
    `<model>/explain/<image stem>_<method>.png` (never the current directory, where
    overlays of many images would pile up unnoticed)."""
    if out is not None and not out.lower().endswith(".png"):
        raise ExplainError(f"--out {out}: expected a .png file name")
    first = "ig" if method == "ig" else "gradcam"
    folder = model / "explain"
    path = Path(out) if out else folder / f"{image.stem}_{first}.png"
    if method != "both":
        return {first: path}
    return {
        "gradcam": path,
        "ig": path.with_name(f"{path.stem}_ig.png") if out else folder / f"{image.stem}_ig.png",
    }


def _run_explain(args: argparse.Namespace) -> int:
    from covidnet_jax import explain
    from covidnet_jax.data.preprocess import decode_image
    from covidnet_jax.export import load_export

    if args.steps < 1:
        raise ExplainError(f"--steps must be >= 1, got {args.steps}")
    max_pixels = check_max_image_pixels(args.max_image_pixels)
    image_path = Path(args.image)
    outputs = _outputs(image_path, args.out, args.method, Path(args.model))
    for folder in {out.parent for out in outputs.values()}:
        ensure_writable(folder, "the overlay folder (--out)")
    loaded = load_export(args.model)
    original_HxW = decode_image(  # DataError naming the file if unreadable or too large
        image_path,
        max_pixels=max_pixels,
        limit_name="--max-image-pixels",
    )
    target = None
    if args.class_name is not None:
        if args.class_name not in loaded.class_names:
            raise ExplainError(
                f"--class {args.class_name!r}: not a class of this model; expected one of "
                f"{', '.join(loaded.class_names)}"
            )
        target = loaded.class_names.index(args.class_name)
    images_1xHxWxC = loaded.preprocess(original_HxW)[None]
    probs = loaded.predict_batch(images_1xHxWxC)[0]
    model = loaded.restore_model()
    predicted = loaded.class_names[int(np.argmax(probs))]
    print(
        f"{image_path}: predicted {predicted} ({probs.max():.4f}); "
        + ", ".join(f"{name} {p:.4f}" for name, p in zip(loaded.class_names, probs, strict=True))
    )
    for method, out in outputs.items():
        if method == "gradcam":
            heat, explained = explain.grad_cam(model, images_1xHxWxC, target=target)
        else:
            heat, explained = explain.integrated_gradients(
                model, images_1xHxWxC, target=target, steps=args.steps
            )
        overlay_heat = explain.heatmap_to_original(heat[0], original_HxW.shape)
        explain.save_overlay_png(original_HxW, overlay_heat, out)
        name = "Grad-CAM" if method == "gradcam" else "integrated gradients"
        print(f"{name} of {loaded.class_names[int(explained[0])]}: {out}")
    return 0
