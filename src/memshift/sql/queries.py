"""The named queries of ``queries.sql``, loaded once.

A query may include another with ``{{NAME}}``, or ``{{NAME rows=ROWS}}`` where NAME
holds a ``{{rows}}`` slot: so a guarded upsert is written once and merges one row
given as parameters (a live write) or a staging table (the backfill) alike.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"\{\{(\w+)(?: rows=(\w+))?\}\}")


@cache
def _texts() -> dict[str, str]:
    text = resources.files("memshift.sql").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    return {name: body.strip().rstrip(";") for name, body in pairs}


def _expand(name: str, rows: str | None = None, depth: int = 0) -> str:
    if depth > 5:
        raise RecursionError(f"queries.sql: includes nest too deep at {name!r}")

    def include(match: re.Match[str]) -> str:
        target, target_rows = match[1], match[2]
        if target == "rows":
            if rows is None:
                raise KeyError(f"queries.sql: {name!r} has a {{{{rows}}}} slot but no rows given")
            return _expand(rows, None, depth + 1)
        return _expand(target, target_rows, depth + 1)

    return _INCLUDE.sub(include, _texts()[name])


@cache
def queries() -> dict[str, bytes]:
    """Every query that can run on its own (those without a rows slot), expanded."""
    return {
        name: _expand(name).encode("utf-8")
        for name, text in _texts().items()
        if "{{rows}}" not in text
    }


def query(name: str) -> bytes:
    return queries()[name]
