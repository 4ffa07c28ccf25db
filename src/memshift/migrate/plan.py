"""The Plan: the migration's stage, its read slices and rules, one versioned row.

Every process routes by the Plan (``Plan.writes``, ``Plan.read_source``); every change
to it is one transaction that checks the gates, bumps the version, appends an audit
row (who, when, why, before, after) and announces the new version with NOTIFY.
Moving forward goes one stage at a time through the gates (``--force`` overrides,
with the reason in the audit); moving back is allowed at once. Processes hold the
Plan through a ``PlanSource``: ``PlanWatcher``/``AsyncPlanWatcher`` (LISTEN/NOTIFY
and a poll; stale after ``max_staleness``) or a fixed ``StaticPlan``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import getpass
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memshift.errors import MemshiftError, SchemaError, StoreUnavailable, ValidationError
from memshift.redact import redact
from memshift.sql.queries import query

StoreName = Literal["redis", "postgres"]
CHANNEL = "memshift_plan"  # NOTIFY channel the Plan's version is announced on
# The retired stage's cache epoch is announced on the same channel, as this + the epoch.
CACHE_EPOCH_NOTICE = "cache_epoch "
_LISTEN = sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL))


class Stage(enum.StrEnum):
    REDIS_ONLY = "redis_only"
    DUAL_WRITE = "dual_write"
    SHADOW = "shadow"
    CUTOVER = "cutover"
    PG_PRIMARY = "pg_primary"
    RETIRED = "retired"

    @property
    def order(self) -> int:
        return _STAGE_ORDER[self]  # every routed read and write asks: no list per call


_STAGE_ORDER = {stage: n for n, stage in enumerate(Stage)}


class GateRefused(MemshiftError):
    """A forward move whose gates do not pass; the message says how to pass them."""

    exit_code = 10


class IllegalMove(MemshiftError):
    exit_code = 10


def in_cohort(session_id: str, percent: float) -> bool:
    """Whether the session is in the first ``percent`` % of sessions.

    A stable hash puts each session in one of 10,000 buckets; a slice of p % takes
    buckets below p * 100. So a session in the cohort stays in it as p grows, in
    every process, on every machine.
    """
    digest = hashlib.blake2b(session_id.encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % 10_000 < round(percent * 100)


class Slice(BaseModel):
    """One read path cut over to PostgreSQL for a cohort of sessions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    read_path: str = Field(min_length=1, max_length=100)
    percent: float = Field(ge=0, le=100)
    tenant_allow: tuple[str, ...] = ()  # when given, only these tenants are cut over
    tenant_deny: tuple[str, ...] = ()  # these tenants never are

    def covers(self, session_id: str, tenant_id: str | None) -> bool:
        if tenant_id is not None and tenant_id in self.tenant_deny:
            return False
        if self.tenant_allow and tenant_id not in self.tenant_allow:
            return False
        return in_cohort(session_id, self.percent)


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    stage: Stage
    slices: dict[str, Slice] = Field(default_factory=dict)
    rules: dict[str, Any] = Field(default_factory=dict)
    changed_at: datetime
    changed_by: str

    @field_validator("slices", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"read_path": k, **v} if isinstance(v, dict) else v)
                    for k, v in value.items()}
        return value

    def writes(self) -> tuple[StoreName, StoreName | None]:
        """(primary, secondary) for writes; the secondary gets the primary's result."""
        if self.stage is Stage.REDIS_ONLY:
            return "redis", None
        if self.stage.order < Stage.PG_PRIMARY.order:
            return "redis", "postgres"
        if self.stage is Stage.PG_PRIMARY:
            return "postgres", "redis"
        return "postgres", None

    def read_source(
        self, read_path: str, session_id: str, tenant_id: str | None = None
    ) -> StoreName:
        """The store that serves this read under this Plan."""
        if self.stage.order >= Stage.PG_PRIMARY.order:
            return "postgres"
        if self.stage is not Stage.CUTOVER:
            return "redis"
        chosen = self.slices.get(read_path)
        return "postgres" if chosen and chosen.covers(session_id, tenant_id) else "redis"

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


