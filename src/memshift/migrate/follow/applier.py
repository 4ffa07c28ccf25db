"""The applier: re-reads sessions whole and merges those whose Redis replies changed
since the follower last applied them; records those gone from Redis as expired."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from memshift.errors import StoreUnavailable
from memshift.migrate.backfill import connect, sort_reads
from memshift.migrate.bulk import merge_states
from memshift.migrate.follow.notifications import command_name
from memshift.migrate.quarantine import Quarantined, record_quarantine
from memshift.model import SessionState, legal_sources
from memshift.observe.metrics import REGISTRY
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.stores.layouts import RawSession
from memshift.stores.redis import RedisStore

if TYPE_CHECKING:
    from memshift.migrate.follow.follower import Follower

_TTL_COMMANDS = frozenset({"PTTL", "TTL", "PEXPIRETIME", "EXPIRETIME"})
_GONE_DATA = {"by": "memshift follow", "why": "gone from Redis (deleted, expired or evicted)"}
_EXPIRED_FROM = legal_sources("expired")

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


def digest(read: RawSession) -> bytes:
    """A digest of the replies a session was read from, its TTL left out.

    Equal digests mean Redis held the same session; the TTL counts down between reads
    and is not followed (PostgreSQL takes a new expiry only with a newer version). A
    hash's fields come in Redis's order, which a rehash may change: they are sorted.
    (Pickle is only a fast, exact serialisation of the replies here, never loaded.)
    """
    kept = [sorted(reply.items()) if isinstance(reply, dict) else reply
            for command, reply in zip(read.commands, read.replies, strict=True)
            if command_name(command) not in _TTL_COMMANDS]
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


def session_key(session_id: str) -> bytes:
    return session_id.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Applied:
    """What one apply did: sessions merged (they had changed) and those read as gone."""

    merged: list[SessionState]
    quarantined: int
    gone: list[str]


class Applier:
    """Re-reads sessions and merges the changed ones, on one connection of its own."""

    def __init__(self, follower: Follower) -> None:
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
                         "keys": [session_key(r.session_id) for r in present],
                         "ids": [r.session_id if r.error is None else None for r in present],
                     }).fetchall()}
            fresh = [s for s in good
                     if known[session_key(s.session_id)][0] != digests[s.session_id]]
            spoilt = [(r, why) for r, why in bad
                      if known[session_key(r.session_id)][0] != digests[r.session_id]]
            merge_states(self.conn, fresh if path == "sweep" else
                         [_after(s, known[session_key(s.session_id)][1]) for s in fresh])
            for read, reason in spoilt:
                record_quarantine(self.conn, Quarantined.from_read(read, self.f.source, reason),
                                  None)
            changed = [s.session_id for s in fresh] + [r.session_id for r, _ in spoilt]
            self.conn.execute(query("follow_record"), {
                "follower_id": self.f.follower_id, "source": self.f.source,
                "keys": [session_key(sid) for sid in changed],
                "digests": [digests[sid] for sid in changed],
                "resolved": [session_key(s.session_id) for s in fresh],
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
                "follower_id": self.f.follower_id, "keys": [session_key(sid) for sid in still]})
        self.f.totals.add(expired=len(marked))
        EXPIRED.inc(len(marked))
        return still
