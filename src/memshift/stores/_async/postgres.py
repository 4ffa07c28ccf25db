"""PostgreSQL store: the new truth. Every write is one guarded statement of queries.sql.

Every statement is bounded in time on the client's side: it waits at most ``timeout``
for a connection, and the statement, waiting included, ends within ``query_timeout``
or its connection is dropped (shut down under libpq's feet, from a timer: neither
libpq nor a server that went silent would end it) and the call raises
StoreUnavailable. A block under :func:`within` bounds every statement in it tighter
still: the router's writes to PostgreSQL as the secondary. After a call found
PostgreSQL unreachable (a connection that broke, a statement past its time, a pool
that could not connect), the next calls, until one succeeds, take a pooled
connection only if one is ready and otherwise make a connection attempt of their
own (after a hang, only if it has the 2 s such an attempt may take): while
PostgreSQL refuses connections a call fails at once instead of holding its caller
for the whole ``timeout``, and once it answers again the next call is served at
once, not after the pool's reconnection backoff.

The sync ``PostgresStore`` is generated from this file by tools/gen_sync.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from memshift.errors import (
    ConfigError,
    IllegalTransition,
    MessageConflict,
    SchemaError,
    SessionNotFound,
    StoreUnavailable,
    ValidationError,
)
from memshift.model import (
    LEGAL_TRANSITIONS,
    Checkpoint,
    Event,
    MemorySummary,
    Message,
    Record,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
    check_session_id,
    check_status,
    coerce,
    legal_sources,
    now,
    parse,
    parse_json_list,
    placeholder_session,
)
from memshift.redact import redact
from memshift.sql.migrations import latest_version
from memshift.sql.queries import query
from memshift.stores.base import Outcome

from ._clients import Alarm, AsyncLock

Row = tuple[Any, ...]
_PARTS: tuple[type[Record], ...] = (Message, ToolRun, MemorySummary, Checkpoint, Event)
_NO_SESSION = Session(session_id="-")  # replaced before a state is returned
# While PostgreSQL is unreachable, how long a call waits for a pooled connection before
# it tries one of its own, and how long a store that never opened waits to open.
_UNREACHABLE_WAIT = 0.05
# The least time a connection attempt may take before it gives up (libpq's, psycopg's).
_LEAST_CONNECT_TIMEOUT = 2
_UNREACHABLE_OPEN_WAIT = 1.0
# The deadline of every statement of this thread or task, set by ``within``.
_DEADLINE: ContextVar[float | None] = ContextVar("memshift_postgres_deadline", default=None)


class within:  # lower case: it reads as a function, `with within(2):`
    """Bound every PostgresStore statement in this block (this thread or task): each
    ends within ``seconds`` from now, its wait for a connection included, or raises
    StoreUnavailable. A block inside another keeps the earlier deadline.

    A class rather than a generator: the router enters one per write to PostgreSQL as
    the secondary, and this costs that write a third as much.
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        deadline = time.monotonic() + self._seconds
        current = _DEADLINE.get()
        self._token = _DEADLINE.set(deadline if current is None else min(current, deadline))

    def __exit__(self, *exc: object) -> None:
        _DEADLINE.reset(self._token)


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"PostgresStore's {name} must be a number of seconds above 0 "
                          f"(query_timeout may also be None: no limit); got {value!r}")


