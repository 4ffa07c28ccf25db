"""Mutants: each switches off one continuity mechanism, to see the model catch it.

``MEMSHIFT_CONTINUITY_MUTANT=NAME[,NAME...] pytest tests/model`` runs the model with
those mechanisms removed, by monkeypatches that last for the test (nothing in the
tree changes). docs/continuity.md says what each one found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import memshift.stores._sync.postgres as sync_postgres
import memshift.stores._sync.redis as sync_redis
from memshift.migrate import plan
from memshift.model import Message
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from memshift.stores.routing import ReadResult

Mutant = Callable[[pytest.MonkeyPatch], None]


def no_repair_first_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads go where the Plan says even when that store has repairs queued (writes
    still ask, so this removes the read side only)."""
    asks = MigratingStore._repairs_pending

    def never_pending(self: MigratingStore, *args: Any, **kwargs: Any) -> bool:
        return False

    def unless_repair(self: PostgresStore, session_id: str) -> tuple[Any, bool]:
        return self.load_session(session_id), False

    def write_route(self: MigratingStore, session_id: str) -> Any:  # as the router's
        primary, secondary = self._plan.current()[0].writes()
        if secondary is not None and asks(self, session_id, primary, primary, unknown=False):
            return secondary, primary
        return primary, secondary

    monkeypatch.setattr(MigratingStore, "_repairs_pending", never_pending)
    monkeypatch.setattr(MigratingStore, "write_route", write_route)
    monkeypatch.setattr(PostgresStore, "load_session_unless_repair", unless_repair)


def no_repair_first_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes go to the Plan's primary even when it has repairs queued for the session."""

    def write_route(self: MigratingStore, session_id: str) -> Any:
        return self._plan.current()[0].writes()

    monkeypatch.setattr(MigratingStore, "write_route", write_route)


def no_drain_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage moves no longer wait for the repair queue to be empty."""
    for stage, checks in list(plan.GATES.items()):
        kept = tuple(c for c in checks if c.__name__ != "_repair_queue_empty")
        monkeypatch.setitem(plan.GATES, stage, kept)


def unguarded_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read whose chosen store cannot be reached falls back to the other store even
    when repairs are queued for it there (as before this was fixed)."""

    def fall_back(self: MigratingStore, plan: Any, session_id: str, read_path: str,
                  chosen: Any, failed: Exception) -> ReadResult:
        other = "postgres" if chosen == "redis" else "redis"
        state = self._load(other, session_id)
        return self._served(plan, session_id, read_path,
                            ReadResult(state, other, "secondary_unavailable"))

    monkeypatch.setattr(MigratingStore, "_fall_back", fall_back)


def no_staleness_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A router that cannot refresh its Plan routes by it as if it were fresh."""

    class AlwaysFresh:
        def __init__(self, source: Any) -> None:
            self._source = source

        def current(self) -> tuple[Any, bool]:
            return self._source.current()[0], True

        def repair_targets(self) -> frozenset[str] | None:
            found: frozenset[str] | None = self._source.repair_targets()
            return found

    original = MigratingStore.__init__

    def init(self: MigratingStore, redis: Any, postgres: Any, source: Any, **kw: Any) -> None:
        original(self, redis, postgres, AlwaysFresh(source), **kw)

    monkeypatch.setattr(MigratingStore, "__init__", init)


def secondary_ignores_the_seq(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seq guard: a store appends a replicated message at its own next seq instead of
    the seq the primary gave it."""
    for cls in (RedisStore, PostgresStore):
        original = cls.append_message

        def append(self: Any, session_id: str, message: Any, _original: Any = original) -> Any:
            if isinstance(message, Message) and message.seq is not None:
                message = message.model_copy(update={"seq": None})
            return _original(self, session_id, message)

        monkeypatch.setattr(cls, "append_message", append)


def no_summary_version_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Version guard: Redis keeps the summary written last, not the highest version."""
    original = sync_redis.script_text  # type: ignore[attr-defined]

    def text(folder: Any, name: str) -> str:
        body: str = original(folder, name)
        if name == "put_summary":
            assert "elseif c < 0 then" in body, "the summary guard moved: update this mutant"
            body = body.replace("elseif c < 0 then", "elseif false then")
        return body

    monkeypatch.setattr(sync_redis, "script_text", text)


def no_attempts_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempts guard: PostgreSQL takes a tool run's attempts from the write last seen."""
    original = sync_postgres.query  # type: ignore[attr-defined]

    def query(name: str) -> bytes:
        text: bytes = original(name)
        if name == "upsert_tool_run":
            assert b"attempts = greatest(t.attempts, excluded.attempts)" in text, (
                "the attempts guard moved: update this mutant")
            text = text.replace(b"attempts = greatest(t.attempts, excluded.attempts)",
                                b"attempts = excluded.attempts")
            text = text.replace(b"OR excluded.attempts > t.attempts",
                                b"OR excluded.attempts <> t.attempts")
        return text

    monkeypatch.setattr(sync_postgres, "query", query)


MUTANTS: dict[str, Mutant] = {
    m.__name__: m
    for m in (no_repair_first_reads, no_repair_first_writes, no_drain_gate,
              no_staleness_fallback, unguarded_fallback, secondary_ignores_the_seq,
              no_summary_version_guard, no_attempts_guard)
}


def apply(names: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply the mutants named, comma-separated (to see two mechanisms overlap)."""
    for name in names.split(","):
        try:
            mutant = MUTANTS[name.strip()]
        except KeyError:
            raise pytest.UsageError(
                f"no mutant {name!r}; mutants: {', '.join(sorted(MUTANTS))}") from None
        mutant(monkeypatch)
