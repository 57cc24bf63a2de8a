"""What a user sees while a search runs: progress over the budget and the recent trials.

`LiveView` polls the trial store from a background thread (with its own storage handle, so it
works the same with one in-process worker or several worker processes). On a terminal it
redraws a rich panel: proposals against the trial budget, elapsed against the wall-time
budget, counts by status, and a table of the most recent trials (design summary, MACs, params,
rung, validation accuracy, status). Elsewhere (logs, CI) it prints one line per finished trial.
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

from search.config import BudgetConfig
from search.ledger.records import TrialRecord
from search.reporting.leaderboard import clip, count_statuses, format_count

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


def render(records: Sequence[TrialRecord], budget: BudgetConfig, elapsed_s: float, rows: int):
    """The live panel for the current records."""
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
    table = Table()
    for name, justify in (
        ("trial", "right"),
        ("status", "left"),
        ("MACs", "right"),
        ("params", "right"),
        ("rung", "right"),
        ("val acc", "right"),
        ("design / reason", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True, min_width=max(len(name), 5))
    for r in list(records)[-rows:]:
        last = r.last
        note = r.summary if r.status in ("trained", "running") else r.reason
        table.add_row(
            str(r.number),
            Text(r.status or "waiting", style=_STATUS_STYLE.get(r.status, "")),
            format_count(r.macs),
            format_count(r.params_count),
            "-" if last is None else f"{last.rung} ({last.steps})",
            "-" if last is None else f"{last.metrics.accuracy:.3f}",
            clip(str(note), 40),
        )
    return Panel(Group(header, Text(tally), table), title="covidnet search")


class LiveView:
    """Shows a search's progress until stopped.

    Args:
        read_records: returns the current records (called from the view's thread).
        budget: the search budget.
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
        interval_s: float = 1.0,
        rows: int = 12,
        lines: bool = False,
        spent_s: float = 0.0,
    ) -> None:
        self._lines = lines
        self._read = read_records
        self._budget = budget
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
                    live.update(render(records, self._budget, elapsed, self._rows))
                    if self._stop.wait(self._interval):
                        live.update(render(self._safe_read(), self._budget, elapsed, self._rows))
                        return
        while True:
            self._print_finished()
            if self._stop.wait(self._interval):
                self._print_finished()
                return

    def _print_finished(self) -> None:
        for r in self._safe_read():
            if _is_final(r) and r.number not in self._printed:
                self._printed.add(r.number)
                self._console.print(trial_line(r), highlight=False, soft_wrap=True)


def _is_final(record: TrialRecord) -> bool:
    return record.state not in ("RUNNING", "WAITING")
