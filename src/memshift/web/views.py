"""What each dashboard page shows, as plain JSON-ready data.

One function per page; the HTML page and its ``/api/...`` twin render the same dict.
They only call the library functions the CLI calls (the Plan, its gates and history,
backfill runs, quarantine entries, the rollback rule, ``inspect``) and the read-only
views of ``memshift.observe.control_plane``: no query of their own.
"""

from __future__ import annotations

from typing import Any

import psycopg

from memshift.errors import ConfigError
from memshift.inspect import Inspection, quarantine_json
from memshift.migrate.backfill import runs
from memshift.migrate.parity import iso_z
from memshift.migrate.plan import (
    PARITY_MIN_PASS_RATE,
    AuditEntry,
    Plan,
    Stage,
    check_gates,
    history,
    load_plan,
)
from memshift.migrate.quarantine import entries
from memshift.migrate.rule import RollbackRule, evaluate_rule, shadow_sample_rate
from memshift.observe.control_plane import (
    failing_sessions,
    parity_trend,
    quarantine_open,
    repair_depth,
    repair_entries,
)

TREND_HOURS = 24.0  # the parity chart covers this much time before the newest result


def plan_json(plan: Plan) -> dict[str, Any]:
    primary, secondary = plan.writes()
    following = None if plan.stage is Stage.RETIRED else list(Stage)[plan.stage.order + 1]
    previous = None if plan.stage is Stage.REDIS_ONLY else list(Stage)[plan.stage.order - 1]
    return {
        "version": plan.version,
        "stage": str(plan.stage),
        "next_stage": None if following is None else str(following),
        "previous_stage": None if previous is None else str(previous),
        "stages": [{"name": str(s), "state": "done" if s.order < plan.stage.order else
                    "current" if s is plan.stage else "todo"} for s in Stage],
        "changed_at": iso_z(plan.changed_at),
        "changed_by": plan.changed_by,
        "writes": {"primary": primary, "secondary": secondary},
        "read_paths": _read_paths(plan),
    }


def _read_paths(plan: Plan) -> list[dict[str, Any]]:
    """Each slice, with the share of its reads PostgreSQL serves under the stage now."""
    shown = []
    for name, cut in sorted(plan.slices.items()):
        if plan.stage.order >= Stage.PG_PRIMARY.order:
            serving = 100.0
        elif plan.stage is Stage.CUTOVER:
            serving = cut.percent
        else:
            serving = 0.0
        shown.append({"read_path": name, "percent": cut.percent,
                      "postgres_percent": serving, "tenant_allow": list(cut.tenant_allow),
                      "tenant_deny": list(cut.tenant_deny)})
    return shown


def _rule(conn: psycopg.Connection[Any], plan: Plan) -> dict[str, Any]:
    try:
        rule = RollbackRule.of(plan)
    except ConfigError as exc:
        return {"error": str(exc)}
    return {**rule.model_dump(mode="json"), "shadow_sample_rate": shadow_sample_rate(plan),
            "fires_on": [f.as_json() for f in evaluate_rule(conn)]}


