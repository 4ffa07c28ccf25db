"""``memshift inspect SESSION``: one session as both stores hold it, and what the
control plane knows of it. What an on-call engineer opens when a session stalls.

An :class:`Inspection` holds:

- the session as Redis and as PostgreSQL hold it, read and judged by parity's own
  :func:`~memshift.migrate.parity.judge_batch` (so the diffs are exactly what
  ``memshift parity`` would report, re-read once when they differ, so that a write
  in flight shows as ``pending``);
- its recorded parity results, newest first;
- which store each read path serves it from under the current Plan (the stage, the
  slice's cohort and tenant lists, and pending repairs, as the router decides);
- its repair queue rows and quarantine entries.

Values that may hold user data (message content, summary text, checkpoint state,
tool errors) are shown as length and hash unless ``show_values`` is asked for, as
in parity. ``memshift inspect --json`` prints :meth:`Inspection.as_json`; the
dashboard's session page renders the same object.
"""

from __future__ import annotations

import ast
import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, get_args

import psycopg
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from memshift import model
from memshift.config import Settings, require_stores
from memshift.errors import MemshiftError, SessionNotFound, StoreUnavailable
from memshift.migrate.parity import (
    READABLE,
    ParityReport,
    error_report,
    fingerprint,
    iso_z,
    judge_batch,
)
from memshift.migrate.plan import Plan, Stage, StoreName, load_plan
from memshift.migrate.quarantine import QuarantineEntry
from memshift.model import SessionState, check_session_id, now
from memshift.observe.control_plane import (
    RecordedResult,
    RepairEntry,
    open_control_plane,
    parity_results,
    quarantine_of,
    repair_entries,
)
from memshift.stores.layouts import Layout
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

DEFAULT_TAIL = 10  # transcript messages shown, the latest
PARITY_HISTORY = 10  # recorded parity results shown, the latest
# The read path the router uses when the application names none.
DEFAULT_READ_PATH = "default"
STORES: tuple[StoreName, StoreName] = ("redis", "postgres")


class NotInEitherStore(SessionNotFound):
    """Neither store holds the session, and no control-plane row names it."""

    def __init__(self, session_id: str, layout: Layout):
        MemshiftError.__init__(
            self,
            f"session {session_id!r} is in neither Redis ({layout.name} layout, prefix "
            f"{layout.prefix!r}) nor PostgreSQL, and no parity result, repair or quarantine "
            "entry names it; check the id, and --prefix / --layout if your sessions live "
            "under other keys",
        )
        self.session_id = session_id
        self.store = "Redis or PostgreSQL"


@dataclass(frozen=True)
class ReadRoute:
    """Where one read path is served from for this session under the Plan."""

    read_path: str
    store: StoreName
    reason: str  # stage | slice | repair_pending (the router's ReadReason)
    why: str

    def as_json(self) -> dict[str, Any]:
        return {"read_path": self.read_path, "store": self.store, "reason": self.reason,
                "why": self.why}


def read_routes(
    plan: Plan, session_id: str, tenant_id: str | None, pending: set[str]
) -> list[ReadRoute]:
    """The store each read path serves ``session_id`` from, and why.

    The paths are the Plan's slices and the router's default path. ``pending`` names
    the stores with repairs queued for this session: the router reads the other one
    until they drain. (A router whose Plan went stale reads Redis meanwhile before
    pg_primary, and PostgreSQL without the cache in retired; one that cannot reach a
    secondary reads the primary: both are per process.)
    """
    primary, _ = plan.writes()
    routes = []
    for path in sorted({DEFAULT_READ_PATH, *plan.slices}):
        store = plan.read_source(path, session_id, tenant_id)
        reason = "stage" if store == primary else "slice"
        why = _why(plan, path, session_id, tenant_id, store)
        if store in pending:
            other: StoreName = "postgres" if store == "redis" else "redis"
            why = (f"repairs are queued for {store}, so {other} serves it until they drain "
                   f"(otherwise: {why})")
            store, reason = other, "repair_pending"
        routes.append(ReadRoute(path, store, reason, why))
    return routes


