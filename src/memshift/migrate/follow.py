"""Follow mode: keep PostgreSQL in step with writes that reach Redis without memshift.

Like a binlog follower, ``follow`` needs no change to the application: it subscribes
to Redis keyspace notifications for the layout's keys (on every primary of a
cluster), collapses each session's burst of events into one re-read of the whole
session, and merges what it read with the backfill's monotonic merge
(:func:`memshift.migrate.bulk.merge_states`), so it converges with backfill, repair
and dual-writes in any order.

Notifications are at-most-once: those sent while the follower is down or
reconnecting are lost. So a **sweeper** reads every session on a schedule (and at
once after a start or a reconnect), and re-applies those that changed since the
follower last applied them: each applied session leaves a digest of the Redis replies
it was read from in ``memshift.follow_sessions``, so an unchanged session costs a read
and a comparison, not a merge. (The layout's ``updated_at``/``version`` would be a
cheaper test, but neither the reference layout's own appends nor a legacy LTRIM move
them, so a sweep that trusted them would miss messages.)

The follower's **position** (``memshift.followers.applied_through``): every change
Redis made before it is in PostgreSQL. It is the time of the oldest change notified
and not yet applied, held back while a catch-up sweep is due; lag is now minus it.
A killed follower's position stays where it died, so ``memshift follow --status``
and the Plan's gates see the lag grow until a restarted follower has swept.

A session gone from Redis (deleted, expired or evicted) is never deleted from
PostgreSQL: once a second read confirms it gone, its expiry is recorded and a status
that may move to ``expired`` does (``follow_mark_gone`` in ``queries.sql``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, StoreUnavailable
from memshift.migrate.backfill import connect, sort_reads
from memshift.migrate.bulk import merge_states
from memshift.migrate.plan import Stage, load_plan
from memshift.migrate.quarantine import Quarantined, record_quarantine
from memshift.model import SessionState, legal_sources
from memshift.observe.metrics import REGISTRY
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.stores.layouts import Layout, PreparesPostgres, RawSession, get_layout
from memshift.stores.redis import RedisStore

log = logging.getLogger("memshift.follow")

# Advisory lock space of followers (the second key is the follower id): one process
# follows a given source at a time.
_LOCK_SPACE = 0x6D736677  # "msfw"
# Stages in which Redis is the primary, so there is something to follow.
_FOLLOWED_STAGES = (Stage.REDIS_ONLY, Stage.DUAL_WRITE, Stage.SHADOW, Stage.CUTOVER)
# Events that change no state PostgreSQL keeps (a TTL set or removed).
_IGNORED_EVENTS = frozenset({b"expire", b"persist"})
_TTL_COMMANDS = frozenset({"PTTL", "TTL", "PEXPIRETIME", "EXPIRETIME"})
_GLOB = re.compile(rb"([*?\[\]\\])")
_GONE_DATA = {"by": "memshift follow", "why": "gone from Redis (deleted, expired or evicted)"}
_EXPIRED_FROM = legal_sources("expired")


class NotificationsOff(ConfigError):
    """Redis does not send the keyspace notifications the layout needs."""


class FollowerBusy(MemshiftError):
    """Another process already follows this source."""


class FollowRefused(MemshiftError):
    """The Plan's stage leaves nothing to follow (PostgreSQL is primary)."""


# -- metrics ---------------------------------------------------------------------------

LAG = Gauge(
    "memshift_follow_lag_seconds",
    "Age of the oldest change to Redis that the follower has not applied to PostgreSQL "
    "(0 when it is caught up).",
    registry=REGISTRY,
)
PENDING = Gauge(
    "memshift_follow_pending_sessions",
    "Sessions with notified changes waiting to be re-read and applied.",
    registry=REGISTRY,
)
EVENTS = Counter(
    "memshift_follow_events", "Keyspace notifications the follower received.",
    registry=REGISTRY,
)
APPLIED = Counter(
    "memshift_follow_sessions_applied",
    "Sessions re-read and merged into PostgreSQL because they changed, by path "
    "(notify: after a notification; sweep: found by the sweeper).",
    ["path"], registry=REGISTRY,
)
EXPIRED = Counter(
    "memshift_follow_sessions_expired",
    "Sessions gone from Redis that the follower recorded as expired in PostgreSQL.",
    registry=REGISTRY,
)
SWEEPS = Counter("memshift_follow_sweeps", "Sweeps the follower finished.", registry=REGISTRY)


