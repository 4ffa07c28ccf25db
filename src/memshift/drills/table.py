"""Drill results as rich tables (``memshift drill``) and as JSON lines (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memshift.drills.context import DrillResult

_VERDICT = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]"}


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def figures_table(result: DrillResult) -> Table:
    """One drill: each figure, what it must be, and whether it is."""
    title = (f"drill {result.drill} ({result.family}): {_VERDICT[result.verdict]} "
             f"in {result.seconds:.1f} s (limit {result.limit:g} s)")
    table = Table("figure", "value", "expected", "ok", title=title, title_justify="left")
    for figure in result.figures:
        mark = "[green]ok[/]" if figure.ok else "[red]OFF[/]"
        expected = "" if figure.expected is None else _shown(figure.expected)
        table.add_row(escape(figure.name), escape(_shown(figure.value)), escape(expected), mark)
    return table


def print_result(console: Console, result: DrillResult) -> None:
    console.print(figures_table(result))
    if result.error:
        console.print(f"[red]drill {result.drill} stopped:[/] {escape(result.error)}")
    if result.skipped:
        console.print(f"[yellow]drill {result.drill} skipped:[/] {escape(result.skipped)}")


def print_summary(console: Console, results: Sequence[DrillResult]) -> None:
    """Every drill on a line: verdict, time against its limit, the figures that are off."""
    table = Table("drill", "family", "verdict", "seconds", "limit", "off", title="memshift drill",
                  title_justify="left")
    for r in results:
        off = ", ".join(f.name for f in r.failed()) or (r.error or r.skipped or "—")
        table.add_row(r.drill, r.family, _VERDICT[r.verdict], f"{r.seconds:.1f}", f"{r.limit:g}",
                      escape(off))
    console.print(table)
    failed = [r.drill for r in results if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} drill(s) failed:[/] {', '.join(failed)}")
    else:
        console.print(f"[green]{len(results)} drill(s): none failed[/]")


def json_line(result: DrillResult) -> str:
    return json.dumps(result.as_json(), ensure_ascii=False, default=str)