def _sever(conn: AsyncConnection[Any]) -> None:
    """Shut the connection's socket down, so that libpq's wait on it ends at once.

    The file descriptor stays libpq's (a duplicate is shut down and closed): libpq
    reads the end of the stream, the statement fails, and the pool discards the
    connection. Never raises (an alarm rings it).
    """
    with contextlib.suppress(OSError, psycopg.Error):
        with socket.socket(fileno=socket.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


class AsyncPostgresStore:
    """The memshift truth model in PostgreSQL (schema ``memshift``).

    Give it a DSN (it owns a connection pool and closes it) or a pool of your own.
    ``timeout`` (seconds, default 5) is how long a call waits for a connection before
    StoreUnavailable (after PostgreSQL was found unreachable, until it answers again,
    a call makes its own connection attempt instead); a DSN without
    ``connect_timeout`` gets it (at least 2) for each connection attempt.
    ``query_timeout`` (seconds, default 30; None: no limit) is how long a statement
    may take, its wait for a connection included, before its connection is dropped
    and the call raises StoreUnavailable (it may or may not have been applied: every
    write is safe to repeat). Use it as a context manager, or call ``close()`` when
    done.
    """

    name = "postgres"

    def __init__(
        self,
        dsn_or_pool: str | AsyncConnectionPool,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        query_timeout: float | None = 30.0,
        check_schema: bool = True,
    ) -> None:
        _check_seconds("timeout", timeout)
        if query_timeout is not None:
            _check_seconds("query_timeout", query_timeout)
        self._sizes, self._timeout = (min_size, max_size), timeout
        self._query_timeout = query_timeout
        # Whether the last call found PostgreSQL unreachable, whether because it hung
        # (a connection attempt may then hang too), and the pool's count of failed
        # connection attempts when it last answered.
        self._unreachable = self._hung = False
        self._connect_errors = 0
        if isinstance(dsn_or_pool, str):
            self._dsn = dsn_or_pool
            self._pool = self._new_pool()
            self._owns_pool = True
        else:
            self._dsn = str(dsn_or_pool.conninfo)
            self._pool = dsn_or_pool
            self._owns_pool = False
        self._check_schema = check_schema
        self._ready = False
        self._opening = AsyncLock()

    def _new_pool(self) -> AsyncConnectionPool:
        kwargs: dict[str, Any] = {"autocommit": True}
        with contextlib.suppress(psycopg.ProgrammingError):
            if "connect_timeout" not in conninfo_to_dict(self._dsn):
                # libpq's own default is none (psycopg's 130 s): an attempt that the
                # caller would not wait for holds a pool worker for nothing.
                kwargs["connect_timeout"] = max(2, math.ceil(self._timeout))
        return AsyncConnectionPool(
            self._dsn,
            min_size=self._sizes[0],
            max_size=self._sizes[1],
            kwargs=kwargs,
            timeout=self._timeout,
            open=False,
            name="memshift-postgres",
            configure=_utc_session,
        )

    @property
    def dsn(self) -> str:
        """The DSN it connects with (secrets included: never show it unredacted)."""
        return self._dsn

    async def __aenter__(self) -> AsyncPostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self) -> AsyncConnectionPool:
        """The connection pool (the router writes the repair queue through it)."""
        return self._pool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self._dsn)!r})"

    async def open(self) -> None:
        """Open the pool and check that the schema is current (done on first use too)."""
        if self._ready:
            return
        # Threads (or tasks) sharing the store may all arrive here on first use.
        async with self._opening:
            if self._ready:
                return
            if self._owns_pool:
                limit = self._limit()
                wait = min(15.0, self._pool.timeout, math.inf if limit is None else limit)
                if self._unreachable:
                    wait = min(wait, _UNREACHABLE_OPEN_WAIT)
                try:
                    await self._pool.open(wait=True, timeout=wait)
                except (psycopg.Error, PoolTimeout) as exc:
                    # A pool whose first open failed is closed for good (psycopg_pool):
                    # a new one lets the next call try again once PostgreSQL is back.
                    self._pool = self._new_pool()
                    self._unreachable, self._connect_errors = True, 0
                    raise self._unavailable(exc) from None
            if self._check_schema:
                row = await self._fetchone("schema_version", {})
                have = int(row[0]) if row else 0
                if have < latest_version():
                    raise SchemaError(
                        f"the PostgreSQL schema is at version {have} but this memshift "
                        f"needs {latest_version()}; run `memshift db upgrade` first"
                    )
            self._ready = True

    async def close(self) -> None:
        if self._owns_pool:
            await self._pool.close()
        self._ready = False

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"PostgreSQL at {redact(self._dsn)} is unreachable: {redact(str(exc)).strip()}"
        )

    async def fetch(self, name: str, params: Mapping[str, Any]) -> list[Row]:
        """Run one named query of queries.sql, bounded like every call of this store
        (the router's control-plane queries: the repair queue, the cache epoch)."""
        return await self._fetch(name, params)

    def _limit(self) -> float | None:
        """Seconds the next statement may take: ``query_timeout``, or less in ``within``."""
        deadline = _DEADLINE.get()
        if deadline is None:
            return self._query_timeout
        left = max(0.0, deadline - time.monotonic())
        return left if self._query_timeout is None else min(left, self._query_timeout)

    async def _fetch(self, name: str, params: Mapping[str, Any]) -> list[Row]:
        if not self._ready and name != "schema_version":
            await self.open()
        started, limit = time.monotonic(), self._limit()
        try:
            if self._unreachable:
                rows = await self._fetch_again(name, params, started, limit)
            else:
                wait = self._timeout if limit is None else min(self._timeout, limit)
                # A wait of 0 would refuse even a connection that is ready.
                async with self._pool.connection(timeout=max(wait, 0.001)) as conn:
                    rows = await self._run(conn, name, params, started, limit)
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaError(
                f"memshift tables are missing ({exc.diag.message_primary}); "
                "run `memshift db upgrade` first"
            ) from None
        except psycopg.OperationalError as exc:
            self._note_failure(exc)
            raise self._unavailable(exc) from None
        if self._unreachable:
            self._answered()
        return rows

    async def _fetch_again(
        self, name: str, params: Mapping[str, Any], started: float, limit: float | None
    ) -> list[Row]:
        """A call after PostgreSQL was found unreachable: on a pooled connection if one
        is ready at once, else on one of its own. The pool reconnects on its own
        schedule, backing off to many seconds; this call's attempt fails at once while
        PostgreSQL refuses, and serves the call as soon as PostgreSQL is back."""
        try:
            async with self._pool.connection(timeout=_UNREACHABLE_WAIT) as conn:
                return await self._run(conn, name, params, started, limit)
        except PoolTimeout:
            pass
        left = self._timeout if limit is None else limit - (time.monotonic() - started)
        if self._hung and left < _LEAST_CONNECT_TIMEOUT:
            # An attempt at a hung server would outlive what this call has left.
            raise StoreUnavailable(
                f"PostgreSQL at {redact(self._dsn)} did not answer in time lately, and no "
                f"connection is ready; not trying a new one in the {max(left, 0):.3g} s "
                f"this call ({name}) has left"
            )
        conn = await AsyncConnection.connect(
            self._dsn, autocommit=True,
            connect_timeout=max(_LEAST_CONNECT_TIMEOUT, int(min(left, self._timeout))))
        async with conn:
            await _utc_session(conn)
            return await self._run(conn, name, params, started, limit)

    async def _run(
        self, conn: AsyncConnection[Any], name: str, params: Mapping[str, Any],
        started: float, limit: float | None,
    ) -> list[Row]:
        """One statement on ``conn``, its connection dropped if it outlives ``limit``."""
        alarm = None if limit is None else Alarm(max(0.0, limit - (time.monotonic() - started)),
                                                 functools.partial(_sever, conn))
        try:
            cur = await conn.execute(query(name), params)
            return await cur.fetchall() if cur.description is not None else []
        except psycopg.OperationalError:
            if alarm is None or not alarm.rang:
                raise
            self._unreachable = self._hung = True
            raise StoreUnavailable(
                f"PostgreSQL at {redact(self._dsn)} did not answer within {limit:.3g} s "
                f"({name}); its connection was dropped, and the statement may or may not "
                "have been applied"
            ) from None
        finally:
            if alarm is not None:
                alarm.disarm()

    def _note_failure(self, exc: psycopg.OperationalError) -> None:
        """Whether this failure says PostgreSQL is unreachable (not merely busy)."""
        if isinstance(exc, PoolTimeout):
            errors = self._pool.get_stats().get("connections_errors", 0)
            if errors > self._connect_errors:
                self._connect_errors = errors
                self._unreachable = True
        elif not isinstance(exc, psycopg.errors.QueryCanceled):
            # The connection itself failed (the server's own errors are not these):
            # refused or cut, so a new attempt fails at once or succeeds.
            self._unreachable, self._hung = True, False

    def _answered(self) -> None:
        self._unreachable = self._hung = False
        self._connect_errors = self._pool.get_stats().get("connections_errors", 0)

    async def _fetchone(self, name: str, params: Mapping[str, Any]) -> Row | None:
        rows = await self._fetch(name, params)
        return rows[0] if rows else None

    # -- reads ---------------------------------------------------------------

    async def load_session(self, session_id: str) -> SessionState | None:
        sid = check_session_id(session_id)
        row = await self._fetchone("load_session", {"session_id": sid})
        assert row is not None  # a SELECT of scalar subqueries always yields one row
        return _state(sid, row)

    async def load_sessions(self, session_ids: Sequence[str]) -> dict[str, SessionState | None]:
        """Many sessions in one statement, by id (None for one PostgreSQL does not hold).

        Each equals what ``load_session`` returns for its id; an id given twice is
        read once.
        """
        ids = list(dict.fromkeys(check_session_id(sid) for sid in session_ids))
        if not ids:
            return {}
        rows = await self._fetch("load_sessions", {"ids": ids})
        return {row[0]: _state(row[0], row[1:]) for row in rows}

    async def load_session_unless_repair(
        self, session_id: str
    ) -> tuple[SessionState | None, bool]:
        """The session, and whether repairs for it are queued here (one round trip).

        For a router reading PostgreSQL as the secondary: when repairs are pending the
        state may lack acknowledged writes, and the caller reads the primary instead.
        """
        sid = check_session_id(session_id)
        row = await self._fetchone("load_session_unless_repair", {"session_id": sid})
        assert row is not None
        return _state(sid, row[:-1]), bool(row[-1])

    async def list_sessions(self, *, batch_size: int = 500) -> AsyncIterator[str]:
        """Every session id, in id order, fetched in batches (keyset pagination)."""
        after = ""
        while True:
            rows = await self._fetch("list_sessions", {"after": after, "limit": batch_size})
            for (session_id,) in rows:
                yield session_id
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    # -- writes --------------------------------------------------------------

    async def save_session(self, session: Session | Mapping[str, Any]) -> Outcome:
        record: Session = coerce(Session, session, session_id=None, where="save_session")
        params = record.model_dump()
        params["metadata"] = Jsonb(record.metadata)
        row = await self._fetchone("save_session", params)
        assert row is not None
        applied, same_version = row
        if applied:
            return Outcome.APPLIED
        return Outcome.UNCHANGED if same_version else Outcome.STALE

    async def append_message(
        self, session_id: str, message: Message | Mapping[str, Any]
    ) -> Message:
        sid = check_session_id(session_id)
        msg: Message = coerce(Message, message, session_id=sid, where="append_message")
        params = msg.model_dump()
        params.update(session_id=sid, metadata=Jsonb(msg.metadata))
        if msg.seq is None:
            return await self._append_assign(sid, msg, params)
        return await self._append_carried(sid, msg, params)

    async def _append_assign(self, sid: str, msg: Message, params: dict[str, Any]) -> Message:
        try:
            row = await self._fetchone("append_message_assign", params)
        except psycopg.errors.UniqueViolation:
            # The message id is already stored: a retried append is a no-op.
            found = await self._fetchone("message_by_id", params)
            if found is None:  # removed since; cannot happen with append-only rows
                raise
            existing = _message(found)
            if not existing.same_content(msg):
                await self._conflict(sid, existing, msg)
            return existing
        if row is None:
            raise SessionNotFound(sid, "PostgreSQL")
        return msg.model_copy(update={"seq": row[0]})

    async def _append_carried(self, sid: str, msg: Message, params: dict[str, Any]) -> Message:
        rows = await self._fetch("append_message_carried", params)
        if not rows:
            # A concurrent writer inserted the same row after this statement's snapshot.
            rows = await self._fetch("append_message_carried", params)
        if any(inserted for inserted, *_ in rows):
            return msg
        stored = msg
        for row in rows:
            existing = _message(row[1:])
            if existing.seq != msg.seq or not existing.same_content(msg):
                await self._conflict(sid, existing, msg)
            stored = existing
        # A duplicate returns the message as stored (its metadata may differ).
        return stored

    async def _conflict(self, sid: str, existing: Message, incoming: Message) -> None:
        await self._fetch(
            "record_message_conflict",
            {
                "session_id": sid,
                "seq": incoming.seq if incoming.seq is not None else existing.seq,
                "existing": Jsonb(existing.to_json()),
                "incoming": Jsonb(incoming.to_json()),
            },
        )
        fields = [
            f for f in ("seq", "message_id", "role", "content", "tool_call_id")
            if getattr(existing, f) != getattr(incoming, f)
        ]
        raise MessageConflict(
            sid,
            incoming.seq if incoming.seq is not None else existing.seq or 0,
            f"stored message {existing.message_id!r} at seq {existing.seq} differs in "
            + ", ".join(fields),
        )

    async def upsert_tool_run(self, session_id: str, run: ToolRun | Mapping[str, Any]) -> ToolRun:
        sid = check_session_id(session_id)
        record: ToolRun = coerce(ToolRun, run, session_id=sid, where="upsert_tool_run")
        params = record.model_dump()
        params.update(
            session_id=sid,
            args=Jsonb(record.args),
            metadata=Jsonb(record.metadata),
            content_hash=record.content_hash(),
        )
        rows = await self._fetch("upsert_tool_run", params)
        if not rows:
            rows = await self._fetch("upsert_tool_run", params)
        columns = (
            "tool_call_id", "name", "args", "status", "attempts", "last_error", "updated_at",
            "metadata",
        )
        stored: ToolRun = parse(
            ToolRun, dict(zip(columns, rows[0], strict=True)), session_id=sid, where="tool_runs"
        )
        return stored

    async def put_summary(
        self, session_id: str, summary: MemorySummary | Mapping[str, Any]
    ) -> Outcome:
        sid = check_session_id(session_id)
        record: MemorySummary = coerce(MemorySummary, summary, session_id=sid, where="put_summary")
        params = record.model_dump()
        params.update(session_id=sid, metadata=Jsonb(record.metadata))
        row = await self._fetchone("put_summary", params)
        assert row is not None
        inserted, highest, stored_text = row
        if inserted:
            return Outcome.APPLIED if highest is None or record.version > highest else Outcome.STALE
        return Outcome.UNCHANGED if stored_text == record.text else Outcome.STALE

    async def put_checkpoint(
        self, session_id: str, checkpoint: Checkpoint | Mapping[str, Any]
    ) -> Outcome:
        sid = check_session_id(session_id)
        record: Checkpoint = coerce(Checkpoint, checkpoint, session_id=sid, where="put_checkpoint")
        params = record.model_dump()
        params.update(session_id=sid, state=Jsonb(record.state), metadata=Jsonb(record.metadata))
        row = await self._fetchone("put_checkpoint", params)
        assert row is not None
        inserted, highest, same = row
        if inserted:
            return Outcome.APPLIED if highest is None or record.step > highest else Outcome.STALE
        return Outcome.UNCHANGED if same else Outcome.STALE

    async def set_status(
        self,
        session_id: str,
        status: str,
        *,
        at: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> StatusChange:
        sid = check_session_id(session_id)
        check_status(sid, status)
        event: Event = coerce(
            Event,
            {"to_status": status, "at": at or now(), "data": dict(data or {})},
            session_id=sid,
            where="set_status",
        )
        params = event.model_dump()
        params.update(session_id=sid, data=Jsonb(event.data), legal_from=legal_sources(status))
        row = await self._fetchone("set_status_assign", params)
        if row is None:
            raise SessionNotFound(sid, "PostgreSQL")
        current, event_seq, session = row
        if session is None:
            raise IllegalTransition(sid, current, status, list(LEGAL_TRANSITIONS[current]))
        return StatusChange(
            session=parse(Session, session, session_id=sid, where="sessions"),
            event=event.model_copy(update={"event_seq": event_seq, "from_status": current}),
        )

    async def apply_status_change(self, change: StatusChange | Mapping[str, Any]) -> Outcome:
        record: StatusChange = coerce(
            StatusChange, change, session_id=None, where="apply_status_change"
        )
        if record.event.event_seq is None:
            raise ValidationError(
                f"session {record.session.session_id!r}: a replicated status change needs "
                "the event_seq that the primary assigned",
                session_id=record.session.session_id,
                where="apply_status_change",
            )
        params = record.event.model_dump()
        params.update(session_id=record.session.session_id, data=Jsonb(record.event.data))
        await self._fetch("record_event", params)
        return await self.save_session(record.session)


async def _utc_session(conn: AsyncConnection[Any]) -> None:
    # Timestamps come back as JSON text in the session's time zone: make it UTC, so
    # records read back are in UTC like those written.
    await conn.execute("SET TimeZone TO 'UTC'")


def _state(sid: str, row: Row) -> SessionState | None:
    session, *parts = row
    if session is None and all(part == "[]" for part in parts):
        return None
    # Rows read back from PostgreSQL were validated when written and cannot hold
    # what the Python-side checks refuse: validate them as trusted, in Rust.
    messages, tools, summaries, checkpoints, events = (
        parse_json_list(cls, part, session_id=sid, where="postgres", trusted=True)
        for cls, part in zip(_PARTS, parts, strict=True)
    )
    state = SessionState.model_construct(
        session=_NO_SESSION,
        messages=messages,
        tool_runs=tools,
        summaries=summaries,
        checkpoints=checkpoints,
        events=events,
    )
    if session is None:
        record = placeholder_session(sid, state.timestamps())
    else:
        record = parse(Session, session, session_id=sid, where="postgres", trusted=True)
    return state.model_copy(update={"session": record})


def _message(row: Row) -> Message:
    seq, message_id, role, content, ts, tool_call_id, metadata = row
    return Message(
        seq=seq,
        message_id=message_id,
        role=role,
        content=content,
        ts=ts,
        tool_call_id=tool_call_id,
        metadata=metadata,
    )
