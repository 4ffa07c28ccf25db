"""Timestamps as legacy Redis layouts hold them: ISO 8601 text or epoch milliseconds.

memshift writes one form, ISO 8601 in UTC with microseconds and a ``Z``
(``2026-05-19T10:00:00.123456Z``): fixed width, so two of them compare as strings in
time order, which the Lua scripts rely on. It reads both forms:

- ISO 8601 as :meth:`datetime.fromisoformat` reads it; a time without an offset is
  taken as UTC (legacy Python code often wrote ``datetime.utcnow().isoformat()``).
  Digits beyond microseconds are truncated.
- epoch milliseconds, as a JSON number or as text of digits with an optional
  fraction (``1716112800123`` or ``"1716112800123.5"``); sub-microsecond digits
  are truncated.

The Lua helper ``norm_ts`` (``layouts/lua/common.lua``) reads a strict subset of
these forms and must give the same instant as :func:`parse_timestamp` for each of
them; whatever it cannot read it hands back to Python.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MS = re.compile(r"(\d+)(?:\.(\d*))?")


def format_timestamp(value: datetime) -> str:
    """Fixed-width ISO 8601 UTC text with microseconds, e.g. ``2026-05-19T10:00:00.000000Z``."""
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:"
        f"{v.second:02d}.{v.microsecond:06d}Z"
    )


def parse_timestamp(value: object) -> datetime:
    """Read ISO 8601 text or epoch milliseconds; raise ValueError saying what is wrong."""
    if type(value) is str and len(value) == 27 and value[10] == "T" and value[26] == "Z":
        # The form memshift writes, read on every load: fromisoformat alone gives the
        # same instant (already UTC); anything it refuses takes the general path below.
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    if isinstance(value, bool):
        raise ValueError(f"expected a timestamp, got the boolean {value!r}")
    if isinstance(value, int):
        return _from_epoch_ms(Decimal(value), value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a timestamp, got the number {value!r}")
        return _from_epoch_ms(Decimal(repr(value)), value)
    if not isinstance(value, str):
        raise ValueError(f"expected a timestamp, got {type(value).__name__} {value!r}")
    if _EPOCH_MS.fullmatch(value):
        return _from_epoch_ms(Decimal(value), value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither ISO 8601 (e.g. 2026-05-19T10:00:00Z) nor epoch milliseconds"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is out of the range of years 1 to 9999 in UTC") from None


def _from_epoch_ms(ms: Decimal, shown: object) -> datetime:
    if ms < 0:
        raise ValueError(f"epoch milliseconds {shown!r} are negative")
    micros = int(ms * 1000)  # truncates sub-microsecond digits, as the Lua side does
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError(f"epoch milliseconds {shown!r} are after the year 9999") from None