def _why(plan: Plan, path: str, sid: str, tenant: str | None, store: StoreName) -> str:
    if plan.stage is Stage.RETIRED:
        return "stage retired: PostgreSQL serves every read, through the Redis cache-aside"
    if plan.stage is Stage.PG_PRIMARY:
        return "stage pg_primary: PostgreSQL serves every read"
    if plan.stage is not Stage.CUTOVER:
        compared = " (and a sampled share is compared with PostgreSQL)" \
            if plan.stage is Stage.SHADOW else ""
        return f"stage {plan.stage}: Redis serves every read{compared}"
    cut = plan.slices.get(path)
    if cut is None:
        return "no slice for this read path: Redis serves it"
    if tenant is not None and tenant in cut.tenant_deny:
        return f"slice {path!r}: tenant {tenant!r} is denied"
    if cut.tenant_allow and tenant not in cut.tenant_allow:
        return f"slice {path!r}: tenant {tenant!r} is not in its allow list"
    inside = "in" if store == "postgres" else "not in"
    return f"slice {path!r} at {cut.percent:g} %: this session is {inside} its cohort"


@dataclass(frozen=True)
class Inspection:
    session_id: str
    plan: Plan
    redis: SessionState | None
    redis_error: str | None  # why Redis could not read it (or was unreachable)
    postgres: SessionState | None
    postgres_error: str | None
    report: ParityReport  # the comparison now, as `memshift parity` makes it
    parity_results: list[RecordedResult]  # recorded ones, newest first
    routes: list[ReadRoute]
    repairs: list[RepairEntry]
    quarantine: list[QuarantineEntry]
    inspected_at: datetime

    def state(self, store: StoreName) -> SessionState | None:
        return self.redis if store == "redis" else self.postgres

    def error(self, store: StoreName) -> str | None:
        return self.redis_error if store == "redis" else self.postgres_error

    def as_json(self, *, show_values: bool = False, tail: int = DEFAULT_TAIL) -> dict[str, Any]:
        """One JSON object; sensitive values as length and hash unless ``show_values``."""
        return {
            "session_id": self.session_id,
            "inspected_at": iso_z(self.inspected_at),
            "plan": {"version": self.plan.version, "stage": str(self.plan.stage)},
            "stores": {store: store_view(self.state(store), self.error(store),
                                         show_values=show_values, tail=tail)
                       for store in STORES},
            "comparison": comparison_json(self.report, show_values=show_values),
            "parity_results": [r.as_json() for r in self.parity_results],
            "read_paths": [r.as_json() for r in self.routes],
            "repair_queue": [r.as_json() for r in self.repairs],
            "quarantine": [quarantine_json(q, show_values=show_values)
                           for q in self.quarantine],
        }

    def side_by_side(self, *, show_values: bool = False, tail: int = DEFAULT_TAIL) -> list[Row]:
        """The two stores as rows of (section, field, Redis, PostgreSQL), for people."""
        return side_by_side(self.redis, self.redis_error, self.postgres, self.postgres_error,
                            show_values=show_values, tail=tail)


def comparison_json(report: ParityReport, *, show_values: bool) -> dict[str, Any]:
    """The parity report for JSON; a store's read error in it redacted as a reason is."""
    data = report.as_json(show_values=show_values)
    for diff in data["diffs"]:
        if diff["check"] == READABLE:
            for store in STORES:
                if isinstance(diff[store], str):
                    diff[store] = shown_reason(diff[store], show_values)
    return data


def quarantine_json(entry: QuarantineEntry, *, show_values: bool) -> dict[str, Any]:
    """A quarantine entry for JSON; its reason redacted unless ``show_values``."""
    return {"id": entry.id, "source": entry.source, "session_id": entry.session_id,
            "reason": shown_reason(entry.reason, show_values), "state": entry.state,
            "seen": entry.seen, "first_seen": iso_z(entry.first_seen),
            "last_seen": iso_z(entry.last_seen),
            "dismissed_at": iso_z(entry.dismissed_at) if entry.dismissed_at else None,
            "dismissed_by": entry.dismissed_by, "dismissed_reason": entry.dismissed_reason}


# -- reading ------------------------------------------------------------------------