# -- options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowOptions:
    """How a follower runs. Every field says its default."""

    layout: str = "reference"  # Redis layout of the sessions
    prefix: str = "agent"  # Redis key prefix
    configure_redis: bool = False  # set notify-keyspace-events when it lacks flags
    collapse_seconds: float = 0.05  # a session's events this close make one re-read
    batch_size: int = 200  # sessions per re-read pipeline and PostgreSQL transaction
    workers: int = 4  # threads that re-read and merge, each with its own connections
    sweep_seconds: float = 300.0  # between sweeps (one also runs at start)
    settle_seconds: float = 0.5  # a session read as gone is read again after this
    heartbeat_seconds: float = 1.0  # how often the position is written to PostgreSQL
    scan_count: int = 1000  # SCAN COUNT hint of the sweeper
    max_value_bytes: int = 64 * 1024 * 1024  # a larger Redis value quarantines its session

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(f"--batch-size must be from 1 to 10000, got {self.batch_size}")
        if not 1 <= self.workers <= 32:
            raise ConfigError(f"--workers must be from 1 to 32, got {self.workers}")
        for name in ("collapse_seconds", "settle_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("sweep_seconds", "heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be above 0, got {getattr(self, name)}")


# -- keyspace notifications ------------------------------------------------------------

# notify-keyspace-events classes, in Redis's own order; "A" stands for all of them.
_ALL_CLASSES = "g$lshzxetd"
# The class of the events on a key, by a command that reads a key of that type.
_CLASS_OF_COMMAND = {
    **dict.fromkeys(("HGETALL", "HGET", "HMGET", "HKEYS", "HVALS", "HLEN", "HSCAN"), "h"),
    **dict.fromkeys(("LRANGE", "LINDEX", "LLEN", "LPOS"), "l"),
    **dict.fromkeys(("GET", "MGET", "GETRANGE", "STRLEN"), "$"),
    **dict.fromkeys(("SMEMBERS", "SSCAN", "SCARD", "SISMEMBER"), "s"),
    **dict.fromkeys(("ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZSCAN", "ZCARD"), "z"),
    **dict.fromkeys(("XRANGE", "XREVRANGE", "XLEN"), "t"),
    **dict.fromkeys(("PTTL", "TTL", "EXISTS", "TYPE", "PEXPIRETIME", "EXPIRETIME"), ""),
}


def _name(command: tuple[Any, ...]) -> str:
    head = command[0]
    return (head.decode() if isinstance(head, bytes) else str(head)).upper()


def required_flags(layout: Layout) -> str:
    """The notify-keyspace-events flags the layout needs, e.g. ``Kg$lhxt``.

    K (keyspace channels), g (DEL, RENAME...), x (expired) and the class of each key
    type the layout reads. A command this table does not know asks for every class.
    """
    classes = set("gx")
    for command in layout.read_commands("s"):
        found = _CLASS_OF_COMMAND.get(_name(command))
        classes.update(_ALL_CLASSES if found is None else found)
    return "K" + "".join(c for c in _ALL_CLASSES if c in classes)


def _flags(value: str) -> set[str]:
    return set(value.replace("A", _ALL_CLASSES))


def missing_flags(current: str, required: str) -> str:
    """The flags of ``required`` that the setting ``current`` lacks ('' when none)."""
    have = _flags(current)
    return "".join(c for c in required if c not in have)


def with_flags(current: str, required: str) -> str:
    """``current`` with the ``required`` flags added (what is set now is kept)."""
    have = _flags(current) | _flags(required)
    classes = "A" if set(_ALL_CLASSES) <= have else "".join(c for c in _ALL_CLASSES if c in have)
    return "".join(c for c in "KE" if c in have) + classes + "".join(c for c in "mn" if c in have)


def _primaries(client: Any) -> dict[str, Any]:
    """The servers that send a key's notifications: the one server, or every primary."""
    get_primaries = getattr(client, "get_primaries", None)
    if get_primaries is None:
        return {"redis": client}
    return {node.name: node.redis_connection for node in get_primaries()}


def _where(name: str, client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix socket {kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}" if name == "redis" \
        else name


def ensure_notifications(client: Any, layout: Layout, *, configure: bool) -> dict[str, str]:
    """Check (and with ``configure``, set) notify-keyspace-events on every primary.

    Returns each node's setting before any change. Raises NotificationsOff naming the
    setting to make when a node lacks flags and ``configure`` is false.
    """
    required = required_flags(layout)
    nodes = _primaries(client)
    before: dict[str, str] = {}
    lacking: dict[str, str] = {}
    for name, node in nodes.items():
        try:
            reply = node.config_get("notify-keyspace-events")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis {_where(name, node)} cannot be reached ({type(exc).__name__}: "
                f"{redact(str(exc))}); check that it runs and that the URL is right"
            ) from None
        except ResponseError as exc:
            raise NotificationsOff(
                f"cannot read notify-keyspace-events on Redis {_where(name, node)} ({exc}); "
                f"set it to include {required} in the server's configuration (redis.conf or "
                "the provider's parameter group), then start memshift follow again"
            ) from None
        current = _text(_config_value(reply))
        before[name] = current
        if missing_flags(current, required):
            lacking[name] = current
    if lacking and not configure:
        raise NotificationsOff(
            f"Redis does not send the keyspace notifications memshift follow needs for "
            f"layout {layout.name!r}: "
            + "; ".join(
                f"on {_where(name, nodes[name])} notify-keyspace-events is "
                f"{current!r}, missing {missing_flags(current, required)!r}: run `CONFIG SET "
                f"notify-keyspace-events {with_flags(current, required)}`"
                for name, current in lacking.items()
            )
            + " (on every primary, and in redis.conf so that a restart keeps it), or pass "
            "--configure-redis to let memshift follow set it"
        )
    for name, current in lacking.items():
        nodes[name].config_set(
            "notify-keyspace-events", with_flags(current, required)
        )
        log.warning("set notify-keyspace-events on %s to %s (was %r)", name,
                    with_flags(current, required), current)
    return before


def _config_value(reply: Any) -> Any:
    if isinstance(reply, dict):
        for key, value in reply.items():
            if _text(key) == "notify-keyspace-events":
                return value
        return ""
    return reply[1] if isinstance(reply, list | tuple) and len(reply) > 1 else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class KeyMap:
    """Which session a Redis key belongs to, and the channel patterns to subscribe to.

    Built from ``layout.session_keys``: each key of a session is some text, the id,
    then some more text. A key that matches several (the reference layout's
    ``{p}:session:a:messages`` is session ``a``'s transcript, or the hash of a session
    ``a:messages``) goes to the one with the longest tail, as SCAN discovery decides.
    """

    _MARK = "\x00memshift-session-id\x00"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        shapes = []
        for key in layout.session_keys(self._MARK):
            head, found, tail = key.partition(self._MARK)
            if not found:
                raise ConfigError(
                    f"layout {layout.name!r} names keys that do not contain the session id "
                    f"({key!r}), so memshift follow cannot tell whose key changed"
                )
            shapes.append((head.encode("utf-8", "surrogateescape"),
                           tail.encode("utf-8", "surrogateescape")))
        # Longest tail first: the most specific reading of a key wins.
        self._shapes = sorted(set(shapes), key=lambda s: len(s[1]), reverse=True)

    def patterns(self, db: int) -> list[bytes]:
        """PSUBSCRIBE patterns of the keyspace channels of every key of every session."""
        heads = sorted({head for head, _ in self._shapes})
        return [b"__keyspace@%d__:" % db + _GLOB.sub(rb"\\\1", head) + b"*" for head in heads]

    def session_of(self, key: bytes) -> str | None:
        for head, tail in self._shapes:
            if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
                return key[len(head) : len(key) - len(tail)].decode("utf-8", "surrogateescape")
        return None


# -- what a session read holds ---------------------------------------------------------


def digest(read: RawSession) -> bytes:
    """A digest of the replies a session was read from, its TTL left out.

    Equal digests mean Redis held the same session; the TTL counts down between reads
    and is not followed (PostgreSQL takes a new expiry only with a newer version). A
    hash's fields come in Redis's order, which a rehash may change: they are sorted.
    (Pickle is only a fast, exact serialisation of the replies here, never loaded.)
    """
    kept = [sorted(reply.items()) if isinstance(reply, dict) else reply
            for command, reply in zip(read.commands, read.replies, strict=True)
            if _name(command) not in _TTL_COMMANDS]
    try:
        serialised = pickle.dumps(kept, protocol=5)
    except (pickle.PicklingError, TypeError):  # an error reply: digest its text
        serialised = repr(kept).encode("utf-8", "backslashreplace")
    return hashlib.blake2b(serialised, digest_size=16).digest()


def _after(state: SessionState, next_seq: int | None) -> SessionState:
    """The session without the messages below ``next_seq`` (those PostgreSQL holds)."""
    if not next_seq or not state.messages or (state.messages[0].seq or 0) >= next_seq:
        return state
    kept = tuple(m for m in state.messages if m.seq is None or m.seq >= next_seq)
    return state.model_copy(update={"messages": kept})


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return connect(dsn)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {redact(str(exc)).strip()}"
        ) from None


def _key(session_id: str) -> bytes:
    return session_id.encode("utf-8", "surrogateescape")


# -- shared state between the threads --------------------------------------------------


class _Pending:
    """Sessions with notified changes not applied yet, each with its first change's time.

    Insertion order is arrival order, so the first entry is the oldest change.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._first: dict[str, float] = {}
        self.events = 0

    def add(self, session_id: str, at: float) -> None:
        with self._ready:
            self.events += 1
            if session_id not in self._first:
                # A waiting worker sleeps until the oldest entry is due; only a first
                # entry brings a due time earlier than that.
                if not self._first:
                    self._ready.notify()
                self._first[session_id] = at

    def put_back(self, batch: dict[str, float]) -> None:
        """Return a batch that could not be applied, keeping each session's oldest time."""
        with self._ready:
            merged = dict(batch)
            for sid, at in self._first.items():
                merged[sid] = min(at, merged.get(sid, at))
            self._first = dict(sorted(merged.items(), key=lambda item: item[1]))

    def take(self, older_than: float, limit: int) -> dict[str, float]:
        """Up to ``limit`` sessions whose first change came before ``older_than``."""
        with self._ready:
            taken: dict[str, float] = {}
            for sid, at in self._first.items():
                if at > older_than or len(taken) >= limit:
                    break
                taken[sid] = at
            for sid in taken:
                del self._first[sid]
            return taken

    def oldest(self) -> float | None:
        with self._ready:
            return next(iter(self._first.values()), None)

    def wait(self, timeout: float) -> None:
        if timeout > 0:
            with self._ready:
                self._ready.wait(timeout)

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def __len__(self) -> int:
        with self._ready:
            return len(self._first)


class _Totals:
    """What the follower did since it started, counted from every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"applied": 0, "expired": 0, "quarantined": 0}

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.counts[name] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


@dataclass(frozen=True)
class Applied:
    """What one apply did: sessions merged (they had changed) and those read as gone."""

    merged: list[SessionState]
    quarantined: int
    gone: list[str]


class _Applier:
    """Re-reads sessions and merges the changed ones, on one connection of its own."""

    def __init__(self, follower: _Follower) -> None:
        self.f = follower
        self.conn = _connect(follower.postgres_dsn)
        self.store = RedisStore(follower.redis_url, layout=follower.layout)

    def close(self) -> None:
        self.store.close()
        self.conn.close()

    def reconnect(self) -> None:
        if self.conn.closed:
            self.conn = _connect(self.f.postgres_dsn)

    def apply(self, session_ids: Sequence[str], path: str) -> Applied:
        """Read the sessions whole; merge those whose digest changed, in one transaction.

        After a notification (``path`` "notify") the messages PostgreSQL already holds
        by seq are not sent again: Redis lists are contiguous, so every seq below the
        session's next_seq is there or was trimmed away. The sweeper sends whole
        sessions, so that a message rewritten at an old seq is still recorded as a
        conflict.
        """
        reads = self.store.read_sessions(sorted(set(session_ids)))
        gone = [r.session_id for r in reads if r.state is None and r.error is None]
        present = [r for r in reads if r.state is not None or r.error is not None]
        digests = {r.session_id: digest(r) for r in present}
        good, bad, _ = sort_reads(present, self.f.options.max_value_bytes)
        with self.conn.transaction():
            known = {bytes(key): (stored, next_seq) for key, stored, next_seq in
                     self.conn.execute(query("follow_known"), {
                         "follower_id": self.f.follower_id,
                         "keys": [_key(r.session_id) for r in present],
                         "ids": [r.session_id if r.error is None else None for r in present],
                     }).fetchall()}
            fresh = [s for s in good if known[_key(s.session_id)][0] != digests[s.session_id]]
            spoilt = [(r, why) for r, why in bad
                      if known[_key(r.session_id)][0] != digests[r.session_id]]
            merge_states(self.conn, fresh if path == "sweep" else
                         [_after(s, known[_key(s.session_id)][1]) for s in fresh])
            for read, reason in spoilt:
                record_quarantine(self.conn, Quarantined.from_read(read, self.f.source, reason),
                                  None)
            changed = [s.session_id for s in fresh] + [r.session_id for r, _ in spoilt]
            self.conn.execute(query("follow_record"), {
                "follower_id": self.f.follower_id, "source": self.f.source,
                "keys": [_key(sid) for sid in changed],
                "digests": [digests[sid] for sid in changed],
                "resolved": [_key(s.session_id) for s in fresh],
            })
        self.f.totals.add(applied=len(fresh), quarantined=len(spoilt))
        APPLIED.labels(path).inc(len(fresh))
        if fresh and self.f.on_applied is not None:
            self.f.on_applied(fresh)
        return Applied(fresh, len(spoilt), gone)

    def confirm_gone(self, session_ids: Sequence[str], path: str) -> list[str]:
        """Read the sessions again; record those still gone as expired. Returns those."""
        still = self.apply(session_ids, path).gone
        if not still:
            return []
        with self.conn.transaction():
            marked = self.conn.execute(query("follow_mark_gone"), {
                "ids": sorted(still), "legal_from": list(_EXPIRED_FROM),
                "data": Jsonb(_GONE_DATA)}).fetchall()
            self.conn.execute(query("follow_record_gone"), {
                "follower_id": self.f.follower_id, "keys": [_key(sid) for sid in still]})
        self.f.totals.add(expired=len(marked))
        EXPIRED.inc(len(marked))
        return still


# -- the threads -----------------------------------------------------------------------


class _Listener(threading.Thread):
    """Receives one Redis server's keyspace notifications into the pending sessions.

    redis-py re-subscribes by itself after a lost connection, silently: a second
    subscription confirmation is how the follower learns that notifications were
    lost, and asks the sweeper to catch up from the last moment it was sure of.
    """

    def __init__(self, follower: _Follower, name: str, client: Any) -> None:
        super().__init__(name=f"memshift-follow-{name}", daemon=True)
        self.f = follower
        self.client = client
        self.node = name
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        self.patterns = follower.keymap.patterns(db)
        self.prefix_len = len(b"__keyspace@%d__:" % db)
        self.subscribed = threading.Event()

    def run(self) -> None:
        alive = time.monotonic()
        first = True
        while not self.f.stopping.is_set():
            try:
                with self.client.pubsub() as pubsub:
                    pubsub.psubscribe(*self.patterns)
                    confirmations = 0
                    while not self.f.stopping.is_set():
                        message = pubsub.get_message(timeout=0.2)
                        if message is None:
                            alive = time.monotonic()
                            continue
                        if message["type"] == "psubscribe":
                            confirmations += 1
                            if confirmations > len(self.patterns) or not first:
                                self.f.lost(self.node, alive)
                            if confirmations >= len(self.patterns):
                                first = False
                                self.subscribed.set()
                            continue
                        alive = time.monotonic()
                        self._receive(message, alive)
            except (RedisError, OSError) as exc:
                log.warning("keyspace notifications from %s lost (%s); reconnecting",
                            self.node, redact(str(exc)))
                self.f.stopping.wait(1.0)
            except BaseException as exc:  # a bug: stop, rather than follow deaf
                self.f.crashed(exc)
                raise

    def _receive(self, message: dict[str, Any], at: float) -> None:
        if message["data"] in _IGNORED_EVENTS:
            return
        session_id = self.f.keymap.session_of(message["channel"][self.prefix_len :])
        if session_id is not None:
            self.f.pending.add(session_id, at)
            EVENTS.inc()


class _Sweeper(threading.Thread):
    """Reads every session on a schedule and applies those that changed.

    A sweep asked for because notifications may have been lost (at start, after a
    reconnect) holds the position back to the moment they may have been lost from,
    until a sweep that started after the request has finished.
    """

    def __init__(self, follower: _Follower) -> None:
        super().__init__(name="memshift-follow-sweeper", daemon=True)
        self.f = follower
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._requests: list[float] = []  # floors of sweeps asked for, not begun
        self._covering: list[float] = []  # floors the running sweep will clear

    def request(self, floor: float) -> None:
        with self._lock:
            self._requests.append(floor)
        self._wanted.set()

    def floor(self) -> float | None:
        with self._lock:
            return min(self._requests + self._covering, default=None)

    def wake(self) -> None:
        """Stop waiting for the next sweep (the follower is stopping)."""
        self._wanted.set()

    def run(self) -> None:
        applier: _Applier | None = None
        next_at = time.monotonic()
        while not self.f.stopping.is_set():
            self._wanted.wait(max(0.0, next_at - time.monotonic()))
            if self.f.stopping.is_set():
                break
            self._wanted.clear()
            with self._lock:
                self._covering += self._requests
                self._requests = []
            try:
                applier = applier or _Applier(self.f)
                applier.reconnect()
                if not self.sweep(applier):
                    break  # stopping
                with self._lock:
                    self._covering = []
                next_at = time.monotonic() + self.f.options.sweep_seconds
            except (MemshiftError, psycopg.Error, RedisError) as exc:
                log.warning("sweep failed (%s); trying again in 5 s", redact(str(exc)))
                with self._lock:
                    self._requests += self._covering
                    self._covering = []
                next_at = time.monotonic() + 5.0
            except BaseException as exc:  # a bug: stop the follower, do not sweep wrongly
                self.f.crashed(exc)
                raise
        if applier is not None:
            applier.close()

    def sweep(self, applier: _Applier) -> bool:
        """One sweep; False when the follower stopped before it finished."""
        conn, options = applier.conn, self.f.options
        (since,) = conn.execute(query("follow_sweep_started"),
                                {"follower_id": self.f.follower_id}).fetchone() or (None,)
        conn.execute(query("follow_seen_reset"))
        scanned = applied = 0
        vanished: list[str] = []
        for chunk in _chunks(applier.store.list_sessions(batch_size=options.scan_count),
                             options.batch_size):
            if self.f.stopping.is_set():
                return False
            conn.execute(query("follow_seen_add"), {"keys": [_key(sid) for sid in chunk]})
            done = applier.apply(chunk, "sweep")
            scanned += len(chunk)
            applied += len(done.merged) + done.quarantined
            vanished += done.gone
        for batch in self._unseen(conn, since, options.batch_size):
            if self.f.stopping.is_set():
                return False
            applier.confirm_gone(batch, "sweep")
        for start in range(0, len(vanished), options.batch_size):
            applier.confirm_gone(vanished[start : start + options.batch_size], "sweep")
        conn.execute(query("follow_sweep_finished"), {
            "follower_id": self.f.follower_id, "scanned": scanned, "applied": applied})
        SWEEPS.inc()
        log.info("sweep done: %d sessions read, %d changed", scanned, applied)
        return True

    def _unseen(self, conn: psycopg.Connection[Any], since: datetime | None,
                size: int) -> Iterator[list[str]]:
        """Sessions applied before the sweep began that it did not find: gone, maybe."""
        after = b""
        while True:
            rows = conn.execute(query("follow_unseen"), {
                "follower_id": self.f.follower_id, "since": since, "after": after,
                "limit": size}).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [bytes(row[0]).decode("utf-8", "surrogateescape") for row in rows]


def _chunks(ids: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for sid in ids:
        chunk.append(sid)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- the follower ----------------------------------------------------------------------


@dataclass
class FollowStatus:
    """The follower as it is now: for the CLI's status lines and for scripts."""

    follower_id: int = 0
    lag_seconds: float = 0.0
    pending_sessions: int = 0
    events: int = 0
    events_per_second: float = 0.0
    sessions_applied: int = 0
    sessions_per_second: float = 0.0
    sessions_expired: int = 0
    quarantined: int = 0
    caught_up: bool = False  # no catch-up sweep is due or running

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


_TRANSIENT = (MemshiftError, psycopg.Error, RedisError)


class _Follower:
    """The orchestration: listeners feed ``pending``; this thread applies it; a sweeper
    catches up; the heartbeat writes the position."""

    main: _Applier

    def __init__(self, settings: Settings, options: FollowOptions,
                 on_applied: Callable[[list[SessionState]], None] | None) -> None:
        self.redis_url, self.postgres_dsn = require_stores(settings, "follow")
        self.options = options
        self.layout = get_layout(options.layout, options.prefix)
        self.keymap = KeyMap(self.layout)
        self.source = f"{options.layout}:{options.prefix}"  # as quarantine entries name it
        self.on_applied = on_applied
        self.pending = _Pending()
        self.totals = _Totals()
        self.stopping = threading.Event()
        self.follower_id = 0
        self.error: BaseException | None = None  # why a thread of it failed
        self.sweeper = _Sweeper(self)
        self.listeners: list[_Listener] = []
        self.workers: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _gone and _inflight, shared by the workers
        self._gone: dict[str, tuple[float, float]] = {}  # sid -> (first change, seen gone)
        self._inflight: dict[int, float] = {}  # worker -> its batch's oldest change
        self._written = {"events": 0, "applied": 0, "expired": 0, "quarantined": 0}
        self._beat_at = time.monotonic()
        self.status = FollowStatus()

    # -- start -------------------------------------------------------------------------

    def start(self, stack: ExitStack) -> None:
        self.main = _Applier(self)
        stack.callback(self.main.close)
        ensure_notifications(self.main.store.client, self.layout,
                             configure=self.options.configure_redis)
        self._check_stage()
        conn = self.main.conn
        if isinstance(self.layout, PreparesPostgres):  # as backfill: its tables first
            self.layout.prepare_postgres(conn)
        params = {"source": redact(self.redis_url), "layout": self.options.layout,
                  "prefix": self.options.prefix}
        row = conn.execute(query("follow_register"), params).fetchone()
        assert row is not None
        self.follower_id = row[0]
        self._take_lock()
        row = conn.execute(query("follow_start"), {
            "follower_id": self.follower_id,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}).fetchone()
        assert row is not None
        # Notifications from the last position on were lost (or this is the first
        # start): subscribe first, then sweep, so that nothing falls between the two.
        self.sweeper.request(time.monotonic() - max(0.0, float(row[0])))
        self.listeners = [_Listener(self, name, node)
                          for name, node in _primaries(self.main.store.client).items()]
        for listener in self.listeners:
            listener.start()
        for listener in self.listeners:
            if not listener.subscribed.wait(10.0):
                raise StoreUnavailable(
                    f"could not subscribe to keyspace notifications on {listener.node} "
                    "within 10 s; check that Redis runs and accepts PSUBSCRIBE"
                )
        self.sweeper.start()
        for n in range(self.options.workers):
            applier = _Applier(self)
            stack.callback(applier.close)
            worker = threading.Thread(target=self._work, args=(n, applier), daemon=True,
                                      name=f"memshift-follow-apply-{n}")
            self.workers.append(worker)
            worker.start()
        log.info("following %s (%s) as follower %d", redact(self.redis_url), self.source,
                 self.follower_id)

    def _take_lock(self) -> None:
        row = self.main.conn.execute(query("follow_lock"), {
            "space": _LOCK_SPACE, "follower_id": self.follower_id}).fetchone()
        if not row or not row[0]:
            self.follower_id = 0  # not ours: leave the row to the process that holds it
            raise FollowerBusy(
                f"another memshift follow already follows {redact(self.redis_url)} "
                f"({self.source}); stop it first (see `memshift follow --status`), or "
                "follow another --prefix"
            )

    def _check_stage(self) -> None:
        stage = load_plan(self.main.conn).stage
        if stage not in _FOLLOWED_STAGES:
            raise FollowRefused(
                f"the Plan is at stage {stage}: PostgreSQL is the primary, so there is "
                "nothing to follow in Redis; follow mode is for the stages before pg_primary"
            )

    def crashed(self, exc: BaseException) -> None:
        """A thread failed in a way retrying cannot mend: stop everything, keep why."""
        self.error = self.error or exc
        self.stopping.set()
        self.pending.wake()

    def lost(self, node: str, since: float) -> None:
        log.warning("notifications from %s may have been lost while its connection was "
                    "down: a sweep catches up", node)
        self.sweeper.request(since)

    # -- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, report: Callable[[FollowStatus], None] | None,
            report_seconds: float) -> None:
        """Housekeeping until stopped: gone sessions, the heartbeat, reports, the stage."""
        options = self.options
        next_beat = next_report = next_stage = time.monotonic()
        while not stop.is_set() and not self.stopping.is_set():
            stop.wait(min(0.1, options.settle_seconds or 0.1))
            now = time.monotonic()
            self._recheck_gone(now)
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + options.heartbeat_seconds
            if report is not None and now >= next_report:
                report(self.status)
                next_report = now + report_seconds
            if now >= next_stage:
                try:
                    self._check_stage()
                except _TRANSIENT[1:] as exc:
                    self._recover(exc)
                next_stage = now + 5.0

    def _work(self, n: int, applier: _Applier) -> None:
        """A worker: take the sessions whose changes are due, re-read and merge them."""
        collapse, size = self.options.collapse_seconds, self.options.batch_size
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                oldest = self.pending.oldest()
                if oldest is None or oldest + collapse > now:
                    self.pending.wait(0.5 if oldest is None else oldest + collapse - now)
                    continue
                batch = self.pending.take(now - collapse, size)
                if batch:
                    self._apply(n, applier, batch)
        except BaseException as exc:  # a bug: stop, rather than leave changes unapplied
            self.crashed(exc)
            raise

    def _apply(self, n: int, applier: _Applier, batch: dict[str, float]) -> None:
        with self._lock:
            self._inflight[n] = min(batch.values())
        try:
            done = applier.apply(list(batch), "notify")
        except _TRANSIENT as exc:
            self.pending.put_back(batch)
            log.warning("applying changes failed (%s); retrying in 1 s", redact(str(exc)))
            self.stopping.wait(1.0)
            try:
                applier.reconnect()
            except (psycopg.Error, MemshiftError) as again:
                log.warning("PostgreSQL is still unreachable (%s)", redact(str(again)))
            return
        finally:
            with self._lock:
                self._inflight.pop(n, None)
        now = time.monotonic()
        with self._lock:
            for sid in done.gone:
                self._gone.setdefault(sid, (batch[sid], now))
            for state in done.merged:
                self._gone.pop(state.session_id, None)

    def _recheck_gone(self, now: float) -> None:
        with self._lock:
            due = [sid for sid, (_, seen) in self._gone.items()
                   if seen + self.options.settle_seconds <= now][: self.options.batch_size]
        if not due:
            return
        try:
            self.main.confirm_gone(due, "notify")
        except _TRANSIENT as exc:
            self._recover(exc)
            return
        with self._lock:
            for sid in due:
                self._gone.pop(sid, None)

    def _recover(self, exc: BaseException) -> None:
        log.warning("applying changes failed (%s); retrying in 1 s", redact(str(exc)))
        self.stopping.wait(1.0)
        try:
            if self.main.conn.closed:
                self.main.reconnect()
                self._take_lock()
        except (psycopg.Error, StoreUnavailable) as again:
            log.warning("PostgreSQL is still unreachable (%s)", redact(str(again)))

    # -- position ----------------------------------------------------------------------

    def lag(self, now: float) -> float:
        """Seconds since the oldest change that may not be in PostgreSQL yet."""
        with self._lock:
            marks = [self.pending.oldest(), self.sweeper.floor(), *self._inflight.values(),
                     *(first for first, _ in self._gone.values())]
        oldest = min((m for m in marks if m is not None), default=now)
        return max(0.0, now - oldest)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        lag = self.lag(now)
        counts = self.totals.snapshot() | {"events": self.pending.events}
        delta = {name: counts[name] - self._written[name] for name in counts}
        seconds = max(now - self._beat_at, 1e-9)
        rates = {"eps": delta["events"] / seconds, "sps": delta["applied"] / seconds}
        try:
            self.main.conn.execute(query("follow_heartbeat"), {
                "follower_id": self.follower_id, "lag": lag, **delta, **rates})
        except psycopg.Error as exc:
            self._recover(exc)  # the counts go with the next beat that gets through
            return
        self._written, self._beat_at = counts, now
        LAG.set(lag)
        PENDING.set(len(self.pending))
        self.status = FollowStatus(
            self.follower_id, round(lag, 3), len(self.pending), counts["events"],
            round(rates["eps"], 1), counts["applied"], round(rates["sps"], 1),
            counts["expired"], counts["quarantined"], self.sweeper.floor() is None)

    def stop(self, *, cleanly: bool) -> None:
        self.stopping.set()
        self.pending.wake()
        self.sweeper.wake()
        # Joined before the clients they read from are closed.
        for thread in (self.sweeper, *self.listeners, *self.workers):
            if thread.is_alive():
                thread.join(timeout=30)
        if cleanly and self.follower_id and not self.main.conn.closed:
            self._heartbeat()
            self.main.conn.execute(query("follow_stop"), {"follower_id": self.follower_id})


