"""Hostile input: malformed and hostile legacy records, each quarantined or migrated intact.

The drill writes every record of :data:`RECORDS` into Redis the way a buggy or
hostile legacy application leaves it (raw bytes, not through a store), beside
good generated sessions, runs ``memshift backfill`` as a child process and then
judges each record: it must come out as the catalogue says, **quarantined** with a
reason containing the words given, or **migrated** with PostgreSQL holding exactly
what Redis holds. The backfill must exit 0 (no crash) and the good sessions must
arrive intact (the rest of the run is unaffected).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis as redis_client

from memshift.drills.children import last_json, run_memshift
from memshift.drills.context import DrillContext, Figures
from memshift.drills.tally import redis_view
from memshift.errors import MemshiftError
from memshift.generate import generate_sessions
from memshift.migrate.backfill import connect
from memshift.migrate.quarantine import entries, printable
from memshift.model import text_problem
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

FAMILY = "hostile"
TS = "2026-05-19T10:00:00.000000Z"
BIG = 20 * 1024 * 1024  # "20 MB values"
Outcome = Literal["quarantined", "migrated"]


def message(i: int, **change: Any) -> bytes:
    body: dict[str, Any] = {"id": f"m{i}", "role": "user", "content": f"hello {i}", "ts": TS}
    body.update(change)
    return json.dumps(body, ensure_ascii=False).encode()


def tool(**change: Any) -> bytes:
    body: dict[str, Any] = {"name": "search", "args": {"q": "x"}, "status": "running",
                            "attempts": 1, "last_error": None, "updated_at": TS}
    body.update(change)
    return json.dumps(body).encode()


def summary(**change: Any) -> bytes:
    body: dict[str, Any] = {"version": 1, "text": "so far", "covers_through": 1,
                            "updated_at": TS}
    body.update(change)
    return json.dumps(body).encode()


def checkpoint(**change: Any) -> bytes:
    body: dict[str, Any] = {"checkpoint_id": "c2", "parent_id": "c1", "step": 2,
                            "state": {"turn": 2}, "created_at": TS}
    body.update(change)
    return json.dumps(body).encode()


class Legacy:
    """Writes raw keys in the reference layout, as a legacy app (or a bug in one) does."""

    def __init__(self, client: redis_client.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, sid: bytes, child: str = "") -> bytes:
        return self.prefix.encode() + b":session:" + sid + (f":{child}".encode() if child else b"")

    def session(self, sid: bytes, fields: dict[str, Any] | None = None,
                messages: list[bytes] | None = None) -> None:
        base: dict[Any, Any] = {"tenant_id": "t", "user_id": "u", "status": "active",
                                "version": "1", "created_at": TS, "updated_at": TS,
                                "messages_trimmed": "0", "metadata": "{}"}
        base.update(fields or {})
        self.client.hset(self.key(sid), mapping=base)
        for raw in messages if messages is not None else [message(0), message(1)]:
            self.client.rpush(self.key(sid, "messages"), raw)

    def child(self, sid: bytes, name: str, value: bytes, **fields: Any) -> None:
        """The session, then one child key: a string, or a hash field when ``field`` given."""
        self.session(sid, **fields)
        if name == "tools":
            self.client.hset(self.key(sid, name), "call-1", value)
        else:
            self.client.set(self.key(sid, name), value)


Write = Callable[[Legacy, bytes], None]


@dataclass(frozen=True)
class Hostile:
    """One hostile record: how to write it, and what the backfill must make of it."""

    name: str
    session_id: bytes
    write: Write
    expect: Outcome
    words: tuple[str, ...] = ()  # the quarantine reason must contain each


def _q(name: str, sid: bytes, write: Write, *words: str) -> Hostile:
    return Hostile(name, sid, write, "quarantined", words)


def _m(name: str, sid: bytes, write: Write) -> Hostile:
    return Hostile(name, sid, write, "migrated")


def _session(fields: dict[str, Any] | None = None,
             messages: list[bytes] | None = None) -> Write:
    return lambda legacy, sid: legacy.session(sid, fields, messages)


def _child(name: str, value: bytes) -> Write:
    return lambda legacy, sid: legacy.child(sid, name, value)


def _wrong_type(child: str, make: Callable[[redis_client.Redis, bytes], Any]) -> Write:
    def write(legacy: Legacy, sid: bytes) -> None:
        legacy.session(sid, messages=[] if child == "messages" else None)
        make(legacy.client, legacy.key(sid, child))
    return write


def _events(*entries: dict[str, str]) -> Write:
    def write(legacy: Legacy, sid: bytes) -> None:
        legacy.session(sid)
        for entry in entries:
            legacy.client.xadd(legacy.key(sid, "events"), dict[Any, Any](entry))
    return write


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_checkpoint(depth: int) -> bytes:
    return (b'{"checkpoint_id":"c1","step":1,"created_at":"' + TS.encode()
            + b'","state":{"d":' + _nested(depth) + b"}}")


BAD_UTF8 = b'{"id":"m0","role":"user","content":"\xff\xfe","ts":"' + TS.encode() + b'"}'
TRUNCATED = message(0)[:-7]
SQL_ID = b"x'); DROP TABLE memshift.sessions; --"
# Hebrew, a right-to-left mark, a zero-width space, Arabic, a byte order mark.
RTL_AND_ZERO_WIDTH = ("\u05e9\u05dc\u05d5\u05dd\u200f\u200b\u0645\u0631\u062d\u0628\u0627"
                      "\ufeff")

RECORDS: tuple[Hostile, ...] = (
    # -- text PostgreSQL cannot hold as it is ------------------------------------------
    _q("invalid UTF-8 in a message", b"h-utf8-content", _session(messages=[BAD_UTF8]),
       "messages", "UTF-8"),
    _q("invalid UTF-8 in a session field", b"h-utf8-field",
       _session({"tenant_id": b"acme-\xc3\x28"}), "tenant_id", "UTF-8"),
    _q("invalid UTF-8 in the session id", b"h-utf8-\xff-id", _session(), "UTF-8"),
    _q("NUL in a message", b"h-nul-content",
       _session(messages=[message(0, content="a\u0000b")]), "messages", "NUL"),
    _q("NUL in a session field", b"h-nul-field", _session({"user_id": b"u\x00x"}),
       "user_id", "NUL"),
    _q("NUL in the session id", b"h-nul-\x00-id", _session(), "NUL"),
    _q("NUL in a JSON key", b"h-nul-json-key",
       _child("checkpoint", checkpoint(state={"a\u0000": 1})), "checkpoint", "NUL"),
    _q("lone surrogate in JSON", b"h-surrogate",
       _session(messages=[b'{"id":"m0","role":"user","content":"\\ud800","ts":"'
                          + TS.encode() + b'"}']), "messages", "UTF-8"),
    # -- sizes ---------------------------------------------------------------------------
    _m("20 MB message", b"h-20mb-message",
       _session(messages=[message(0, content="x" * BIG), message(1)])),
    _m("20 MB checkpoint state", b"h-20mb-checkpoint",
       _child("checkpoint", checkpoint(state={"blob": "y" * BIG}))),
    _q("600-byte id", b"h" * 600, _session(), "600 bytes"),
    _q("600-byte id of emoji", "🚀".encode() * 150, _session(), "600 bytes"),
    _q("JSON nested 100,000 deep", b"h-deep-json",
       _child("checkpoint", deep_checkpoint(100_000)), "checkpoint", "JSON"),
    _q("JSON nested 200 deep", b"h-nested-json", _child("checkpoint", deep_checkpoint(200)),
       "checkpoint", "nested deeper than 100"),
    _m("JSON nested 90 deep", b"h-nested-90", _child("checkpoint", deep_checkpoint(90))),
    # -- keys of the wrong Redis type ---------------------------------------------------------
    _q("messages key is a string", b"h-type-messages",
       _wrong_type("messages", lambda c, k: c.set(k, b"not a list")), "messages", "type"),
    _q("tools key is a string", b"h-type-tools",
       _wrong_type("tools", lambda c, k: c.set(k, b"{}")), "tools", "type"),
    _q("summary key is a list", b"h-type-summary",
       _wrong_type("summary", lambda c, k: c.rpush(k, summary())), "summary", "type"),
    _q("checkpoint key is a hash", b"h-type-checkpoint",
       _wrong_type("checkpoint", lambda c, k: c.hset(k, "step", "1")), "checkpoint", "type"),
    _q("events key is a list", b"h-type-events",
       _wrong_type("events", lambda c, k: c.rpush(k, b"x")), "events", "type"),
    # -- truncated and non-object JSON ----------------------------------------------------------
    _q("truncated message JSON", b"h-trunc-message", _session(messages=[TRUNCATED]),
       "messages", "JSON"),
    _q("truncated tool run JSON", b"h-trunc-tool", _child("tools", tool()[:-9]),
       "tools", "JSON"),
    _q("truncated summary JSON", b"h-trunc-summary", _child("summary", summary()[:12]),
       "summary", "JSON"),
    _q("truncated checkpoint JSON", b"h-trunc-checkpoint", _child("checkpoint", b'{"check'),
       "checkpoint", "JSON"),
    _q("truncated metadata JSON", b"h-trunc-metadata", _session({"metadata": '{"a": [1, 2'}),
       "metadata", "JSON"),
    _q("message JSON is an array", b"h-json-array", _session(messages=[b"[1, 2, 3]"]),
       "messages", "object"),
    _q("metadata JSON is a string", b"h-json-string", _session({"metadata": '"hello"'}),
       "metadata", "object"),
    # -- wrong types ------------------------------------------------------------------------------
    _q("attempts is text", b"h-type-attempts", _child("tools", tool(attempts="many")),
       "tools", "attempts"),
    _q("role is a number", b"h-type-role", _session(messages=[message(0, role=42)]),
       "messages", "role"),
    _q("content is an object", b"h-type-content",
       _session(messages=[message(0, content={"text": "hi"})]), "messages", "content"),
    _q("step is text", b"h-type-step", _child("checkpoint", checkpoint(step="two")),
       "checkpoint", "step"),
    _q("tool args not JSON", b"h-type-args", _child("tools", tool(args=float("nan"))),
       "tools", "JSON"),
    _q("attempts beyond any integer column", b"h-huge-attempts",
       _child("tools", tool(attempts=10**30)), "tools", "attempts"),
    _q("version beyond any integer column", b"h-huge-version", _session({"version": "9" * 30}),
       "version"),
    _q("timestamp after the year 9999", b"h-far-future",
       _session({"updated_at": "99999999999999999999"}), "updated_at", "9999"),
    _q("message without role", b"h-missing-role",
       _session(messages=[json.dumps({"id": "m0", "content": "x", "ts": TS}).encode()]),
       "messages", "role"),
    _q("message without ts", b"h-missing-ts",
       _session(messages=[json.dumps({"id": "m0", "role": "user", "content": "x"}).encode()]),
       "messages", "ts"),
    _q("timestamp that is not one", b"h-bad-ts", _session({"updated_at": "yesterday"}),
       "updated_at"),
    _q("unknown session status", b"h-bad-status", _session({"status": "zombie"}), "status"),
    _q("unknown tool status", b"h-bad-tool-status", _child("tools", tool(status="exploded")),
       "tools", "status"),
    _q("event data not JSON", b"h-bad-event",
       _events({"type": "status", "from": "active", "to": "paused", "at": TS,
                "data": "{not json"}), "events", "data"),
    # -- negative and backward versions --------------------------------------------------------
    _q("negative session version", b"h-neg-version", _session({"version": "-3"}), "version"),
    _q("negative messages_trimmed", b"h-neg-trimmed", _session({"messages_trimmed": "-1"}),
       "messages_trimmed"),
    _q("negative attempts", b"h-neg-attempts", _child("tools", tool(attempts=-2)),
       "tools", "attempts"),
    _q("summary version 0", b"h-zero-summary", _child("summary", summary(version=0)),
       "summary", "version"),
    _q("negative checkpoint step", b"h-neg-step", _child("checkpoint", checkpoint(step=-1)),
       "checkpoint", "step"),
    _q("negative epoch timestamp", b"h-neg-epoch", _session({"created_at": "-5"}),
       "created_at"),
    # -- structure ---------------------------------------------------------------------------------
    _q("checkpoint is its own parent", b"h-parent-cycle",
       _child("checkpoint", checkpoint(checkpoint_id="c1", parent_id="c1")),
       "checkpoint", "parent"),
    _q("duplicate message ids", b"h-dup-ids", _session(messages=[message(0), message(0)]),
       "message id 'm0'"),
    # -- hostile ids, migrated intact -----------------------------------------------------------
    _m("id with quotes and SQL", SQL_ID, _session()),
    _m("id with double quotes and backslash", b'h-"quoted"\\back', _session()),
    _m("id with glob *", b"h-glob-*", _session()),
    _m("id with glob ?", b"h-glob-?", _session()),
    _m("id with glob [", b"h-glob-[a-z]", _session()),
    _m("id with a newline", b"h-new\nline", _session()),
    _m("id with CR and tab", b"h-cr\r\ttab", _session()),
    _m("id of emoji", "h-😀-🚀-👩‍👩‍👧".encode(), _session()),
    _m("id with braces", b"h-{brace}", _session()),
    _m("id with percent and %s", b"h-%s-%(x)s-%%", _session()),
    # -- odd but valid, migrated intact -----------------------------------------------------------
    _m("unknown extra fields", b"h-extra",
       _session({"locale": "de-AT"}, [message(0, model="gpt-x", tokens=42), message(1)])),
    _m("right-to-left and zero-width text", b"h-rtl",
       _session(messages=[message(0, content=RTL_AND_ZERO_WIDTH)])),
    _m("epoch-millisecond timestamps", b"h-epoch-ms",
       _session({"created_at": "1716112800123", "updated_at": "1716112800123"})),
)


def write_records(client: redis_client.Redis, prefix: str,
                  records: tuple[Hostile, ...] = RECORDS) -> None:
    legacy = Legacy(client, prefix)
    for record in records:
        record.write(legacy, record.session_id)


@dataclass(frozen=True)
class Judged:
    record: Hostile
    outcome: str  # quarantined | migrated | missing | altered
    reason: str

    @property
    def ok(self) -> bool:
        if self.outcome != self.record.expect:
            return False
        return all(word in self.reason for word in self.record.words)


def judge(ctx: DrillContext, good: list[str]) -> tuple[list[Judged], int]:
    """Each record's outcome, and how many good sessions did not arrive intact."""
    with connect(ctx.postgres_dsn) as conn:
        reasons = {e.session_id: e.reason for e in entries(conn, limit=10_000)}
    judged = []
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        for record in RECORDS:
            sid = record.session_id.decode("utf-8", "surrogateescape")
            shown = printable(sid)
            if shown in reasons:
                judged.append(Judged(record, "quarantined", reasons[shown]))
            elif text_problem(sid) or len(record.session_id) > 512:
                judged.append(Judged(record, "missing", "neither quarantined nor migrated"))
            else:
                judged.append(Judged(record, *_compare(legacy, truth, sid)))
        damaged = sum(1 for sid in good if _compare(legacy, truth, sid)[0] != "migrated")
    return judged, damaged


