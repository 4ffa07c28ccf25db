"""The local repair spool: failed secondary writes noted while PostgreSQL is unreachable.

One JSON object a line, appended under an exclusive ``flock`` and fsync'd before the
user's call returns, so an acknowledged write's repair survives a crash of the
process. ``memshift repair`` moves the lines into the repair queue under the same
lock, then empties the file. Every line carries a ``spool_id``: the queue keeps one
row per id, so a line moved twice (a crash between the move and the truncate) is
harmless.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

DEFAULT_SPOOL = Path(".memshift") / "repair.spool"


@dataclass(frozen=True)
class SpoolEntry:
    session_id: str
    target: str  # the store that missed the write
    operation: str
    error: str
    enqueued_at: datetime
    spool_id: str

    @classmethod
    def new(cls, session_id: str, target: str, operation: str, error: str,
            at: datetime) -> SpoolEntry:
        return cls(session_id, target, operation, error, at, uuid.uuid4().hex)

    def to_line(self) -> str:
        data = asdict(self) | {"enqueued_at": self.enqueued_at.isoformat()}
        # Session ids that are not valid UTF-8 never reach a store, so plain JSON holds them.
        return json.dumps(data, ensure_ascii=True) + "\n"

    @classmethod
    def from_line(cls, line: str) -> SpoolEntry:
        data = json.loads(line)
        data["enqueued_at"] = datetime.fromisoformat(data["enqueued_at"])
        return cls(**data)


def append(path: Path, entry: SpoolEntry) -> None:
    """Append one entry, durably, before the caller acknowledges the write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(entry.to_line())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def has_entries(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def drain(path: Path, move: Callable[[list[SpoolEntry]], None]) -> int:
    """Hand every entry to ``move`` (which must store them durably), then empty the file.

    A line that cannot be parsed (a torn write from a crash) is skipped: the write it
    describes was never acknowledged. Returns how many entries were moved.
    """
    if not has_entries(path):
        return 0
    with path.open("r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            entries = []
            for line in handle:
                try:
                    entries.append(SpoolEntry.from_line(line))
                except (ValueError, TypeError, KeyError):
                    continue
            if entries:
                move(entries)
            handle.truncate(0)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return len(entries)