def follow(
    settings: Settings,
    options: FollowOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_status: Callable[[FollowStatus], None] | None = None,
    report_seconds: float = 10.0,
    on_applied: Callable[[list[SessionState]], None] | None = None,
) -> FollowStatus:
    """Follow ``settings.redis_url`` into ``settings.postgres_dsn`` until ``stop`` is set.

    Raises NotificationsOff when Redis lacks the keyspace notifications the layout
    needs (unless ``options.configure_redis``), FollowerBusy when another process
    follows the same source, FollowRefused when the Plan is at ``pg_primary`` or later.
    Stops by itself, cleanly, when the Plan reaches ``pg_primary``. ``on_status`` gets
    the status every ``report_seconds``; ``on_applied`` each batch of sessions merged
    (from the follower's threads: it must be thread-safe). A follower stopped through
    ``stop`` (or Ctrl-C) is recorded as stopped, so the Plan's gates no longer wait
    for it; one that dies keeps its position, and its lag grows until a new one has
    caught up.
    """
    options = options or FollowOptions(layout=settings.layout, prefix=settings.prefix)
    stop = stop or threading.Event()
    follower = _Follower(settings, options, on_applied)
    cleanly = False
    with ExitStack() as stack:
        try:
            follower.start(stack)
            try:
                follower.run(stop, on_status, report_seconds)
            except FollowRefused as exc:
                log.warning("%s: stopping", exc)
            cleanly = follower.error is None
        except KeyboardInterrupt:
            cleanly = True
            raise
        finally:
            follower.stop(cleanly=cleanly)
    if follower.error is not None:
        raise MemshiftError(
            f"memshift follow stopped: one of its threads failed ({follower.error!r}); "
            "its position is kept, so a restarted follower catches up"
        ) from follower.error
    return follower.status


# -- status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowerRow:
    """One follower as PostgreSQL records it (``memshift follow --status``)."""

    follower_id: int
    source: str
    layout: str
    prefix: str
    state: str
    worker: str | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    applied_through: datetime
    lag_seconds: float
    events: int
    sessions_applied: int
    sessions_expired: int
    quarantined: int
    events_per_second: float
    sessions_per_second: float
    sweeps: int
    last_sweep_started_at: datetime | None
    last_sweep_finished_at: datetime | None
    last_sweep_scanned: int | None
    last_sweep_applied: int | None

    @property
    def responding(self) -> bool:
        """A running follower whose heartbeat is recent (else it died or hangs)."""
        return self.state == "running" and self.heartbeat_age_seconds < 10.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"responding": self.responding}


def followers(conn: psycopg.Connection[Any]) -> list[FollowerRow]:
    """Every follower with its position, lag, counters and last sweep."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("follow_status")).fetchall()
    return [FollowerRow(**row) for row in rows]
