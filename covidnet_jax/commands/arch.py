"""`covidnet arch`: list presets, show a spec's layers and cost, print spec JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from covidnet_jax.arch import AnySpec
from covidnet_jax.cost import CostReport, activation_bytes, count_cost
from covidnet_jax.presets import get_preset, list_presets, load_spec

_ARCH_EPILOG = """\
examples:
  covidnet arch list                                  # presets with params and MACs
  covidnet arch show covidnet-b                       # per-layer table and totals
  covidnet arch show resnet50 --num-classes 1000      # the ImageNet ResNet-50
  covidnet arch show covidnet-c --input-size 224 --json
  covidnet arch spec tiny > my_spec.json              # start a spec file from a preset
  covidnet arch show my_spec.json                     # ... and check it after editing

A spec file is the JSON `covidnet arch spec` prints; its "type" is "pepx", "resnet" or "vgg".
MACs count conv and FC multiply-accumulates (zero padding included), as published figures do.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `arch list`, `arch show` and `arch spec` to the `covidnet` command."""
    arch = subparsers.add_parser(
        "arch",
        help="list presets, show a spec's layers, params and MACs",
        description="Architecture specs: presets, per-layer cost tables, spec JSON.",
        epilog=_ARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = arch.add_subparsers(dest="arch_command", metavar="SUBCOMMAND")
    arch.set_defaults(func=lambda _args: _print_help(arch))

    listing = commands.add_parser(
        "list",
        help="the registered presets with params and MACs",
        description="Lists the registered presets: name, input size, params, MACs, summary.",
    )
    listing.set_defaults(func=_run_list)

    show = commands.add_parser(
        "show",
        help="per-layer table (output shape, params, MACs) and totals",
        description="Prints a spec's layers (name, kind, output shape, params, MACs) and "
        "totals, or one JSON object with --json.",
        epilog=_ARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_spec_arguments(show)
    show.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="B",
        help="batch size for the training activation-memory estimate (default 1)",
    )
    show.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: params, macs, flops, activation_bytes, content_hash, "
        "summary, spec, layers",
    )
    show.set_defaults(func=_run_show)

    spec = commands.add_parser(
        "spec",
        help="print a spec as JSON (a starting point for a spec file)",
        description="Prints the spec JSON of a preset or spec file, after --input-size and "
        "--num-classes.",
    )
    _add_spec_arguments(spec)
    spec.set_defaults(func=_run_spec)


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME|SPEC.json", help="a preset name or a spec file")
    parser.add_argument(
        "--input-size", type=int, metavar="N", help="input resolution N x N (default: the spec's)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="K",
        help="number of classes (default: the spec's; presets have the 3 COVIDx classes)",
    )


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _resolve(args: argparse.Namespace) -> AnySpec:
    spec = load_spec(args.spec)
    if args.input_size is not None:
        spec = spec.with_input_size(args.input_size)
    if args.num_classes is not None:
        spec = spec.with_num_classes(args.num_classes)
    return spec


def _run_list(args: argparse.Namespace) -> int:
    rows = []
    for name in list_presets():
        spec = get_preset(name)
        report = count_cost(spec)
        rows.append((name, f"{spec.input_size}", f"{report.params:,}", _giga(report.macs)))
    header = ("name", "input", "params", "MACs (G)")
    _print_table(header, rows, align_right=(False, True, True, True))
    return 0


def _run_spec(args: argparse.Namespace) -> int:
    print(_resolve(args).to_json())
    return 0


def _run_show(args: argparse.Namespace) -> int:
    spec = _resolve(args)
    report = count_cost(spec)
    memory = activation_bytes(spec, args.batch_size)
    if args.json:
        print(json.dumps(_show_json(spec, report, memory, args.batch_size), indent=2))
        return 0
    rows = [
        (
            layer.name,
            layer.kind,
            "x".join(map(str, layer.output_shape)),
            f"{layer.params:,}",
            f"{layer.macs:,}",
        )
        for layer in report.layers
    ]
    rows.append(("total", "", "", f"{report.params:,}", f"{report.macs:,}"))
    _print_table(
        ("layer", "kind", "output", "params", "MACs"),
        rows,
        align_right=(False, False, True, True, True),
    )
    print()
    print(spec.summary())
    print(
        f"params {_scaled(report.params)} | MACs {_scaled(report.macs)} | "
        f"XLA-style flops {_scaled(report.flops)} | hash {spec.content_hash()}"
    )
    print(
        f"training activations at batch {args.batch_size} (float32, estimate): "
        f"{memory / 2**20:,.1f} MiB"
    )
    return 0


def _show_json(spec: AnySpec, report: CostReport, memory: int, batch_size: int) -> dict[str, Any]:
    return {
        "params": report.params,
        "macs": report.macs,
        "flops": report.flops,
        "activation_bytes": memory,
        "batch_size": batch_size,
        "content_hash": spec.content_hash(),
        "summary": spec.summary(),
        "spec": spec.to_dict(),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "output_shape": list(layer.output_shape),
                "params": layer.params,
                "macs": layer.macs,
            }
            for layer in report.layers
        ],
    }


def _scaled(n: int) -> str:
    """4251 -> "4,251 (4.25 k)", 6_580_000_000 -> "6,580,000,000 (6.58 G)"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.3g} {unit})"
    return f"{n:,}"


def _giga(n: int) -> str:
    return f"{n / 1e9:.3f}"


def _print_table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], *, align_right: tuple[bool, ...]
) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, align_right, strict=True)
        )
        print("  ".join(cells).rstrip())
