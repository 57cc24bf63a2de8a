"""`covidnet compare`: one leaderboard, plots and an offline HTML report across searches.

    covidnet compare runs/quickstart                       # writes runs/quickstart/compare/
    covidnet compare runs/a runs/b --out runs/a-vs-b
    covidnet compare runs/big --storage postgresql+psycopg2://user@host/db

The output folder gets comparison.csv and comparison.json (every candidate), pareto.png,
knobs.png, curves.png, progress.png (best so far against candidates and wall time),
importance.png (which genes matter), times.png (compile and train seconds) and report.html
(images embedded, leaderboard sortable by clicking a heading; opens without a network).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search.reporting.compare import CompareError, load_run, ranked
from search.reporting.compare_report import write_comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `compare` subcommand."""
    parser = subparsers.add_parser(
        "compare",
        help="leaderboard, Pareto plot and HTML report across searches",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workdirs", nargs="+", metavar="DIR", help="search workdirs")
    parser.add_argument(
        "--out", metavar="DIR", help="output folder (default: DIR/compare for one DIR)"
    )
    parser.add_argument(
        "--storage", metavar="URL", help="trial store URL of searches that did not use a journal"
    )
    parser.add_argument(
        "--top", type=int, default=8, help="designs whose training curves are drawn in colour"
    )
    parser.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    if args.out is None and len(args.workdirs) > 1:
        raise CompareError("comparing several searches needs --out DIR")
    if len(set(map(str, (Path(d).resolve() for d in args.workdirs)))) != len(args.workdirs):
        raise CompareError("the same search is given twice")
    if args.top < 0:
        raise CompareError(f"--top must be >= 0, got {args.top}")
    runs = [load_run(d, storage_url=args.storage) for d in args.workdirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise CompareError(f"searches must have distinct folder names, got {', '.join(names)}")
    out = Path(args.out) if args.out else Path(args.workdirs[0]) / "compare"
    paths = write_comparison(runs, out, top=args.top)
    top = ranked(runs)
    feasible = sum(c.feasible for c in top)
    print(f"{len(top)} trained candidates ({feasible} feasible) from {len(runs)} search(es)")
    if top:
        best = top[0]
        print(
            f"top: {best.run} trial {best.trial}, validation accuracy {best.val_accuracy:.4f}, "
            f"{best.macs:,} MACs, {'feasible' if best.feasible else 'infeasible: ' + best.reason}"
        )
    for name, path in paths.items():
        print(f"  {name:10s} {path}")
    return 0