def operator() -> str:
    """Who is changing the Plan: $MEMSHIFT_OPERATOR, else user@host."""
    return os.environ.get("MEMSHIFT_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def load_plan(conn: psycopg.Connection[Any]) -> Plan:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("plan_get")).fetchone()
    if row is None:
        raise MemshiftError("the Plan row is missing; run `memshift db upgrade`")
    return Plan.model_validate(row)


def _cache_epoch_of(row: tuple[Any, ...] | None) -> int:
    if row is None:
        raise MemshiftError("the cache epoch row is missing; run `memshift db upgrade`")
    return int(row[0])


def _no_cache_epoch_table() -> SchemaError:
    return SchemaError("memshift.cache_epoch is missing: the schema is older than this "
                       "memshift; run `memshift db upgrade` first")


def load_cache_epoch(conn: psycopg.Connection[Any]) -> int:
    """The retired stage's cache epoch (see stores/_async/cache.py)."""
    try:
        return _cache_epoch_of(conn.execute(query("cache_epoch_get")).fetchone())
    except psycopg.errors.UndefinedTable:
        raise _no_cache_epoch_table() from None


# -- gates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str
    how_to_pass: str


def _backfill_complete(conn: psycopg.Connection[Any]) -> Gate:
    row = conn.execute(query("gate_backfill")).fetchone()
    completed = row[0] if row else 0
    unfinished = conn.execute(query("gate_backfill_unfinished")).fetchall()
    detail = (
        f"{completed} completed backfill run(s) started after the last move back to "
        f"redis_only (if any: writes made there reach Redis alone), {len(unfinished)} "
        "unfinished" + "".join(f"; {_run(*run)}" for run in unfinished)
    )
    how = "run `memshift backfill` until it reports completed"
    if unfinished:
        how += ("; a run you will not finish (e.g. one started against a wrong Redis URL "
                "or prefix): `memshift backfill --abandon RUN_ID --reason ...`")
    return Gate("backfill complete", completed > 0 and not unfinished, detail, how)


def _run(run_id: int, source: str, layout: str, prefix: str, state: str,
         started: datetime) -> str:
    """An unfinished run as the gate names it (its source is stored redacted)."""
    return (f"run {run_id} {state} since {started:%Y-%m-%d %H:%M:%S %Z}: {source}, "
            f"prefix {prefix!r}, layout {layout}")


def _repair_queue_empty(conn: psycopg.Connection[Any]) -> Gate:
    exists = conn.execute("SELECT to_regclass('memshift.repair_queue')").fetchone()
    if not exists or exists[0] is None:
        return Gate("repair queue empty", True, "no repair queue yet", "")
    row = conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone()
    pending = row[0] if row else 0
    return Gate("repair queue empty", pending == 0, f"{pending} repair(s) pending",
                "run `memshift repair` until the queue is empty")


def _quarantine_empty(conn: psycopg.Connection[Any]) -> Gate:
    """Each open quarantine entry is a session missing from PostgreSQL: reading it
    there, or retiring Redis, would lose it. Retry it, or dismiss it (audited)."""
    by_source = conn.execute(query("gate_quarantine")).fetchall()
    total = sum(n for _, n in by_source)
    detail = f"{total:,} open quarantine entr{'y' if total == 1 else 'ies'}" + (
        " (" + ", ".join(f"{n:,} from {source}" for source, n in by_source) + ")"
        if total else "")
    return Gate(
        "no open quarantine", total == 0, detail,
        "see `memshift quarantine list`; fix each session in Redis and run `memshift "
        "quarantine retry`, or accept its loss with `memshift quarantine dismiss ID ... "
        "--reason ...`",
    )


# The parity gate: of the sessions checked, this share must pass their latest check.
PARITY_MIN_PASS_RATE = 99.5  # percent


def _parity_pass_rate(conn: psycopg.Connection[Any]) -> Gate:
    name = "parity pass rate (each session's latest check)"
    how = ("see what fails (`memshift parity --all` shows the diffs), run `memshift repair "
           "--from-parity`, then `memshift parity --all` again until at least "
           f"{PARITY_MIN_PASS_RATE:g} % of sessions pass")
    exists = conn.execute("SELECT to_regclass('memshift.parity_results')").fetchone()
    if not exists or exists[0] is None:
        return Gate(name, False, "no parity results table yet", "run `memshift db upgrade`")
    row = conn.execute(query("gate_parity")).fetchone()
    judged, passed, errors = row if row else (0, 0, 0)
    if not judged:
        return Gate(name, False, "no parity results yet (checks made before the last move "
                    "back to redis_only do not count: writes made there reach Redis alone)",
                    how)
    rate = 100.0 * passed / judged
    detail = (f"{judged - passed:,} of {judged:,} sessions fail their latest parity check"
              + (f" ({errors:,} could not be read)" if errors else "")
              + f" ({rate:.2f} % pass; need {PARITY_MIN_PASS_RATE:g} %)")
    return Gate(name, rate >= PARITY_MIN_PASS_RATE, detail, how)


# The follower gate: in follow mode (a `memshift follow` runs, or died running)
# PostgreSQL is only as fresh as the follower's position, so moving on waits for it.
FOLLOW_MAX_LAG_SECONDS = 10.0


def _followers(conn: psycopg.Connection[Any]) -> tuple[int, float, str | None]:
    """Followers running (or died running), the furthest one's lag and its prefix."""
    exists = conn.execute("SELECT to_regclass('memshift.followers')").fetchone()
    if not exists or exists[0] is None:
        return 0, 0.0, None
    row = conn.execute(query("gate_follow")).fetchone()
    return (row[0], row[1], row[2]) if row else (0, 0.0, None)


def _follower_lag(conn: psycopg.Connection[Any]) -> Gate | None:
    """None (no gate) unless follow mode is in use."""
    running, lag, prefix = _followers(conn)
    if not running:
        return None
    return Gate(
        "follower lag", lag <= FOLLOW_MAX_LAG_SECONDS,
        f"{running} follower(s); the furthest behind (prefix {prefix}) lags {lag:,.1f} s "
        f"(need at most {FOLLOW_MAX_LAG_SECONDS:g} s)",
        "start `memshift follow` again if it stopped, and wait until `memshift follow "
        "--status` shows it caught up; stop a follower no longer needed with Ctrl-C",
    )


def _parity_when_following(conn: psycopg.Connection[Any]) -> Gate | None:
    """In follow mode no router's dual-writes vouch for PostgreSQL: parity must, first."""
    return _parity_pass_rate(conn) if _followers(conn)[0] else None


GateCheck = Callable[[psycopg.Connection[Any]], Gate | None]

# The gates a forward move into each stage must pass.
GATES: dict[Stage, tuple[GateCheck, ...]] = {
    Stage.DUAL_WRITE: (),
    Stage.SHADOW: (_backfill_complete, _follower_lag, _parity_when_following),
    Stage.CUTOVER: (_backfill_complete, _repair_queue_empty, _quarantine_empty,
                    _parity_pass_rate, _follower_lag),
    Stage.PG_PRIMARY: (_backfill_complete, _repair_queue_empty, _quarantine_empty,
                       _parity_pass_rate, _follower_lag),
    Stage.RETIRED: (_repair_queue_empty, _quarantine_empty),
}


def check_gates(conn: psycopg.Connection[Any], target: Stage) -> list[Gate]:
    return [gate for check in GATES.get(target, ()) if (gate := check(conn)) is not None]


# -- changes ---------------------------------------------------------------------------


def _retired_since_redis_led(conn: psycopg.Connection[Any]) -> bool:
    """Whether the Plan was retired after Redis last led the writes (see queries.sql)."""
    row = conn.execute(query("plan_retired_since_redis_led")).fetchone()
    return bool(row and row[0])


def _change(
    conn: psycopg.Connection[Any],
    action: str,
    why: str,
    mutate: Callable[[Plan], dict[str, Any]],
    *,
    who: str | None = None,
    forced: bool = False,
) -> Plan:
    if not why.strip():
        raise ValidationError("a Plan change needs a reason (--reason): it goes in the audit")
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("plan_lock")).fetchone()
        if row is None:
            raise MemshiftError("the Plan row is missing; run `memshift db upgrade`")
        before = Plan.model_validate(row)
        after = mutate(before)
        person = who or operator()
        new = cur.execute(
            query("plan_put"),
            {
                "version": before.version,
                "stage": str(after["stage"]),
                "slices": Jsonb({k: v.model_dump(mode="json", exclude={"read_path"})
                                 for k, v in after["slices"].items()}),
                "rules": Jsonb(after["rules"]),
                "who": person,
            },
        ).fetchone()
        assert new is not None  # the row is locked: its version cannot have moved
        plan = Plan.model_validate(new)
        cur.execute(
            query("plan_audit_add"),
            {
                "version": plan.version,
                "who": person,
                "why": why,
                "action": action,
                "forced": forced,
                "before": Jsonb(before.as_json()),
                "after": Jsonb(plan.as_json()),
            },
        )
    return plan