def _compare(legacy: RedisStore, truth: PostgresStore, sid: str) -> tuple[str, str]:
    try:
        in_redis, in_pg = legacy.load_session(sid), truth.load_session(sid)
    except (MemshiftError, RecursionError) as exc:
        return "missing", f"not migrated, and unreadable: {exc}"
    if in_pg is None or in_redis is None:
        return "missing", "PostgreSQL does not hold it"
    if redis_view(in_pg) != redis_view(in_redis):
        return "altered", "PostgreSQL holds something else than Redis"
    return "migrated", f"intact ({len(in_pg.messages)} messages)"


def _short(reason: str) -> str:
    """A reason fit for a table cell: its head and its tail (where sizes are said)."""
    return reason if len(reason) <= 200 else f"{reason[:90]} … {reason[-100:]}"


def drill_hostile_input(ctx: DrillContext) -> Figures:
    """Write the hostile records beside good sessions, backfill, judge each record."""
    figs = Figures()
    client = redis_client.Redis.from_url(ctx.redis_url)
    try:
        write_records(client, ctx.prefix)
    finally:
        client.close()
    good = []
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as store:
        for generated in generate_sessions(ctx.pick(20, 100), seed=ctx.seed,
                                           namespace="good"):
            generated.play(store)
            good.append(generated.session_id)
    ctx.check_time("writing the records")
    done = run_memshift(ctx, "backfill", "--json", "--batch-size", "8")
    counts = last_json(done.stdout)
    judged, damaged = judge(ctx, good)
    figs.expect("records", len(RECORDS), len(RECORDS), ok=len(RECORDS) >= 40)
    figs.expect("backfill exit code (0: no crash)", done.returncode, 0)
    figs.expect("good sessions intact", len(good) - damaged, len(good))
    figs.info("backfill: migrated / quarantined",
              f"{counts.get('migrated')} / {counts.get('quarantined')}")
    if done.returncode:
        figs.info("backfill's last words", done.stderr.strip().splitlines()[-1:])
    for item in judged:
        figs.expect(item.record.name, f"{item.outcome}: {_short(item.reason)}",
                    item.record.expect + (f" ({', '.join(item.record.words)})"
                                          if item.record.words else ""), ok=item.ok)
    return figs