def inspect_session(
    settings: Settings, session_id: str, *, settle_seconds: float = 0.2,
    history: int = PARITY_HISTORY,
) -> Inspection:
    """Inspect one session (both stores and the control plane); read-only.

    Raises :class:`NotInEitherStore` (a ``SessionNotFound``) when neither store holds
    it and nothing in the control plane names it. A Redis that cannot be reached is
    reported in the inspection (``redis_error``); PostgreSQL holds the control plane,
    so without it this raises ``StoreUnavailable``.
    """
    sid = check_session_id(session_id)
    redis_url, postgres_dsn = require_stores(settings, "inspect")
    with open_control_plane(postgres_dsn) as conn, \
            PostgresStore(postgres_dsn, min_size=1, max_size=1) as truth, \
            RedisStore(redis_url, layout=settings.layout, prefix=settings.prefix) as legacy:
        return inspect_with(conn, legacy, truth, sid, settle_seconds=settle_seconds,
                            history=history)


def inspect_with(
    conn: psycopg.Connection[Any], legacy: RedisStore, truth: PostgresStore, session_id: str,
    *, settle_seconds: float = 0.2, history: int = PARITY_HISTORY,
) -> Inspection:
    """:func:`inspect_session` on stores and a connection the caller holds open."""
    plan = load_plan(conn)
    try:
        (judged,) = judge_batch(legacy, truth, [session_id], settle_seconds)
        redis_state, redis_error = judged.redis.state, judged.redis.error
        pg_state, pg_error, report = judged.postgres, judged.postgres_error, judged.report
    except StoreUnavailable as exc:  # Redis is down; PostgreSQL (the control plane) is not
        redis_state, redis_error = None, str(exc)
        pg_state, pg_error = _load(truth, session_id)
        report = error_report(session_id, str(exc), now(), "redis")
    results = parity_results(conn, session_id, limit=history)
    repairs = repair_entries(conn, session_id=session_id)
    quarantined = quarantine_of(conn, session_id)
    held = (redis_state, redis_error, pg_state, pg_error) != (None, None, None, None)
    if not (held or results or repairs or quarantined):
        raise NotInEitherStore(session_id, legacy.layout)
    primary, _ = plan.writes()
    first = (redis_state, pg_state) if primary == "redis" else (pg_state, redis_state)
    tenant = next((s.session.tenant_id for s in first if s is not None), None)
    routes = read_routes(plan, session_id, tenant, {r.target for r in repairs})
    return Inspection(session_id, plan, redis_state, redis_error, pg_state, pg_error, report,
                      results, routes, repairs, quarantined, now())


def _load(truth: PostgresStore, session_id: str) -> tuple[SessionState | None, str | None]:
    try:
        return truth.load_session(session_id), None
    except MemshiftError as exc:
        return None, str(exc)


# -- presenting ---------------------------------------------------------------------


def shown(value: Any, show_values: bool) -> Any:
    """A sensitive value: itself with ``show_values``, else its length and hash."""
    if show_values or value is None:
        return value
    return fingerprint(value)