def _parts(plan: Plan) -> dict[str, Any]:
    return {"stage": plan.stage, "slices": dict(plan.slices), "rules": dict(plan.rules)}


def set_stage(
    conn: psycopg.Connection[Any], target: Stage | str, why: str, *, force: bool = False,
    who: str | None = None,
) -> Plan:
    """Move to ``target``: one stage forward through its gates, or back at once."""
    try:
        goal = Stage(target)
    except ValueError:
        raise ValidationError(
            f"unknown stage {target!r}; stages, in order: {', '.join(Stage)}"
        ) from None

    def mutate(plan: Plan) -> dict[str, Any]:
        current = plan.stage
        if goal is current:
            raise IllegalMove(f"the Plan is already at stage {goal}")
        if goal.order > current.order:
            if goal.order != current.order + 1:
                following = list(Stage)[current.order + 1]
                raise IllegalMove(
                    f"stages move forward one at a time: from {current} the next is "
                    f"{following}, not {goal}"
                )
            failed = [g for g in check_gates(conn, goal) if not g.passed]
            if failed and not force:
                raise GateRefused(
                    f"moving to {goal} is refused: "
                    + "; ".join(f"gate '{g.name}' fails ({g.detail}): {g.how_to_pass}"
                                for g in failed)
                    + "; or pass --force with a --reason to override"
                )
        elif goal.order < Stage.PG_PRIMARY.order and not force and _retired_since_redis_led(
                conn):
            raise IllegalMove(
                "the Plan was retired, and since then Redis has received no writes (moving "
                "back to pg_primary does not copy them back), so reads cannot go back to it; "
                "stay at pg_primary or later, or --force"
            )
        return _parts(plan) | {"stage": goal}

    return _change(conn, "stage", why, mutate, who=who, forced=force)


