"""The rollback rule: parity drift on a cutover slice moves that slice back to Redis.

Declared in the Plan (``plan.rules["rollback"]``, set with :func:`set_rule`), judged per
slice by :func:`evaluate_rule` and enforced by :func:`watch` (``memshift watch``). A
slice's evidence is its judged parity results (pending ones are not judged yet): the
live shadow compares of its read path, and batch ``memshift parity`` results, which
have no read path and count for every slice. Only results checked after the slice
(or the stage) last changed count: a firing rolls the slice back, which is such a
change, so the failures that fired it never fire again, and a person who advances
the slice again starts from fresh evidence. The rule never advances anything.

The rule fires when, among the latest ``window`` judged results, more than
``drift_rate`` % of ``window`` failed (so with fewer results than the window it
fires only once the failures exceed what the whole window may hold), or when any
failed result failed one of the ``critical`` checks.

:func:`slice_drift` shows that sliding window per read path (``memshift rule show``):
for every slice of the Plan, and every read path that live compares sampled, in any
stage, so an operator sees each path's drift before and after cutting it over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticError

from memshift.config import Settings
from memshift.errors import ConfigError, MemshiftError, StoreUnavailable, ValidationError
from memshift.migrate.backfill import connect
from memshift.migrate.parity import INVARIANTS, PRESENCE, PROJECTION, SEED_CHECKS
from memshift.migrate.plan import Plan, Stage, load_plan, rollback, set_rules
from memshift.redact import redact
from memshift.sql.queries import query

log = logging.getLogger("memshift.rule")

WATCHER = "memshift watch"  # who the audit names for the rule's rollbacks
# The share of shadow and cutover reads that are also compared live (0 to 1).
DEFAULT_SHADOW_SAMPLE_RATE = 0.01
KNOWN_CHECKS = (*SEED_CHECKS, PRESENCE, INVARIANTS, PROJECTION)


class RollbackRule(BaseModel):
    """When a cutover slice goes back to Redis. Every field says its default (DESIGN §5)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    drift_rate: float = Field(default=0.5, ge=0, le=100)  # percent of the window
    window: int = Field(default=500, ge=1, le=100_000)  # latest judged results per slice
    critical: tuple[str, ...] = ("latest_checkpoint_matches", "tool_retry_state_matches")

    @field_validator("critical")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in KNOWN_CHECKS]
        if unknown:
            raise ValueError(f"unknown check(s) {', '.join(unknown)}; "
                             f"checks: {', '.join(KNOWN_CHECKS)}")
        return names

    @classmethod
    def of(cls, plan: Plan) -> RollbackRule:
        try:
            return cls.model_validate(plan.rules.get("rollback") or {})
        except PydanticError as exc:
            raise ConfigError(f"the Plan's rollback rule is invalid: {exc}; fix it with "
                              "`memshift rule set`") from None


