"""The `covidnet` command: assembles subcommands from the library and the search layer.

This is the only module that sees both `covidnet_jax` and `search`. It parses, dispatches,
and turns `UserError`s, and writes the disk refused (`covidnet_jax.disk.disk_failure`:
permission denied, read-only file system, no space left), into one-line messages with exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from covidnet_jax import hostmem
from covidnet_jax.disk import (
    disk_failure,
    quiet_disk_failures,
    silence_abandoned_writes,
)
from covidnet_jax.errors import UserError

# Modules exposing `register(subparsers)`, in the order they appear in `--help`.
_COMMAND_MODULES: tuple[str, ...] = (
    "covidnet_jax.commands.arch",
    "covidnet_jax.commands.data",
    "covidnet_jax.commands.train",
    "search.commands.search",
    "search.commands.compare",
    "search.commands.dashboard",
    "search.commands.export",
    "search.commands.explain",
)

_EPILOG = """\
typical session:
  covidnet data synth --out data/synth          # write the synthetic COVIDx-format data set
  covidnet arch show covidnet-b                 # layer table, params, MACs of a preset
  covidnet train --config experiments/smoke.yaml
  covidnet search --config experiments/quickstart.yaml --workdir runs/quickstart
  covidnet compare runs/quickstart

Run `covidnet COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidnet",
        description="Machine-driven design exploration of COVID-Net style networks in JAX.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with quiet_disk_failures():
            return int(args.func(args) or 0)
    except UserError as err:
        print(f"covidnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covidnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # A write the disk refused (permissions, read-only, full), possibly wrapped by a
        # library's background thread: one line. Anything else is a bug: its traceback.
        message = disk_failure(err)
        if message is None:
            raise
        print(f"covidnet {args.command}: error: {message}", file=sys.stderr)
        silence_abandoned_writes()
        return 2


def entry() -> int:
    """The `covidnet` console script: `main` in a process whose malloc reuses XLA's large
    per-step buffers (tcmalloc, else huge pages; re-executes once; see hostmem)."""
    # The script itself again (not `-m search.cli`, which would look in the working
    # directory first and could import a user's own `search` package).
    try:
        hostmem.reexec_tuned(sys.argv)
    except ValueError as err:
        print(f"covidnet: error: {err}", file=sys.stderr)
        return 2
    # For the whole process: futures of a failed checkpoint write are reported at exit.
    with quiet_disk_failures(restore=False):
        return main()


if __name__ == "__main__":
    with quiet_disk_failures(restore=False):
        sys.exit(main())