def overview(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The stage, slices, gates to the next stage, and the queues at a glance."""
    plan = load_plan(conn)
    data = plan_json(plan)
    following = data["next_stage"]
    gates = check_gates(conn, Stage(following)) if following else []
    latest = runs(conn, limit=1)
    return {
        "plan": data,
        "gates": [vars(g) for g in gates],
        "gates_pass": all(g.passed for g in gates),
        "rule": _rule(conn, plan),
        "repair": [d.as_json() for d in repair_depth(conn)],
        "quarantine_open": quarantine_open(conn),
        "failing_sessions": len(failing_sessions(conn, limit=1000)),
        "backfill": _run_json(latest[0]) if latest else None,
    }


def parity(conn: psycopg.Connection[Any], *, limit: int = 200) -> dict[str, Any]:
    """The pass rate over time and the sessions failing now."""
    plan = load_plan(conn)
    trend = parity_trend(conn, hours=TREND_HOURS)
    counts = {"pass": 0, "fail": 0, "pending": 0, "error": 0}
    for point in trend.points:
        for status, n in (("pass", point.passed), ("fail", point.failed),
                          ("pending", point.pending), ("error", point.errors)):
            counts[status] += n
    judged = counts["pass"] + counts["fail"] + counts["error"]
    return {
        "plan": plan_json(plan),
        "trend": trend.as_json(),
        "counts": counts,
        "pass_rate": round(100.0 * counts["pass"] / judged, 3) if judged else None,
        "min_pass_rate": PARITY_MIN_PASS_RATE,  # what the gates need
        "failing": [r.as_json() for r in failing_sessions(conn, hours=TREND_HOURS, limit=limit)],
        "rule": _rule(conn, plan),
    }


def _run_json(summary: Any) -> dict[str, Any]:
    data: dict[str, Any] = summary.as_json()
    data.update(source=summary.extra["source"], layout=summary.extra["layout"],
                prefix=summary.extra["prefix"], started_at=iso_z(summary.extra["started_at"]))
    seen = summary.sessions_seen
    data["percent_done"] = round(100.0 * summary.sessions_done / seen, 2) if seen else (
        100.0 if summary.state == "completed" else 0.0)
    return data


def backfill(conn: psycopg.Connection[Any], *, limit: int = 20) -> dict[str, Any]:
    return {"plan": plan_json(load_plan(conn)), "runs": [_run_json(r) for r in runs(conn, limit)]}


def repair(conn: psycopg.Connection[Any], *, limit: int = 200) -> dict[str, Any]:
    return {
        "plan": plan_json(load_plan(conn)),
        "depth": [d.as_json() for d in repair_depth(conn)],
        "entries": [e.as_json() for e in repair_entries(conn, limit=limit)],
    }


def quarantine(
    conn: psycopg.Connection[Any], *, show_all: bool = False, show_values: bool = False,
    limit: int = 200,
) -> dict[str, Any]:
    """The quarantine page: the record's own text in reasons redacted unless asked."""
    found = entries(conn, state=None if show_all else "open", limit=limit)
    return {"plan": plan_json(load_plan(conn)), "all": show_all, "show_values": show_values,
            "open": quarantine_open(conn),
            "entries": [quarantine_json(e, show_values=show_values) for e in found]}


def change_of(entry: AuditEntry) -> str:
    """What an audit entry changed, in a few words."""
    before, after = entry.before, entry.after
    if before.get("stage") != after.get("stage"):
        return f"stage {before.get('stage')} → {after.get('stage')}"
    if entry.action == "rules" or before.get("rules") != after.get("rules"):
        return "rules"
    old, new = before.get("slices") or {}, after.get("slices") or {}
    changed = []
    for name in sorted(set(old) | set(new)):
        was = (old.get(name) or {}).get("percent")
        now = (new.get(name) or {}).get("percent")
        if old.get(name) != new.get(name):
            changed.append(f"{name} {_pct(was)} → {_pct(now)}")
    return "slices " + ", ".join(changed) if changed else entry.action


def _pct(value: float | None) -> str:
    return "none" if value is None else f"{value:g} %"


def audit(conn: psycopg.Connection[Any], *, limit: int = 100) -> dict[str, Any]:
    return {
        "plan": plan_json(load_plan(conn)),
        "entries": [
            {"id": e.id, "version": e.version, "at": iso_z(e.at), "who": e.who, "why": e.why,
             "action": e.action, "forced": e.forced, "change": change_of(e),
             "before": e.before, "after": e.after}
            for e in history(conn, limit)
        ],
    }


def session(found: Inspection, *, show_values: bool) -> dict[str, Any]:
    """The session page: ``memshift inspect --json``, with the side-by-side rows."""
    data = found.as_json(show_values=show_values)
    data["plan"] = plan_json(found.plan)
    data["show_values"] = show_values
    data["failed_checks"] = found.report.failed_checks
    data["rows"] = [
        {"section": r.section, "field": r.field, "redis": r.redis, "postgres": r.postgres,
         "differs": r.differs}
        for r in found.side_by_side(show_values=show_values)
    ]
    return data