def set_slice(
    conn: psycopg.Connection[Any], read_path: str, percent: float, why: str, *,
    tenant_allow: tuple[str, ...] = (), tenant_deny: tuple[str, ...] = (),
    who: str | None = None,
) -> Plan:
    """Cut ``read_path`` over to PostgreSQL for ``percent`` % of sessions."""
    try:
        made = Slice(read_path=read_path, percent=percent, tenant_allow=tenant_allow,
                     tenant_deny=tenant_deny)
    except ValueError as exc:
        raise ValidationError(f"slice {read_path!r}: {exc}") from None

    def mutate(plan: Plan) -> dict[str, Any]:
        return _parts(plan) | {"slices": plan.slices | {read_path: made}}

    return _change(conn, "slice", why, mutate, who=who)


def delete_slice(
    conn: psycopg.Connection[Any], read_path: str, why: str, *, who: str | None = None,
) -> Plan:
    """Remove ``read_path``'s slice (e.g. one set for a mistyped path): audited; its reads
    go to wherever the stage sends reads with no slice."""

    def mutate(plan: Plan) -> dict[str, Any]:
        if read_path not in plan.slices:
            raise IllegalMove(f"no slice for read path {read_path!r}; slices: "
                              f"{', '.join(sorted(plan.slices)) or 'none'}")
        return _parts(plan) | {"slices": {k: v for k, v in plan.slices.items()
                                          if k != read_path}}

    return _change(conn, "slice", why, mutate, who=who)


