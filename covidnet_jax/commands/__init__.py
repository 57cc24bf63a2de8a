"""Command-line subcommands of the library (arch, data, train, evaluate, predict).

Each module exposes `register(subparsers)`, which adds its subcommands; every subcommand
sets `func(args) -> int` on its parser. Modules here stay thin: parse, validate, call one
library function, print. The `covidnet` entry point (`search/cli.py`) assembles them.
"""
