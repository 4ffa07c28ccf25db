"""Progress of long work: a rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

if TYPE_CHECKING:
    from memshift.migrate.backfill import Summary

LOG_EVERY = 10.0  # seconds between plain progress lines when not on a terminal


def bar(console: Console, *, quiet: bool = False) -> Progress:
    """A progress bar with a free-text rate column; disabled when quiet or not a tty.

    Compact so that an 80-column terminal shows the counts whole: the bar takes the
    width the text leaves, the description and rate may be cut (with "…"), the counts,
    percentage and time left never are.
    """
    return Progress(
        TextColumn("{task.description}",
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=2)),
        BarColumn(bar_width=None, table_column=Column(ratio=1)),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TaskProgressColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[rate]}",
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=2)),
        TimeRemainingColumn(compact=True, table_column=Column(no_wrap=True, width=5)),
        console=console,
        expand=True,
        disable=quiet or not console.is_terminal,
    )


@contextmanager
def progress(console: Console, quiet: bool) -> Iterator[Progress]:
    with bar(console, quiet=quiet) as made:
        yield made


class BackfillProgress:
    """Shows a backfill's summaries as they come: sessions/s, messages/s and ETA."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self._console = console
        self._quiet = quiet
        self._bar = bar(console, quiet=quiet)
        self._shown = False
        self._task: TaskID | None = None
        self._last_line = 0.0
        self._told_finished = False  # the backfill reports its last summary more than once

    def __enter__(self) -> BackfillProgress:
        # The bar (and the thread that redraws it) starts with the first summary: by
        # then the backfill has started its worker processes, which it forks, fast,
        # only while this process runs no other thread.
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._shown:
            self._bar.__exit__(kind, exc, tb)

    def update(self, summary: Summary) -> None:
        if not self._shown:
            self._bar.__enter__()
            self._shown = True
        done, seen = summary.sessions_done, summary.sessions_seen
        seconds = max(summary.seconds, 1e-9)
        rate = f"{done / seconds:,.0f} sessions/s · {summary.messages / seconds:,.0f} msg/s"
        phase = "discovering + copying" if summary.state == "discovering" else "copying"
        if self._task is None:
            self._task = self._bar.add_task(f"backfill run {summary.run_id}", total=seen or None,
                                            rate=rate)
        self._bar.update(self._task, completed=done, total=seen or None, rate=rate,
                         description=f"backfill run {summary.run_id} ({phase})")
        if self._quiet or self._console.is_terminal or self._told_finished:
            return
        now = time.monotonic()
        finished = summary.state == "completed"
        if now - self._last_line >= LOG_EVERY or finished:
            self._last_line = now
            self._told_finished = finished
            self._console.print(
                f"backfill run {summary.run_id}: {summary.state}, {done:,}/{seen:,} sessions, "
                f"{summary.messages:,} messages, {rate}, {summary.quarantined:,} quarantined",
                highlight=False,
            )