def set_rules(
    conn: psycopg.Connection[Any], rules: dict[str, Any], why: str, *, who: str | None = None,
) -> Plan:
    """Replace these entries of the Plan's rules (the others stay); validated by the caller."""

    def mutate(plan: Plan) -> dict[str, Any]:
        return _parts(plan) | {"rules": plan.rules | rules}

    return _change(conn, "rules", why, mutate, who=who)


def rollback(
    conn: psycopg.Connection[Any], why: str, *, read_path: str | None = None,
    who: str | None = None,
) -> Plan:
    """Move reads back to Redis at once: one read path, or all of them.

    With a read path, that slice drops to 0 %. Without, every slice drops to 0 % and a
    stage past ``shadow`` moves back to ``shadow`` (Redis primary, serving all reads;
    sessions with repairs still queued keep reading from PostgreSQL until they drain).
    """

    def mutate(plan: Plan) -> dict[str, Any]:
        if read_path is not None:
            if read_path not in plan.slices:
                raise IllegalMove(
                    f"no slice for read path {read_path!r}; slices: "
                    f"{', '.join(plan.slices) or 'none'}"
                )
            zeroed = plan.slices[read_path].model_copy(update={"percent": 0.0})
            return _parts(plan) | {"slices": plan.slices | {read_path: zeroed}}
        if plan.stage is Stage.RETIRED:
            raise IllegalMove(
                "since retirement Redis has received no writes: roll back to pg_primary "
                "with `memshift stage set pg_primary` first"
            )
        if plan.stage.order > Stage.SHADOW.order and _retired_since_redis_led(conn):
            raise IllegalMove(
                "the Plan was retired, and Redis lacks the writes made while it was, so "
                "reads cannot go back to it; roll back a read path (--path) instead, or "
                "`memshift stage set` with --force"
            )
        stage = Stage.SHADOW if plan.stage.order > Stage.SHADOW.order else plan.stage
        slices = {k: v.model_copy(update={"percent": 0.0}) for k, v in plan.slices.items()}
        return _parts(plan) | {"stage": stage, "slices": slices}

    return _change(conn, "rollback", why, mutate, who=who)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    version: int
    at: datetime
    who: str
    why: str
    action: str
    forced: bool
    before: dict[str, Any]
    after: dict[str, Any]


def history(conn: psycopg.Connection[Any], limit: int = 50) -> list[AuditEntry]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("plan_history"), {"limit": limit}).fetchall()
    return [AuditEntry(**row) for row in rows]


# -- sources: how a process knows the current Plan ------------------------------------

log = logging.getLogger("memshift.plan")


@runtime_checkable
class PlanSource(Protocol):
    """Where a router gets the Plan: ``current()`` is (the Plan, whether it is fresh).

    A source that has not refreshed the Plan for too long reports it as not fresh:
    the router then keeps reads on Redis while the stage is before ``pg_primary``.
    """

    def current(self) -> tuple[Plan, bool]: ...

    def repair_targets(self) -> frozenset[str] | None:
        """The stores some repair is pending for, as last seen; None when not watched."""
        ...


@runtime_checkable
class CacheEpochSource(Protocol):
    """A Plan source that also follows the retired stage's cache epoch (the watchers).

    A router whose source is not one asks PostgreSQL for the epoch itself, at most
    once a second.
    """

    def cache_epoch(self) -> int | None:
        """The newest cache epoch seen; None before the first load."""
        ...


class StaticPlan:
    """A fixed Plan (tests, scripts); ``fresh=False`` plays a watcher gone stale.

    It does not watch the repair queue: a router asks the queue itself.
    """

    def __init__(self, plan: Plan, *, fresh: bool = True) -> None:
        self.plan = plan
        self.fresh = fresh

    def current(self) -> tuple[Plan, bool]:
        return self.plan, self.fresh

    def repair_targets(self) -> frozenset[str] | None:
        return None


