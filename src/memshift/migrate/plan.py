"""The Plan: the migration's stage, its read slices and rules, one versioned row.

Every process routes by the Plan (``Plan.writes``, ``Plan.read_source``); every change
to it is one transaction that checks the gates, bumps the version, appends an audit
row (who, when, why, before, after) and announces the new version with NOTIFY.
Moving forward goes one stage at a time through the gates (``--force`` overrides,
with the reason in the audit); moving back is allowed at once.
"""

from __future__ import annotations

import enum
import getpass
import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memshift.errors import MemshiftError, ValidationError
from memshift.sql.queries import query

StoreName = Literal["redis", "postgres"]
CHANNEL = "memshift_plan"  # NOTIFY channel the Plan's version is announced on


class Stage(enum.StrEnum):
    REDIS_ONLY = "redis_only"
    DUAL_WRITE = "dual_write"
    SHADOW = "shadow"
    CUTOVER = "cutover"
    PG_PRIMARY = "pg_primary"
    RETIRED = "retired"

    @property
    def order(self) -> int:
        return list(Stage).index(self)


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


# -- gates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str
    how_to_pass: str


def _backfill_complete(conn: psycopg.Connection[Any]) -> Gate:
    row = conn.execute(query("gate_backfill")).fetchone()
    completed, unfinished = row if row else (0, 0)
    passed = completed > 0 and unfinished == 0
    detail = (
        f"{completed} completed backfill run(s), {unfinished} unfinished"
    )
    return Gate("backfill complete", passed, detail,
                "run `memshift backfill` until it reports completed")


def _repair_queue_empty(conn: psycopg.Connection[Any]) -> Gate:
    exists = conn.execute("SELECT to_regclass('memshift.repair_queue')").fetchone()
    if not exists or exists[0] is None:
        return Gate("repair queue empty", True, "no repair queue yet", "")
    row = conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone()
    pending = row[0] if row else 0
    return Gate("repair queue empty", pending == 0, f"{pending} repair(s) pending",
                "run `memshift repair` until the queue is empty")


GateCheck = Callable[[psycopg.Connection[Any]], Gate]

# The gates a forward move into each stage must pass.
GATES: dict[Stage, tuple[GateCheck, ...]] = {
    Stage.DUAL_WRITE: (),
    Stage.SHADOW: (_backfill_complete,),
    Stage.CUTOVER: (_backfill_complete, _repair_queue_empty),
    Stage.PG_PRIMARY: (_backfill_complete, _repair_queue_empty),
    Stage.RETIRED: (_repair_queue_empty,),
}


def check_gates(conn: psycopg.Connection[Any], target: Stage) -> list[Gate]:
    return [check(conn) for check in GATES.get(target, ())]


# -- changes ---------------------------------------------------------------------------


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
        elif current is Stage.RETIRED and goal.order < Stage.PG_PRIMARY.order and not force:
            raise IllegalMove(
                "since retirement Redis has received no writes, so reads cannot go back to "
                "it; move back to pg_primary first (Redis gets writes again), or --force"
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
