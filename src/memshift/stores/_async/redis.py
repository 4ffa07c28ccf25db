"""The Redis store: the legacy truth, read and written through a layout adapter.

Reads are one pipelined round trip of the layout's read commands; every write is one
Lua script of the layout (loaded once, then called by SHA) that applies the
monotonic rules of DESIGN §2 atomically inside Redis. Inputs are validated before
any I/O, so a bad argument changes nothing.

Redis Cluster works too (a ``RedisCluster`` client or a ``redis+cluster://`` URL).
Reads need nothing of the keys: the cluster pipeline sends each command to the
primary of its key's slot, one round trip per node, so the legacy layout (whose
six keys of a session hash to different slots) reads as it is. ``list_sessions``
scans every primary. A Lua script runs on one node only, so writes need every key
of the session in one slot (a layout with a hash tag, such as
``reference-hashtag``); otherwise they raise ConfigError before sending anything.

Written once, async; the sync ``RedisStore`` is generated from this file by
``tools/gen_sync.py``, so nothing here may differ between the two but
``async``/``await`` and the names that script swaps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memshift.errors import (
    ConfigError,
    EventGap,
    IllegalTransition,
    MemshiftError,
    MessageConflict,
    SeqGap,
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
    Session,
    SessionState,
    StatusChange,
    ToolRun,
    check_session_id,
    check_status,
    coerce,
    merge_tool_runs,
    now,
    parse,
)
from memshift.redact import redact
from memshift.stores.base import Outcome
from memshift.stores.layouts import Layout, RawSession, ScriptCall, get_layout, script_text
from memshift.stores.layouts.timestamps import format_timestamp

from ._clients import AsyncRedis, AsyncRedisCluster, ScriptHandle, close_client, queue_command

__all__ = ["AsyncRedisStore"]

# A tool-run merge that Python decides is written only if the stored record did not
# change meanwhile; under contention it is retried this many times.
_MAX_MERGE_ROUNDS = 16
# URL schemes that make a Redis Cluster client, and the scheme redis-py takes for each.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# What a client raises when the server (or, in a cluster, no node) can be reached.
# ClusterError (cluster down, redirections exhausted) is a ResponseError: catch it first.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterError, RedisClusterException)


def _raw(arg: Any) -> Any:
    # Key names of an id that is not valid UTF-8 go out as the bytes Redis holds.
    return arg.encode("utf-8", "surrogateescape") if isinstance(arg, str) else arg


def _shown_key(arg: Any) -> str:
    return arg.decode("utf-8", "backslashreplace") if isinstance(arg, bytes) else str(arg)


class AsyncRedisStore:
    """A :class:`~memshift.stores.base.AsyncStore` over Redis keys in a given layout.

    ``client_or_url`` is a client (left open on :meth:`close`) or a URL (the store
    owns that client): ``redis://``, ``rediss://`` or ``unix://`` for one server,
    ``redis+cluster://host:port`` (``rediss+cluster://`` for TLS) for a Redis Cluster
    reached through that node. A ``RedisCluster`` client works as well. The client
    must return bytes (``decode_responses=False``), since values are checked as
    strict UTF-8 here. In a cluster every write raises ConfigError unless all keys
    of the session share a slot (see the module docstring).
    ``ttl_seconds`` is refreshed on every key of a session at every write; ``None``
    keeps the TTL the session already has.
    """

    name = "redis"

    def __init__(
        self,
        client_or_url: AsyncRedis | AsyncRedisCluster | str,
        *,
        layout: Layout | str = "reference",
        prefix: str = "agent",
        ttl_seconds: int | None = None,
    ) -> None:
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise ConfigError(
                f"ttl_seconds must be a whole number of seconds above 0, or None to keep "
                f"the TTL sessions already have; got {ttl_seconds!r}"
            )
        chosen = get_layout(layout, prefix) if isinstance(layout, str) else layout
        self._layout: Layout = chosen
        self._ttl_ms = 0 if ttl_seconds is None else ttl_seconds * 1000
        self.ttl_seconds = ttl_seconds
        # The URL it was opened with (None when given a client), for jobs that open
        # their own connections (the router's background repair).
        self.url = client_or_url if isinstance(client_or_url, str) else None
        self._client: AsyncRedis | AsyncRedisCluster
        if isinstance(client_or_url, str):
            self._client = _open(client_or_url)
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self._cluster = isinstance(self._client, AsyncRedisCluster)
        if self._client.get_encoder().decode_responses:
            raise ConfigError(
                "the Redis client decodes responses; give one made with "
                "decode_responses=False, so that values are checked as strict UTF-8"
            )
        self._scripts: dict[str, ScriptHandle] = {}

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def client(self) -> Any:
        """The redis-py client (a cluster client for a cluster), for jobs that SCAN."""
        return self._client

    async def close(self) -> None:
        if self._owns_client:
            await close_client(self._client)

    async def __aenter__(self) -> AsyncRedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reads ------------------------------------------------------------------------

    async def load_session(self, session_id: str) -> SessionState | None:
        sid = check_session_id(session_id)
        (read,) = await self.read_sessions([sid])
        if read.error is not None:
            raise ValidationError(read.error, session_id=sid, where="load_session")
        return read.state

    async def read_sessions(self, session_ids: Sequence[str]) -> list[RawSession]:
        """Read many sessions in one pipeline, keeping the raw replies of each.

        A session that cannot be read or validated comes back with ``error`` set (and
        its raw replies, for quarantine) instead of raising, so one bad session does
        not stop the others. Ids that are not valid UTF-8 (kept as lone surrogates by
        ``session_id_from_key``) are read by their raw bytes and reported as errors.
        """
        pipe = self._client.pipeline(transaction=False)
        planned: list[tuple[str, list[tuple[Any, ...]]]] = []
        refused: dict[str, str] = {}
        for sid in session_ids:
            try:
                layout_commands = self._layout.read_commands(sid)
            except ValidationError as exc:  # an id whose keys the layout cannot name
                refused[sid] = str(exc)
                layout_commands = []
            commands = [(c[0], *map(_raw, c[1:])) for c in layout_commands]
            for command in commands:
                queue_command(pipe, command)
            planned.append((sid, commands))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except _UNREACHABLE as exc:
            raise self._unreachable(exc) from None
        reads = []
        at = 0
        for sid, commands in planned:
            if sid in refused:
                reads.append(RawSession(sid, [], [], None, refused[sid]))
                continue
            mine = list(replies[at : at + len(commands)])
            at += len(commands)
            reads.append(self._decode(sid, commands, mine))
        return reads

    def _decode(
        self, sid: str, commands: list[tuple[Any, ...]], replies: list[Any]
    ) -> RawSession:
        try:
            check_session_id(sid)
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, ResponseError):
                    key = _shown_key(command[1])
                    raise ValidationError(
                        f"session {sid!r}, key {key!r}: Redis refused {_shown_key(command[0])} "
                        f"({reply}); the key holds a type the layout does not expect",
                        session_id=sid,
                        where=f"key {key!r}",
                    )
            state = self._layout.decode(sid, replies)
        except ValidationError as exc:
            return RawSession(sid, commands, replies, None, str(exc))
        return RawSession(sid, commands, replies, state, None)

    async def list_sessions(self, *, batch_size: int = 500) -> AsyncIterator[str]:
        """Every session id, by SCAN over the layout's session keys (never KEYS); may repeat ids.

        In a cluster every primary is scanned in turn (replicas hold copies of the
        same keys, so they are left out); each key lives on one primary, so an id
        repeats only when its hash moves between nodes during the scan.
        """
        keys = self._client.scan_iter(
            match=self._layout.scan_pattern(), count=batch_size, _type=self._layout.scan_type
        )
        try:
            async for key in keys:
                raw = key if isinstance(key, bytes) else str(key).encode()
                session_id = self._layout.session_id_from_key(raw)
                if session_id is not None:
                    yield session_id
        except _UNREACHABLE as exc:
            raise self._unreachable(exc) from None

    # -- writes -----------------------------------------------------------------------

    async def save_session(self, session: Session | Mapping[str, Any]) -> Outcome:
        record: Session = coerce(Session, session, session_id=None, where="session")
        check_session_id(record.session_id)
        reply = await self._run(record.session_id, self._layout.save_session(record, self._ttl_ms))
        return Outcome(_text(reply[0]))

    async def append_message(
        self, session_id: str, message: Message | Mapping[str, Any]
    ) -> Message:
        sid = check_session_id(session_id)
        record: Message = coerce(Message, message, session_id=sid, where="message")
        reply = await self._run(sid, self._layout.append_message(sid, record, self._ttl_ms))
        kind, seq = _text(reply[0]), int(reply[1])
        if kind == "appended":
            return record.model_copy(update={"seq": seq})
        if kind == "duplicate":
            return self._layout.message_from_reply(sid, seq, reply[2])
        if kind == "trimmed":
            # Below the trimmed part nothing can be compared; a replayed write of a
            # message the legacy app already trimmed away is the only way here.
            return record.model_copy(update={"seq": seq})
        if kind == "gap":
            raise SeqGap(sid, record.seq if record.seq is not None else seq, seq, self.name)
        stored = self._layout.message_from_reply(sid, seq, reply[2])
        if _text(reply[3]) == "id":
            detail = f"message id {record.message_id!r} is already stored at seq {seq}"
            raise MessageConflict(sid, record.seq if record.seq is not None else seq, detail)
        differ = [
            name
            for name in ("message_id", "role", "content", "tool_call_id")
            if getattr(stored, name) != getattr(record, name)
        ]
        raise MessageConflict(sid, seq, f"{', '.join(differ)} differ")

    async def upsert_tool_run(self, session_id: str, run: ToolRun | Mapping[str, Any]) -> ToolRun:
        sid = check_session_id(session_id)
        record: ToolRun = coerce(ToolRun, run, session_id=sid, where="tool run")
        call = self._layout.upsert_tool_run(sid, record, self._ttl_ms)
        sent = record
        for _ in range(_MAX_MERGE_ROUNDS):
            reply = await self._run(sid, call)
            kind = _text(reply[0])
            if kind == "applied" and reply[1] == call.written:
                return sent  # stored exactly as sent: decoding it would give it back
            stored = self._layout.tool_run_from_reply(sid, record.tool_call_id, reply[1])
            if kind != "compare":
                return stored
            merged = merge_tool_runs(stored, record)
            if merged == stored:
                return stored
            call = self._layout.replace_tool_run(sid, record, reply[1], merged, self._ttl_ms)
            sent = merged
        raise MemshiftError(
            f"session {sid!r}: tool run {record.tool_call_id!r} changed under "
            f"{_MAX_MERGE_ROUNDS} merges in a row; retry the write"
        )

    async def put_summary(
        self, session_id: str, summary: MemorySummary | Mapping[str, Any]
    ) -> Outcome:
        sid = check_session_id(session_id)
        record: MemorySummary = coerce(MemorySummary, summary, session_id=sid, where="summary")
        reply = await self._run(sid, self._layout.put_summary(sid, record, self._ttl_ms))
        return Outcome(_text(reply[0]))

    async def put_checkpoint(
        self, session_id: str, checkpoint: Checkpoint | Mapping[str, Any]
    ) -> Outcome:
        sid = check_session_id(session_id)
        record: Checkpoint = coerce(Checkpoint, checkpoint, session_id=sid, where="checkpoint")
        reply = await self._run(sid, self._layout.put_checkpoint(sid, record, self._ttl_ms))
        return Outcome(_text(reply[0]))

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
        event: Event = parse(
            Event,
            {"to_status": status, "at": now() if at is None else at, "data": dict(data or {})},
            session_id=sid,
            where="status event",
        )
        call = self._layout.set_status(
            sid,
            status,
            format_timestamp(event.at),
            json.dumps(event.data, ensure_ascii=False, separators=(",", ":")),
            self._ttl_ms,
        )
        reply = await self._run(sid, call)
        kind = _text(reply[0])
        if kind == "missing":
            raise SessionNotFound(sid, self.name)
        if kind == "illegal":
            current = _text(reply[1])
            raise IllegalTransition(sid, current, status, list(LEGAL_TRANSITIONS.get(current, ())))
        # Both parts are validated records already: the session by the layout, the
        # event above (the script adds its seq and the status it left).
        return StatusChange(
            session=self._layout.session_from_reply(sid, reply[4], reply[5]),
            event=event.model_copy(
                update={"event_seq": int(reply[2]), "from_status": _text(reply[3])}
            ),
        )

    async def apply_status_change(self, change: StatusChange | Mapping[str, Any]) -> Outcome:
        record: StatusChange = coerce(StatusChange, change, session_id=None, where="status change")
        sid = check_session_id(record.session.session_id)
        event_seq = record.event.event_seq
        if event_seq is None:
            raise ValidationError(
                f"session {sid!r}: a replicated status change needs the event_seq that the "
                "primary assigned",
                session_id=sid,
                where="apply_status_change",
            )
        reply = await self._run(sid, self._layout.apply_status_change(record, self._ttl_ms))
        if _text(reply[0]) == "gap":
            raise EventGap(sid, event_seq, int(reply[1]), self.name)
        return Outcome(_text(reply[0]))

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, session_id: str, call: ScriptCall) -> list[Any]:
        if self._cluster:
            self._check_one_slot(session_id, call)
        script = self._scripts.get(call.script)
        if script is None:
            text = script_text(self._layout.script_dir(), call.script)
            script = self._client.register_script(text)
            self._scripts[call.script] = script
        try:
            reply = await script(keys=call.keys, args=call.args)
        except _UNREACHABLE as exc:
            raise self._unreachable(exc) from None
        except ResponseError as exc:
            raise ValidationError(
                f"session {session_id!r}: Redis refused {call.script} ({exc}); "
                f"one of the keys {call.keys!r} holds a type the layout does not expect",
                session_id=session_id,
                where=call.script,
            ) from None
        result = list(reply)
        # Checked on every reply: as the bytes the client returns, without decoding.
        if result and result[0] == b"invalid":
            key, field, what = (_text(part) for part in result[1:4])
            place = f"key {key!r} field {field!r}"
            raise ValidationError(
                f"session {session_id!r}, {place}: {what}; {call.script} wrote nothing",
                session_id=session_id,
                where=place,
            )
        return result

    def _check_one_slot(self, session_id: str, call: ScriptCall) -> None:
        """Refuse a script whose keys the cluster keeps in different slots.

        Redis Cluster runs a script on one node and only on keys of one slot; the
        client would refuse it too, but without saying what to do about it.
        """
        slots = {key_slot(key.encode("utf-8", "surrogateescape")) for key in call.keys}
        if len(slots) > 1:
            raise ConfigError(
                f"session {session_id!r}: {call.script} needs its keys {call.keys!r} in one "
                f"hash slot of the Redis Cluster, but they are in {len(slots)} slots. "
                f"Layout {self._layout.name!r} names keys without a shared hash tag, so "
                "memshift can read such sessions (load_session, list_sessions, backfill) "
                "but not write them atomically; to write to a cluster, use a layout whose "
                "keys share a hash tag, such as 'reference-hashtag' "
                "(ReferenceLayout(prefix, hash_tag=True))"
            )

    def _unreachable(self, exc: Exception) -> StoreUnavailable:
        """The connection failure as StoreUnavailable naming the server, not secrets."""
        kwargs = self._client.get_connection_kwargs()
        if isinstance(self._client, AsyncRedisCluster):
            nodes = ", ".join(self._client.nodes_manager.startup_nodes) or "no known node"
            where = f"Redis Cluster via {nodes}"
        elif kwargs.get("path"):
            where = f"Redis at unix socket {kwargs['path']}"
        else:
            where = f"Redis at {kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        detail = str(exc)
        password = kwargs.get("password")
        if password:
            detail = detail.replace(str(password), "***")
        return StoreUnavailable(
            f"{where} cannot be reached ({type(exc).__name__}: {redact(detail)}); "
            "check that it runs and that the URL is right"
        )


def _open(url: str) -> AsyncRedis | AsyncRedisCluster:
    """The client a URL names: one server, or a cluster for ``redis+cluster://``."""
    scheme, separator, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if separator else None
    if plain is None:
        return AsyncRedis.from_url(url, decode_responses=False)
    try:
        # The sync cluster client asks a node for the slot map right here.
        return AsyncRedisCluster.from_url(f"{plain}://{rest}", decode_responses=False)
    except _UNREACHABLE as exc:
        raise StoreUnavailable(
            f"Redis Cluster at {redact(url)} cannot be reached ({type(exc).__name__}: "
            f"{redact(str(exc))}); check that its nodes run and that the URL is right"
        ) from None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)