# A text or bytes literal as repr() writes it: how readers quote keys and bad values.
_LITERAL = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" r'|b?"(?:[^"\\\n]|\\.)*"')
_PLACE_END = ": "


def shown_reason(reason: str, show_values: bool) -> str:
    """Why a record could not be read (a quarantine reason, a store's read error), for
    people: the record's own text in it as length and hash unless ``show_values``.

    A reason names the place first (``session 'S', key 'K' field 'F'``), which is
    kept, and then says what is wrong, where readers quote the bad value
    (``'yesterday' is neither ISO 8601 ...``, ``is not valid JSON (...): '{"content":
    ...'``). In that part each quoted text becomes ``[N chars #hash]``, unless it is a
    single character or a word of the model's schema (a field name, a status pydantic
    lists as allowed): those say nothing of what the record holds.
    """
    if show_values:
        return reason
    place, problem = _split_place(reason)
    return place + _LITERAL.sub(_redacted_literal, problem)


def _split_place(reason: str) -> tuple[str, str]:
    """(the place, what is wrong): split at the first ``": "`` outside quoted text."""
    start = 0
    for literal in _LITERAL.finditer(reason):
        end = reason.find(_PLACE_END, start, literal.start())
        if end >= 0:
            return reason[:end], reason[end:]
        start = literal.end()
    end = reason.find(_PLACE_END, start)
    return (reason[:end], reason[end:]) if end >= 0 else ("", reason)


def _redacted_literal(literal: re.Match[str]) -> str:
    try:
        value = ast.literal_eval(literal[0])
    except (ValueError, SyntaxError):  # not a literal after all: hide it as it stands
        value = literal[0]
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
    if len(text) <= 1 or text in _schema_words():
        return literal[0]
    return display(fingerprint(text))


def shown_raw(raw: Any, show_values: bool) -> Any:
    """A quarantine entry's raw keys (``{key: [{"command", "reply"}, ...]}``; entries
    recorded before memshift kept every command's reply: ``{key: {"command",
    "reply"}}``) for people: each text or bytes value as its length and hash unless
    ``show_values``; the keys, the commands, a hash's field names, numbers and Redis's
    errors as they are."""
    if show_values:
        return raw
    if isinstance(raw, dict):
        if set(raw) == {"b64"}:
            return fingerprint(base64.b64decode(raw["b64"]).decode("utf-8", "surrogateescape"))
        if _hash_read(raw):  # which fields a hash holds is schema, not the user's text
            return raw | {"reply": [[_field_name(field), shown_raw(value, False)]
                                    for field, value in raw["reply"]]}
        return {k: v if k in ("command", "error") else shown_raw(v, False)
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [shown_raw(v, False) for v in raw]
    return fingerprint(raw) if isinstance(raw, str) else raw


def _hash_read(raw: dict[str, Any]) -> bool:
    """An HGETALL and its reply, recorded as ``[[field, value], ...]``."""
    reply = raw.get("reply")
    return (str(raw.get("command", "")).upper() == "HGETALL" and isinstance(reply, list)
            and all(isinstance(pair, list) and len(pair) == 2 for pair in reply))


def _field_name(field: Any) -> Any:
    if isinstance(field, dict) and set(field) == {"b64"}:
        return base64.b64decode(field["b64"]).decode("utf-8", "backslashreplace")
    return field


@cache
def _schema_words() -> frozenset[str]:
    """The model's field names and statuses: the words validation errors quote."""
    records = (model.Session, model.Message, model.ToolRun, model.MemorySummary,
               model.Checkpoint, model.Event)
    fields = {name for record in records for name in record.model_fields}
    statuses = {*get_args(model.SessionStatus), *get_args(model.ToolStatus)}
    return frozenset(fields | statuses)


def store_view(
    state: SessionState | None, error: str | None, *, show_values: bool, tail: int
) -> dict[str, Any]:
    """What one store holds of the session, for JSON (sensitive values redacted)."""
    if error is not None:
        error = shown_reason(error, show_values)
    if state is None:
        return {"present": False, "error": error}
    session = state.session
    summary, checkpoint = state.latest_summary, state.latest_checkpoint
    last_event = state.events[-1] if state.events else None
    return {
        "present": True,
        "error": error,
        "status": session.status,
        "version": session.version,
        "tenant_id": session.tenant_id,
        "user_id": session.user_id,
        "created_at": iso_z(session.created_at),
        "updated_at": iso_z(session.updated_at),
        "expires_at": iso_z(session.expires_at) if session.expires_at else None,
        "message_count": state.message_count,
        "messages_trimmed": session.messages_trimmed,
        "messages_held": len(state.messages),
        "transcript_tail": [
            {"seq": m.seq, "message_id": m.message_id, "role": m.role,
             "content": shown(m.content, show_values), "tool_call_id": m.tool_call_id,
             "ts": iso_z(m.ts)}
            for m in state.messages[-tail:] if tail > 0
        ],
        "tool_runs": [
            {"tool_call_id": t.tool_call_id, "name": t.name, "status": t.status,
             "attempts": t.attempts, "last_error": shown(t.last_error, show_values),
             "updated_at": iso_z(t.updated_at)}
            for t in state.tool_runs
        ],
        "summary": None if summary is None else {
            "version": summary.version, "covers_through": summary.covers_through,
            "updated_at": iso_z(summary.updated_at), "text": shown(summary.text, show_values),
        },
        "summary_versions": sorted(s.version for s in state.summaries),
        "checkpoint": None if checkpoint is None else {
            "checkpoint_id": checkpoint.checkpoint_id, "parent_id": checkpoint.parent_id,
            "step": checkpoint.step, "created_at": iso_z(checkpoint.created_at),
            "state": shown(checkpoint.state, show_values),
        },
        "checkpoints": len(state.checkpoints),
        "events": len(state.events),
        "last_event": None if last_event is None else {
            "event_seq": last_event.event_seq, "type": last_event.type,
            "from": last_event.from_status, "to": last_event.to_status,
            "at": iso_z(last_event.at),
        },
    }


@dataclass(frozen=True)
class Row:
    section: str
    field: str
    redis: str
    postgres: str

    @property
    def differs(self) -> bool:
        return self.redis != self.postgres


ABSENT = "—"


def side_by_side(
    redis_state: SessionState | None, redis_error: str | None,
    pg_state: SessionState | None, pg_error: str | None,
    *, show_values: bool = False, tail: int = DEFAULT_TAIL,
) -> list[Row]:
    """Rows of (section, field, as Redis holds it, as PostgreSQL does) as display text.

    Records are matched by their keys (seq, tool call id); a record one store lacks
    shows as ``—``. Sensitive text is shown as ``[N chars #hash]`` unless asked.
    """
    states = (redis_state, pg_state)

    def text(value: Any) -> str:
        if value is None:
            return ABSENT
        if show_values:
            return value if isinstance(value, str) else str(value)
        return display(fingerprint(value))

    def pair(section: str, name: str, get: Callable[[SessionState], Any]) -> Row:
        values = [ABSENT if s is None else _plain(get(s)) for s in states]
        return Row(section, name, values[0], values[1])

    rows = [Row("store", "held", _held(redis_state, redis_error, show_values),
                _held(pg_state, pg_error, show_values))]
    if redis_state is None and pg_state is None:
        return rows
    rows += [
        pair("session", "status", lambda s: s.session.status),
        pair("session", "version", lambda s: s.session.version),
        pair("session", "tenant", lambda s: s.session.tenant_id),
        pair("session", "updated at", lambda s: iso_z(s.session.updated_at)),
        pair("session", "expires at",
             lambda s: iso_z(s.session.expires_at) if s.session.expires_at else None),
        pair("transcript", "message count", lambda s: s.message_count),
        pair("transcript", "trimmed / held",
             lambda s: f"{s.session.messages_trimmed} / {len(s.messages)}"),
    ]
    by_seq = [{m.seq: m for m in s.messages} if s else {} for s in states]
    seqs = sorted({seq for held in by_seq for seq in held if seq is not None})
    for seq in seqs[-tail:] if tail > 0 else []:
        cells = []
        for held in by_seq:
            m = held.get(seq)
            cells.append(ABSENT if m is None else f"{m.role} {m.message_id}: {text(m.content)}")
        rows.append(Row("transcript", f"seq {seq}", cells[0], cells[1]))
    runs = [{t.tool_call_id: t for t in s.tool_runs} if s else {} for s in states]
    for call_id in sorted(set(runs[0]) | set(runs[1])):
        cells = []
        for by_id in runs:
            t = by_id.get(call_id)
            error = f", last error {text(t.last_error)}" if t and t.last_error else ""
            cells.append(ABSENT if t is None else
                         f"{t.name}: {t.status}, attempts {t.attempts}{error}")
        rows.append(Row("tool runs", call_id, cells[0], cells[1]))
    rows += [
        pair("summary", "latest version",
             lambda s: s.latest_summary.version if s.latest_summary else None),
        pair("summary", "text",
             lambda s: text(s.latest_summary.text) if s.latest_summary else None),
        pair("checkpoint", "latest",
             lambda s: _checkpoint(s) if s.latest_checkpoint else None),
        pair("checkpoint", "state",
             lambda s: text(s.latest_checkpoint.state) if s.latest_checkpoint else None),
        pair("events", "count / last",
             lambda s: f"{len(s.events)}" + (f" / {s.events[-1].from_status} → "
                                             f"{s.events[-1].to_status}" if s.events else "")),
    ]
    return rows


def _plain(value: Any) -> str:
    return ABSENT if value is None else str(value)


def _held(state: SessionState | None, error: str | None, show_values: bool) -> str:
    if error is not None:
        return f"unreadable: {shown_reason(error, show_values)}"
    return "yes" if state is not None else "no"


def _checkpoint(state: SessionState) -> str:
    latest = state.latest_checkpoint
    assert latest is not None
    parent = f", parent {latest.parent_id}" if latest.parent_id else ""
    return f"{latest.checkpoint_id} (step {latest.step}{parent})"


# -- on a terminal ----------------------------------------------------------------------

_STATUS_STYLE = {"pass": "green", "fail": "red", "pending": "yellow", "error": "red"}


def renderables(
    found: Inspection, *, show_values: bool = False, tail: int = DEFAULT_TAIL
) -> list[RenderableType]:
    """Rich tables for a terminal (``memshift inspect``); values redacted by default."""
    plan = found.plan
    status = found.report.parity_status
    head = Text.assemble(
        ("session ", "bold"), (found.session_id, "bold cyan"),
        f"  stage {plan.stage} (Plan version {plan.version})  comparison now: ",
        (status, f"bold {_STATUS_STYLE[status]}"),
        f"  at {iso_z(found.inspected_at)}",
    )
    stores = Table("", "field", "Redis", "PostgreSQL", title="both stores, side by side",
                   title_justify="left")
    section = ""
    for row in found.side_by_side(show_values=show_values, tail=tail):
        style = "red" if row.differs else None
        stores.add_row("" if row.section == section else Text(row.section, "bold"),
                       Text(row.field), Text(row.redis, style or ""),
                       Text(row.postgres, style or ""),
                       end_section=False)
        section = row.section
    parts: list[RenderableType] = [head, stores]
    data = comparison_json(found.report, show_values=show_values)
    if data["diffs"]:
        diffs = Table("check", "field", "Redis", "PostgreSQL", title="diffs now",
                      title_justify="left")
        for d in data["diffs"]:
            diffs.add_row(Text(d["check"], "red"), Text(d["field"]), Text(display(d["redis"])),
                          Text(display(d["postgres"])))
        parts.append(diffs)
    else:
        parts.append(Text(f"diffs now: none ({status})", _STATUS_STYLE[status]))
    routes = Table("read path", "served by", "why", title="read paths under the current Plan",
                   title_justify="left")
    for route in found.routes:
        routes.add_row(Text(route.read_path), Text(route.store, "bold"), Text(route.why))
    parts.append(routes)
    parts.append(_results_table(found.parity_results))
    parts.append(_repairs_table(found.repairs))
    parts.append(_quarantine_table(found.quarantine, show_values))
    if not show_values:
        parts.append(Text("values are shown as length and hash; --show-values shows them",
                          "dim"))
    return parts


def display(value: Any) -> str:
    """A value for people: a fingerprint (length and hash) as ``[N chars #hash]``."""
    if isinstance(value, dict) and set(value) == {"length", "sha256"}:
        return f"[{value['length']} chars #{value['sha256'][:8]}]"
    return ABSENT if value is None else str(value)


def _results_table(results: list[RecordedResult]) -> RenderableType:
    if not results:
        return Text("recorded parity results: none yet (run `memshift parity --session ID`)",
                    "dim")
    table = Table("checked at", "status", "read path", "failed checks",
                  title="recorded parity results, newest first", title_justify="left")
    for r in results:
        table.add_row(iso_z(r.checked_at), Text(r.status, _STATUS_STYLE.get(r.status, "")),
                      Text(r.read_path or "batch"), Text(", ".join(r.failed_checks) or ABSENT))
    return table


def _repairs_table(repairs: list[RepairEntry]) -> RenderableType:
    if not repairs:
        return Text("repair queue: nothing queued for this session", "dim")
    table = Table("id", "target", "operation", "enqueued at", "attempts", "error",
                  title="repair queue", title_justify="left")
    for r in repairs:
        table.add_row(str(r.id), r.target, Text(r.operation), iso_z(r.enqueued_at),
                      str(r.attempts), Text(r.last_error or r.error))
    return table


def _quarantine_table(entries: list[QuarantineEntry], show_values: bool) -> RenderableType:
    if not entries:
        return Text("quarantine: no entry for this session", "dim")
    table = Table("id", "source", "state", "last seen", "reason", title="quarantine",
                  title_justify="left")
    for q in entries:
        table.add_row(str(q.id), Text(q.source), q.state, iso_z(q.last_seen),
                      Text(shown_reason(q.reason, show_values)))
    return table