# LISTEN waits in slices this long, so close() is prompt.
_WAIT_SLICE = 0.25
# How often a watcher looks at which stores repairs are pending for (reads of a
# store with pending repairs ask the queue per session; the others need not).
_REPAIR_POLL = 1.0
# Keepalives, so a connection to a server that went silent fails instead of hanging.
_CONNECT_OPTIONS: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 10_000,
}


class _Freshness:
    """The Plan a watcher holds, when it last refreshed it, and the stale/recovered log."""

    def __init__(self, dsn: str, poll_seconds: float, max_staleness: float) -> None:
        if poll_seconds <= 0 or max_staleness <= 0:
            raise ValidationError(
                f"poll_seconds and max_staleness must be above 0; got {poll_seconds!r}, "
                f"{max_staleness!r}"
            )
        self._dsn = dsn
        self.poll_seconds = poll_seconds
        self.max_staleness = max_staleness
        self._plan: Plan | None = None
        self._refreshed = 0.0
        self._stale = False
        self._lock = threading.Lock()
        self.reloads = 0
        self._repair_targets: frozenset[str] | None = None
        self._repairs_seen = float("-inf")
        self._cache_epoch: int | None = None

    def cache_epoch(self) -> int | None:
        return self._cache_epoch

    def _saw_cache_epoch(self, epoch: int) -> None:
        if self._cache_epoch is None or epoch > self._cache_epoch:
            self._cache_epoch = epoch

    def _heard(self, payloads: list[str]) -> bool:
        """Take the cache epochs announced; True when the Plan itself was announced."""
        plan_changed = False
        for payload in payloads:
            epoch = payload.removeprefix(CACHE_EPOCH_NOTICE)
            if epoch != payload and epoch.isdigit():
                self._saw_cache_epoch(int(epoch))
            else:
                plan_changed = True
        return plan_changed

    def repair_targets(self) -> frozenset[str] | None:
        if time.monotonic() - self._repairs_seen > self.max_staleness:
            return None  # too old to trust: the router asks the queue itself
        return self._repair_targets

    def _repairs_due(self) -> bool:
        return time.monotonic() - self._repairs_seen >= _REPAIR_POLL

    def _saw_repairs(self, rows: list[tuple[Any, ...]]) -> None:
        self._repair_targets = frozenset(row[0] for row in rows)
        self._repairs_seen = time.monotonic()

    def current(self) -> tuple[Plan, bool]:
        plan = self._plan
        if plan is None:
            raise MemshiftError("the Plan watcher is not started: open it first")
        fresh = time.monotonic() - self._refreshed <= self.max_staleness
        if not fresh:
            with self._lock:
                if not self._stale:
                    self._stale = True
                    log.warning(
                        "the Plan (version %s, stage %s) has not been refreshed for over %g s: "
                        "reads stay on Redis while the stage is before pg_primary",
                        plan.version, plan.stage, self.max_staleness,
                    )
        return plan, fresh

    def _refreshed_with(self, plan: Plan) -> None:
        self._plan = plan
        self._refreshed = time.monotonic()
        self.reloads += 1
        with self._lock:
            if self._stale:
                self._stale = False
                log.warning("the Plan is fresh again: version %s, stage %s",
                            plan.version, plan.stage)

    def _failed(self, exc: BaseException) -> None:
        log.debug("refreshing the Plan failed: %s", redact(str(exc)))


