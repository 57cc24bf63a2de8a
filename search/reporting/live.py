"""What a user sees while a search runs: progress over the budget and the recent trials.

`LiveView` polls the trial store from a background thread (with its own storage handle, so it
works the same with one in-process worker or several worker processes). On a terminal it
redraws a rich panel: proposals against the trial budget, elapsed against the wall-time
budget, counts by status, the best design so far (by `rank_key`, the search's one rank), and
a table of the most recent trials (MACs, params, rung or, for a running trial, its progress
as its worker last published it, validation accuracy, status, and the part of its design
that differs from the other designs shown). Elsewhere (logs, CI) it prints one line per
finished trial.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from search.config import BudgetConfig, Objective
from search.ledger.records import TrialRecord, rank_key
from search.reporting.leaderboard import count_statuses, format_count

_PART_SEPARATOR = " | "  # between the parts of `spec.summary()`

_STATUS_STYLE = {
    "trained": "green",
    "infeasible": "yellow",
    "duplicate": "cyan",
    "failed": "red",
    "lost": "red",
    "running": "bold blue",
    "cancelled": "dim",
    "invalid": "red",
}


def trial_line(record: TrialRecord) -> str:
    """One line about a finished trial (for logs)."""
    parts = [f"trial {record.number:>4}", f"{record.status:<10}"]
    if record.macs is not None:
        parts.append(
            f"MACs {format_count(record.macs):>6} params {format_count(record.params_count):>6}"
        )
    if record.last is not None:
        parts.append(f"rung {record.last.rung} ({record.last.steps} steps)")
        parts.append(f"val acc {record.last.metrics.accuracy:.3f}")
        parts.append("feasible" if record.feasible else "misses requirements")
    if record.reason and record.status != "trained":
        parts.append(record.reason)
    return "  ".join(parts)


def differing_parts(summaries: Sequence[str]) -> tuple[list[str], str, str]:
    """Each summary without the leading and trailing parts all of them share.

    Summaries (`spec.summary()`) are " | "-separated parts (resolution and classes, stem,
    one part per stage, connectivity, head); a search mostly changes a few stages, so the
    shared parts say nothing about a row and push what differs out of sight.

    Args:
        summaries: the summaries shown together.

    Returns:
        (each summary's differing middle, "…"-marked where parts were dropped; the shared
        leading parts; the shared trailing parts). With fewer than two distinct summaries
        nothing is dropped.
    """
    split = [s.split(_PART_SEPARATOR) for s in summaries]
    if len(set(summaries)) < 2:
        return list(summaries), "", ""
    shortest = min(len(parts) for parts in split)
    lead = 0
    while lead < shortest and len({parts[lead] for parts in split}) == 1:
        lead += 1
    trail = 0
    while trail < shortest - lead and len({parts[-1 - trail] for parts in split}) == 1:
        trail += 1
    middles = []
    for parts in split:
        middle = _PART_SEPARATOR.join(parts[lead : len(parts) - trail]) or "(shared parts only)"
        middles.append(("… " if lead else "") + middle + (" …" if trail else ""))
    return (
        middles,
        _PART_SEPARATOR.join(split[0][:lead]),
        _PART_SEPARATOR.join(split[0][len(split[0]) - trail :]),
    )


def best_so_far(records: Sequence[TrialRecord], objective: Objective) -> TrialRecord | None:
    """The trained record `rank_key` puts first (None before any trained)."""
    trained = [r for r in records if r.is_trained]
    return min(trained, key=lambda r: rank_key(r, objective)) if trained else None


def _rung_cell(record: TrialRecord) -> str:
    if record.state == "RUNNING" and record.progress is not None:
        return record.progress.describe()
    last = record.last
    return "-" if last is None else f"{last.rung} ({last.steps})"


def render(
    records: Sequence[TrialRecord],
    budget: BudgetConfig,
    elapsed_s: float,
    rows: int,
    objective: Objective,
):
    """The live panel for the current records.

    Args:
        records: every trial's record, in trial order.
        budget: the search budget.
        elapsed_s: wall time spent.
        rows: recent trials shown.
        objective: ranks the best design so far (with `rank_key`).
    """
    counts = count_statuses(records)
    proposed = counts.get("proposed", 0)
    header = Table.grid(padding=(0, 2))
    header.add_column()
    header.add_column()
    header.add_column()
    header.add_row(
        Text(f"proposals {proposed}/{budget.max_trials}"),
        ProgressBar(total=budget.max_trials, completed=min(proposed, budget.max_trials), width=30),
        Text(f"{elapsed_s:,.0f}s / {budget.max_wall_time_s:,.0f}s"),
    )
    tally = "  ".join(
        f"{name} {counts[name]}"
        for name in (
            "trained",
            "feasible",
            "infeasible",
            "duplicate",
            "failed",
            "lost",
            "retried",
            "running",
        )
        if counts.get(name)
    )
    shown = list(records)[-rows:]
    best = best_so_far(records, objective)
    with_design = [r for r in shown if r.summary and r.status in ("trained", "running")]
    if best is not None and best not in with_design:
        with_design.append(best)
    middles, lead, trail = differing_parts([r.summary for r in with_design])
    design = {r.number: middle for r, middle in zip(with_design, middles, strict=True)}

    table = Table(expand=False)
    for name, justify in (
        ("trial", "right"),
        ("status", "left"),
        ("MACs", "right"),
        ("params", "right"),
        ("rung / progress", "right"),
        ("val acc", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True, min_width=max(len(name), 5))
    # Wrappable, so the table shrinks it to fit; its cells are cut with an ellipsis instead.
    table.add_column("design (differs) / reason")
    for r in shown:
        last = r.last
        table.add_row(
            str(r.number),
            Text(r.status or "waiting", style=_STATUS_STYLE.get(r.status, "")),
            format_count(r.macs),
            format_count(r.params_count),
            _rung_cell(r),
            "-" if last is None else f"{last.metrics.accuracy:.3f}",
            Text(design.get(r.number, r.reason or r.summary), no_wrap=True, overflow="ellipsis"),
        )
    parts = [header, Text(tally), _best_line(best, design), table]
    if lead or trail:
        shared = _PART_SEPARATOR.join(part for part in (lead, "…", trail) if part)
        parts.append(
            Text(
                f"all shown designs share: {shared}",
                style="dim",
                no_wrap=True,
                overflow="ellipsis",
            )
        )
    return Panel(Group(*parts), title="covidnet search")


def _best_line(best: TrialRecord | None, design: dict[int, str]) -> Text:
    if best is None or best.last is None:
        return Text("best so far: none trained yet", style="dim")
    last = best.last
    # The reason a design misses can be long: it goes last, where the ellipsis cuts.
    verdict = "feasible" if best.feasible else f"misses: {best.reason}"
    return Text.assemble(
        ("best so far: ", "bold"),
        f"trial {best.number}  val acc {last.metrics.accuracy:.3f} (rung {last.rung}, "
        f"{last.steps} steps)  MACs {format_count(best.macs)}  "
        f"params {format_count(best.params_count)}  {design.get(best.number, best.summary)}  ",
        (verdict, "green" if best.feasible else "yellow"),
        overflow="ellipsis",
        no_wrap=True,
    )


class LiveView:
    """Shows a search's progress until stopped.

    Args:
        read_records: returns the current records (called from the view's thread).
        budget: the search budget.
        objective: the search objective (ranks the best design so far).
        console: where to draw.
        interval_s: polling interval.
        rows: recent trials shown.
        lines: print one line per finished trial even on a terminal.
        spent_s: wall time earlier invocations of the search spent (the clock starts there).
    """

    def __init__(
        self,
        read_records: Callable[[], list[TrialRecord]],
        budget: BudgetConfig,
        console: Console,
        *,
        objective: Objective,
        interval_s: float = 1.0,
        rows: int = 12,
        lines: bool = False,
        spent_s: float = 0.0,
    ) -> None:
        self._lines = lines
        self._read = read_records
        self._budget = budget
        self._objective = objective
        self._console = console
        self._interval = interval_s
        self._rows = rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._printed: set[int] = set()
        self._start = time.monotonic() - spent_s

    def __enter__(self) -> LiveView:
        self._printed = {r.number for r in self._safe_read() if _is_final(r)}
        self._thread = threading.Thread(target=self._loop, name="live-view", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _safe_read(self) -> list[TrialRecord]:
        try:
            return self._read()
        except Exception:  # a view must never take the search down
            return []

    def _loop(self) -> None:
        if self._console.is_terminal and not self._lines:
            from rich.live import Live

            with Live(console=self._console, refresh_per_second=4, transient=False) as live:
                while True:
                    records = self._safe_read()
                    elapsed = time.monotonic() - self._start
                    live.update(self._render(records, elapsed))
                    if self._stop.wait(self._interval):
                        live.update(self._render(self._safe_read(), elapsed))
                        return
        while True:
            self._print_finished()
            if self._stop.wait(self._interval):
                self._print_finished()
                return

    def _render(self, records: list[TrialRecord], elapsed_s: float):
        return render(records, self._budget, elapsed_s, self._rows, self._objective)

    def _print_finished(self) -> None:
        for r in self._safe_read():
            if _is_final(r) and r.number not in self._printed:
                self._printed.add(r.number)
                self._console.print(trial_line(r), highlight=False, soft_wrap=True)


def _is_final(record: TrialRecord) -> bool:
    return record.state not in ("RUNNING", "WAITING")