def shadow_sample_rate(plan: Plan) -> float:
    """The share of shadow and cutover reads compared live (default 0.01)."""
    rate = plan.rules.get("shadow_sample_rate", DEFAULT_SHADOW_SAMPLE_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        return DEFAULT_SHADOW_SAMPLE_RATE  # set_rule refuses such values; be safe anyway
    return float(rate)


def set_rule(
    conn: psycopg.Connection[Any], why: str, *,
    drift_rate: float | None = None, window: int | None = None,
    critical: Sequence[str] | None = None, shadow_sample_rate: float | None = None,
    who: str | None = None,
) -> Plan:
    """Change the rollback rule's fields given (the others keep their values) and/or the
    shadow sample rate; audited like every Plan change."""
    if shadow_sample_rate is not None and not 0 <= shadow_sample_rate <= 1:
        raise ValidationError(
            f"--shadow-sample-rate is a share from 0 to 1 (0.01 = 1 %), got {shadow_sample_rate}"
        )
    with conn.transaction():
        conn.execute(query("plan_lock"))  # the rule is merged into the Plan as it is now
        current = RollbackRule.of(load_plan(conn))
        given = {"drift_rate": drift_rate, "window": window,
                 "critical": tuple(critical) if critical is not None else None}
        try:
            rule = RollbackRule.model_validate(
                current.model_dump() | {k: v for k, v in given.items() if v is not None})
        except PydanticError as exc:
            raise ValidationError(f"rollback rule: {exc}") from None
        rules: dict[str, Any] = {"rollback": rule.model_dump(mode="json")}
        if shadow_sample_rate is not None:
            rules["shadow_sample_rate"] = shadow_sample_rate
        return set_rules(conn, rules, why, who=who)


@dataclass(frozen=True)
class Firing:
    """The rule fired on one slice: the evidence, as the audit's reason says it."""

    read_path: str
    judged: int  # judged results in the window
    failed: int
    critical_failures: dict[str, int]  # check -> failed results that failed it
    since: datetime | None  # when the slice (or the stage) last changed
    rule: RollbackRule

    @property
    def drift_rate(self) -> float:
        """Failed share of the judged results, in percent."""
        return 100.0 * self.failed / self.judged if self.judged else 0.0

    def why(self) -> str:
        parts = []
        if self.failed * 100 > self.rule.drift_rate * self.rule.window:
            parts.append(f"drift {self.failed} failed of {self.judged} judged checks "
                         f"({self.drift_rate:.2f} %), above {self.rule.drift_rate:g} % of "
                         f"the last {self.rule.window}")
        if self.critical_failures:
            parts.append("critical check(s) failed: " + ", ".join(
                f"{name} ({n})" for name, n in sorted(self.critical_failures.items())))
        since = self.since.isoformat(timespec="seconds") if self.since else "the start"
        return (f"rollback rule fired on read path {self.read_path!r}: " + "; ".join(parts)
                + f" (results since {since})")

    def as_json(self) -> dict[str, Any]:
        return {"read_path": self.read_path, "judged": self.judged, "failed": self.failed,
                "drift_rate": round(self.drift_rate, 4),
                "critical_failures": dict(self.critical_failures),
                "since": self.since.isoformat() if self.since else None,
                "rule": self.rule.model_dump(mode="json"), "why": self.why()}


@dataclass(frozen=True)
class SliceDrift:
    """One read path's evidence: its sliding window of judged parity results.

    The window is what the rule judges: the latest ``rule.window`` judged results
    (live compares of this path, and batch results, which count for every path)
    checked after ``since``, when the path's slice or the stage last changed.
    """

    read_path: str
    percent: float | None  # the slice's cohort; None for a path the Plan has no slice for
    judged: int
    failed: int
    live: int  # of the judged, live compares of this path (the rest are batch results)
    critical_failures: dict[str, int]
    since: datetime | None
    rule: RollbackRule

    @property
    def drift_rate(self) -> float:
        """Failed share of the judged results, in percent."""
        return 100.0 * self.failed / self.judged if self.judged else 0.0

    @property
    def over_rule(self) -> bool:
        """The rule would fire on this evidence (it acts only on cutover slices above 0 %)."""
        return self.failed * 100 > self.rule.drift_rate * self.rule.window or bool(
            self.critical_failures)

    def firing(self) -> Firing:
        return Firing(self.read_path, self.judged, self.failed, dict(self.critical_failures),
                      self.since, self.rule)

    def as_json(self) -> dict[str, Any]:
        return {"read_path": self.read_path, "percent": self.percent, "judged": self.judged,
                "failed": self.failed, "live": self.live, "batch": self.judged - self.live,
                "drift_rate": round(self.drift_rate, 4),
                "critical_failures": dict(self.critical_failures),
                "since": self.since.isoformat() if self.since else None,
                "over_rule": self.over_rule}


def slice_drift(conn: psycopg.Connection[Any], *, slices_only: bool = False) -> list[SliceDrift]:
    """Each read path's drift over the rule's sliding window, now; changes nothing.

    Every slice of the Plan, then (unless ``slices_only``) every other read path
    that live compares recorded results for since the stage last changed.
    """
    plan = load_plan(conn)
    rule = RollbackRule.of(plan)
    paths: dict[str, float | None] = {path: cut.percent
                                      for path, cut in sorted(plan.slices.items())}
    if not slices_only:
        for (path,) in conn.execute(query("rule_read_paths")).fetchall():
            paths.setdefault(path, None)
    found = [_window(conn, path, percent, rule) for path, percent in paths.items()]
    return [d for d in found if d.percent is not None or d.live]


def _window(
    conn: psycopg.Connection[Any], path: str, percent: float | None, rule: RollbackRule,
) -> SliceDrift:
    changed = conn.execute(query("rule_slice_changed_at"), {"read_path": path}).fetchone()
    since: datetime | None = changed[0] if changed else None
    row = conn.execute(query("rule_window"), {
        "read_path": path, "window": rule.window, "critical": list(rule.critical),
        "since": since,
    }).fetchone()
    judged, failed, critical, live = row if row else (0, 0, {}, 0)
    return SliceDrift(path, percent, judged, failed, live, dict(critical), since, rule)


def evaluate_rule(conn: psycopg.Connection[Any]) -> list[Firing]:
    """The slices the rule says to move back, now; changes nothing.

    Only in ``cutover``, only slices that send some reads to PostgreSQL (above 0 %).
    """
    if load_plan(conn).stage is not Stage.CUTOVER:
        return []
    return [drift.firing() for drift in slice_drift(conn, slices_only=True)
            if drift.percent and drift.over_rule]


def enforce_rule(conn: psycopg.Connection[Any]) -> list[Firing]:
    """Evaluate the rule and move each slice it fires on back to Redis (audited).

    One transaction holding the Plan's lock: a person's change cannot slip in between
    the evaluation and the rollback it leads to.
    """
    with conn.transaction():
        conn.execute(query("plan_lock"))
        firings = evaluate_rule(conn)
        for firing in firings:
            rollback(conn, firing.why(), read_path=firing.read_path, who=WATCHER)
    for firing in firings:
        log.warning("%s: moved back to Redis", firing.why())
    return firings


def watch(
    settings: Settings, *, interval: float = 5.0, once: bool = False,
    on_pass: Callable[[list[Firing]], None] | None = None,
    stop: threading.Event | None = None,
) -> list[Firing]:
    """Enforce the rule every ``interval`` seconds until ``stop`` is set (or once).

    ``on_pass`` hears each pass's firings. A pass that cannot reach PostgreSQL is
    logged and retried at the next interval (with ``once``, it raises). Returns every
    firing.
    """
    if interval <= 0:
        raise ConfigError(f"--interval must be above 0 seconds, got {interval}")
    if not settings.postgres_dsn:
        raise ConfigError("watch needs PostgreSQL: set --postgres-dsn / MEMSHIFT_POSTGRES_DSN")
    stop = stop or threading.Event()
    fired: list[Firing] = []
    conn: psycopg.Connection[Any] | None = None
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = connect(settings.postgres_dsn)
                firings = enforce_rule(conn)
            except (psycopg.Error, MemshiftError) as exc:
                if once:
                    if isinstance(exc, MemshiftError):
                        raise
                    raise StoreUnavailable(
                        f"the rollback rule could not be checked: {redact(str(exc)).strip()}"
                    ) from None
                log.error("the rollback rule could not be checked, retrying in %g s: %s",
                          interval, redact(str(exc)))
                if conn is not None:
                    conn.close()
                    conn = None
            else:
                fired += firings
                if on_pass is not None:
                    on_pass(firings)
            if once or stop.wait(interval):
                return fired
    finally:
        if conn is not None:
            conn.close()