class PlanWatcher(_Freshness):
    """The current Plan, kept fresh by a thread: LISTEN for changes, poll as a backstop.

    The Plan is loaded when the watcher starts (so a router never runs without one);
    then every NOTIFY on ``CHANNEL`` and every ``poll_seconds`` reload it. When no
    reload has succeeded for ``max_staleness`` seconds, ``current()`` reports the Plan
    as stale (logged once; the recovery too). ``close()`` stops the thread. It also
    follows the retired stage's cache epoch (``cache_epoch()``): loaded with the Plan,
    and taken from the notifications that announce its bumps.
    """

    def __init__(
        self, dsn: str, *, poll_seconds: float = 5.0, max_staleness: float = 15.0
    ) -> None:
        super().__init__(dsn, poll_seconds, max_staleness)
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self._conn = self._connect()
            self._refresh(self._conn)
        except MemshiftError:
            self._drop()
            raise
        except psycopg.Error as exc:
            self._drop()
            raise StoreUnavailable(
                f"cannot load the Plan from PostgreSQL at {redact(dsn)}: "
                f"{redact(str(exc)).strip()}"
            ) from None
        self._thread = threading.Thread(target=self._run, name="memshift-plan", daemon=True)
        self._thread.start()

    def __enter__(self) -> PlanWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._dsn, **_CONNECT_OPTIONS)
        conn.execute(_LISTEN)
        return conn

    def _refresh(self, conn: psycopg.Connection[Any]) -> None:
        # The epoch first: a Plan fresh at time t vouches for the epoch as of t.
        self._saw_cache_epoch(load_cache_epoch(conn))
        self._refreshed_with(load_plan(conn))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        last_poll = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect()
                    self._refresh(self._conn)
                    last_poll = time.monotonic()
                notified = self._heard([n.payload for n in self._conn.notifies(
                    timeout=_WAIT_SLICE, stop_after=1)])
                if notified or time.monotonic() - last_poll >= self.poll_seconds:
                    self._refresh(self._conn)
                    last_poll = time.monotonic()
                if self._repairs_due():
                    self._saw_repairs(self._conn.execute(query("repair_targets")).fetchall())
            except (psycopg.Error, MemshiftError, OSError) as exc:
                self._failed(exc)
                self._drop()
                self._stop.wait(min(self.poll_seconds, 1.0))
        self._drop()


class AsyncPlanWatcher(_Freshness):
    """:class:`PlanWatcher` for asyncio: the same, run as a task of the running loop.

    Start it with ``await watcher.open()`` or ``async with AsyncPlanWatcher(dsn)``.
    """

    def __init__(
        self, dsn: str, *, poll_seconds: float = 5.0, max_staleness: float = 15.0
    ) -> None:
        super().__init__(dsn, poll_seconds, max_staleness)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncPlanWatcher:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._task is not None:
            return
        try:
            self._conn = await self._connect()
            await self._refresh()
        except MemshiftError:
            await self._drop()
            raise
        except psycopg.Error as exc:
            await self._drop()
            raise StoreUnavailable(
                f"cannot load the Plan from PostgreSQL at {redact(self._dsn)}: "
                f"{redact(str(exc)).strip()}"
            ) from None
        self._task = asyncio.create_task(self._run(), name="memshift-plan")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self._dsn, **_CONNECT_OPTIONS)
        await conn.execute(_LISTEN)
        return conn

    async def _refresh(self) -> None:
        assert self._conn is not None
        try:
            cur = await self._conn.execute(query("cache_epoch_get"))
            self._saw_cache_epoch(_cache_epoch_of(await cur.fetchone()))
        except psycopg.errors.UndefinedTable:
            raise _no_cache_epoch_table() from None
        self._refreshed_with(await self._load())

    async def _load(self) -> Plan:
        assert self._conn is not None
        async with self._conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query("plan_get"))
            row = await cur.fetchone()
        if row is None:
            raise MemshiftError("the Plan row is missing; run `memshift db upgrade`")
        return Plan.model_validate(row)

    async def _drop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _run(self) -> None:
        last_poll = time.monotonic()
        while True:
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                    await self._refresh()
                    last_poll = time.monotonic()
                payloads = [n.payload async for n in self._conn.notifies(
                    timeout=_WAIT_SLICE, stop_after=1)]
                if self._heard(payloads) or time.monotonic() - last_poll >= self.poll_seconds:
                    await self._refresh()
                    last_poll = time.monotonic()
                if self._repairs_due():
                    cur = await self._conn.execute(query("repair_targets"))
                    self._saw_repairs(await cur.fetchall())
            except (psycopg.Error, MemshiftError, OSError) as exc:
                self._failed(exc)
                await self._drop()
                await asyncio.sleep(min(self.poll_seconds, 1.0))
