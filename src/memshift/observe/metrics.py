"""Prometheus metrics: what every memshift process counts, and the migration's state.

Two kinds, in one registry (:data:`REGISTRY`, not prometheus_client's global one, so
an application's own metrics and ours never collide):

- **process-local instruments**, moved by the code that does the work: the router's
  store operations, their latency, which store served each read path, live shadow
  compares, repair enqueues, and the Plan this process holds;
- **the state collector** (:func:`install_state_collector`), which reads the control
  plane in PostgreSQL at each scrape: stage, Plan version, slices, parity and drift,
  backfill runs, the repair queue, quarantine and rollbacks. Every process that
  installs it reports the same truth, the same the CLI and the dashboard show.

Expose them from an application process with ``serve(9464)``, from the dashboard at
``/metrics`` (:func:`asgi_app`), or from long CLI commands with ``--metrics-port``.
See docs/observability.md for the metric table and a Grafana dashboard.
"""

from __future__ import annotations

import abc
import bisect
import ipaddress
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from memshift.errors import ConfigError
from memshift.redact import redact
from memshift.sql.queries import query

if TYPE_CHECKING:
    from memshift.migrate.plan import PlanSource
    from memshift.migrate.rule import RollbackRule

log = logging.getLogger("memshift.metrics")

REGISTRY = CollectorRegistry()

# -- process-local instruments ---------------------------------------------------------

# Store calls last from a fraction of a millisecond (Redis, a pooled PostgreSQL
# connection) to seconds (a pool waiting out an outage): buckets span both.
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0)


class _Instrument(Collector):
    """A labelled counter or histogram moved with one lock and one dict look-up.

    prometheus_client's own go through ``labels()`` and a chain of calls and locks per
    count; the router counts (and times) every store call on its callers' path, so its
    instruments keep plain numbers by label values and build the families at scrape.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name, self._doc, self._labels = name, documentation, list(labels)
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]  # the names, so that no other collector takes them

    def collect(self) -> Iterable[Metric]:
        return [self._family()]

    @abc.abstractmethod
    def _family(self) -> Metric:
        """The family with every sample counted so far."""


class _Counter(_Instrument):
    """Counts by label values (``_total`` at scrape)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._counts: dict[tuple[str, ...], int] = {}
        super().__init__(name, documentation, labels)

    def inc(self, *values: str) -> None:
        """Count one, under these label values (in the order of the labels)."""
        with self._lock:
            self._counts[values] = self._counts.get(values, 0) + 1

    def _family(self) -> Metric:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        with self._lock:
            counts = list(self._counts.items())
        for values, count in counts:
            family.add_metric(values, count)
        return family


class _Histogram(_Instrument):
    """Amounts counted in buckets by label values, with their sum (Prometheus' cumulative
    ``_bucket``, ``_count`` and ``_sum`` at scrape)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self._bounds = tuple(buckets)
        # Per label values: the count in each bucket (the last one +Inf), then the sum.
        self._tallies: dict[tuple[str, ...], list[float]] = {}
        super().__init__(name, documentation, labels)

    def observe(self, amount: float, *values: str) -> None:
        """Count ``amount`` in its bucket, under these label values."""
        with self._lock:
            tally = self._tallies.get(values)
            if tally is None:
                tally = self._tallies[values] = [0.0] * (len(self._bounds) + 2)
            tally[bisect.bisect_left(self._bounds, amount)] += 1
            tally[-1] += amount

    def _family(self) -> Metric:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        with self._lock:
            tallies = [(values, list(tally)) for values, tally in self._tallies.items()]
        bounds = [*map(floatToGoString, self._bounds), "+Inf"]
        for values, tally in tallies:
            family.add_metric(values, list(zip(bounds, itertools.accumulate(tally[:-1]),
                                               strict=True)), tally[-1])
        return family


STORE_OPS = _Counter(
    "memshift_store_ops",
    "Store calls made by the router, by store, operation and result "
    "(ok | error for the primary and reads; ok | failed | skipped for the secondary).",
    ["store", "op", "result"],
)
STORE_OP_SECONDS = _Histogram(
    "memshift_store_op_seconds", "Latency of the router's store calls, by store and operation.",
    ["store", "op"], _LATENCY_BUCKETS,
)
READS = _Counter(
    "memshift_reads",
    "Session reads through the router by read path, the source that served them "
    "(redis | postgres | cache) and why (stage | slice | stale_plan | repair_pending | "
    "secondary_unavailable).",
    ["path", "source", "reason"],
)
SHADOW_COMPARES = _Counter(
    "memshift_shadow_compares",
    "Live shadow compares by outcome: sampled, dropped (queue full), the recorded "
    "parity status (pass | fail | pending | error), or failed (could not be recorded).",
    ["outcome"],
)
REPAIR_ENQUEUES = _Counter(
    "memshift_repair_enqueues",
    "Failed secondary writes queued for repair, by target store and where they went "
    "(queue | spool | lost: neither could take it).",
    ["target", "via"],
)


def record_op(store: str, op: str, result: str, started: float | None = None) -> None:
    """Count one store call; with ``started`` (a ``time.perf_counter()``), time it too."""
    STORE_OPS.inc(store, op, result)
    if started is not None:
        STORE_OP_SECONDS.observe(time.perf_counter() - started, store, op)


def record_read(path: str, source: str, reason: str) -> None:
    """Count one routed read: its read path, what served it and why."""
    READS.inc(path, source, reason)


def record_shadow(outcome: str) -> None:
    SHADOW_COMPARES.inc(outcome)


def record_repair_enqueue(target: str, via: str) -> None:
    REPAIR_ENQUEUES.inc(target, via)


# -- the Plan this process holds --------------------------------------------------------

_plan_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def track_plan_source(source: PlanSource) -> None:
    """Report this Plan source (a router's) in ``memshift_plan_seen_*``: read at each
    scrape, so holding the Plan costs the hot path nothing."""
    try:
        _plan_sources.add(source)
    except TypeError:  # a source that cannot be weakly referenced is not reported
        pass


class _PlanSeenCollector(Collector):
    """The version, freshness and refresh count of the Plans this process routes by."""

    def collect(self) -> Iterable[Metric]:
        version = GaugeMetricFamily(
            "memshift_plan_seen_version",
            "The newest Plan version a router in this process holds.")
        fresh = GaugeMetricFamily(
            "memshift_plan_seen_fresh",
            "1 when every Plan source in this process refreshed within its bound; 0 when "
            "one is stale (its router keeps reads on Redis before pg_primary).")
        refreshes = CounterMetricFamily(
            "memshift_plan_refreshes",
            "Plan reloads by the Plan watchers of this process (NOTIFY or poll).")
        sources = list(_plan_sources)
        if sources:
            seen = [_seen(source) for source in sources]
            known = [s for s in seen if s is not None]
            if known:
                version.add_metric([], max(v for v, _ in known))
                fresh.add_metric([], float(all(f for _, f in known)))
            refreshes.add_metric([], float(sum(getattr(s, "reloads", 0) for s in sources)))
        return [version, fresh, refreshes]


def _seen(source: Any) -> tuple[int, bool] | None:
    try:
        plan, fresh = source.current()
    except Exception:  # a watcher not started yet: nothing to report
        return None
    return int(plan.version), bool(fresh)


REGISTRY.register(_PlanSeenCollector())


# -- the state collector ------------------------------------------------------------------

STAGES = ("redis_only", "dual_write", "shadow", "cutover", "pg_primary", "retired")
# A scrape must answer fast even when PostgreSQL does not: connect and each statement
# are bounded, and the scrape reports memshift_state_up 0 instead of waiting.
CONNECT_TIMEOUT = 2
STATEMENT_TIMEOUT_MS = 3000
SCRAPE_BUDGET_SECONDS = 5.0  # parts not read by then are left out of the scrape
# Recent parity results are counted over this many seconds (the trend panel).
PARITY_RECENT_SECONDS = 300
BACKFILL_RUNS = 5  # the latest runs reported
RULE_WHO = "memshift watch"  # the audit's "who" for the rollback rule (migrate/rule.py)


class StateCollector(Collector):
    """Reads the control plane from PostgreSQL at each scrape; never raises.

    Each part (Plan, parity, backfill, repair, quarantine, rollbacks) is read on its
    own: a part that fails is left out and logged, the others are still exported, and
    ``memshift_state_up`` is 0 unless every part was read. PostgreSQL unreachable:
    only ``memshift_state_up 0``. Logs never show the DSN's password.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._lock = threading.Lock()  # one scrape at a time reads PostgreSQL

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with the state; describe nothing so register() won't scrape

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        with self._lock:
            families, complete = self._read_state(started)
        up = GaugeMetricFamily("memshift_state_up",
                               "1 when the last scrape read the whole control plane in "
                               "PostgreSQL; 0 when some or all of it could not be read.")
        up.add_metric([], float(complete))
        return [up, *families, _scrape_seconds(started)]

    def _read_state(self, started: float) -> tuple[list[Metric], bool]:
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="memshift metrics",
            )
        except Exception as exc:  # a scrape never raises: it says the state is unknown
            _cannot("the migration state", exc)
            return [], False
        families: list[Metric] = []
        complete = True
        with conn:
            for what, read in _READERS:
                if time.perf_counter() - started > SCRAPE_BUDGET_SECONDS:
                    log.warning("metrics: reading the migration state took over %g s; "
                                "the rest is left out of this scrape", SCRAPE_BUDGET_SECONDS)
                    return families, False
                try:
                    families += list(read(conn))  # a part that fails exports nothing
                except Exception as exc:
                    _cannot(what, exc)
                    complete = False
                    if conn.closed or conn.broken:
                        break
        return families, complete


def _cannot(what: str, exc: Exception) -> None:
    log.warning("metrics: cannot read %s from PostgreSQL: %s: %s",
                what, type(exc).__name__, redact(str(exc)).strip())


def _scrape_seconds(started: float) -> Metric:
    family = GaugeMetricFamily("memshift_state_scrape_seconds",
                               "How long reading the control plane took at this scrape.")
    family.add_metric([], time.perf_counter() - started)
    return family


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _epoch(at: datetime | None) -> float:
    return at.timestamp() if at is not None else 0.0


def _plan(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    from memshift.migrate.plan import Stage, check_gates, load_plan
    from memshift.migrate.rule import RollbackRule

    plan = load_plan(conn)
    stage = _gauge("memshift_plan_stage", "1 for the Plan's current stage, 0 for the others.",
                   ["stage"])
    for name in STAGES:
        stage.add_metric([name], float(plan.stage == name))
    version = _gauge("memshift_plan_version", "The Plan's version (each change adds one).")
    version.add_metric([], float(plan.version))
    changed = _gauge("memshift_plan_changed_timestamp_seconds", "When the Plan last changed.")
    changed.add_metric([], _epoch(plan.changed_at))
    percent = _gauge("memshift_slice_percent",
                     "The cohort share (%) of each read path's slice cut over to PostgreSQL "
                     "(it serves reads in the cutover stage).", ["read_path"])
    for path, cut in sorted(plan.slices.items()):
        percent.add_metric([path], cut.percent)
    yield from (stage, version, changed, percent)

    gates = _gauge("memshift_next_stage_gate_passed",
                   "1 for each gate of the next stage that passes now, 0 for one that fails.",
                   ["stage", "gate"])
    if plan.stage is not Stage.RETIRED:
        following = list(Stage)[plan.stage.order + 1]
        for gate in check_gates(conn, following):
            gates.add_metric([str(following), gate.name], float(gate.passed))
    yield gates
    yield from _drift(conn, RollbackRule.of(plan))


def _drift(conn: psycopg.Connection[Any], rule: RollbackRule) -> Iterator[Metric]:
    """Each read path's evidence the rollback rule judges, from :func:`slice_drift`:
    the very figures `memshift rule show` prints, for the same read paths."""
    from memshift.migrate.rule import slice_drift

    judged = _gauge("memshift_slice_judged_checks",
                    "Judged parity results counting for each read path (a slice's, or one "
                    "compared live) since its slice or the stage last changed (at most the "
                    "rule's window).", ["read_path"])
    failed = _gauge("memshift_slice_failed_checks",
                    "Failed parity results among them.", ["read_path"])
    drift = _gauge("memshift_slice_drift_rate",
                   "Failed share (%) of the judged results of each read path since its "
                   "slice or the stage last changed.", ["read_path"])
    threshold = _gauge("memshift_rollback_rule_drift_threshold",
                       "The rollback rule's drift rate (%) of its window above which it fires.")
    window = _gauge("memshift_rollback_rule_window", "The rollback rule's window (results).")
    threshold.add_metric([], float(rule.drift_rate))
    window.add_metric([], float(rule.window))
    for path in slice_drift(conn):
        judged.add_metric([path.read_path], float(path.judged))
        failed.add_metric([path.read_path], float(path.failed))
        drift.add_metric([path.read_path], path.drift_rate)
    yield from (judged, failed, drift, threshold, window)


def _parity(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    from memshift.migrate.plan import PARITY_MIN_PASS_RATE

    statuses = ("pass", "fail", "pending", "error")
    latest = dict(conn.execute(query("metrics_parity_latest")).fetchall())
    window = _gauge("memshift_parity_window_checks",
                    "Sessions by the status of their latest parity result, among those the "
                    "stage gates read (since the last move back to redis_only).", ["status"])
    for status in statuses:
        window.add_metric([status], float(latest.get(status, 0)))
    gate = conn.execute(query("gate_parity")).fetchone()
    rate = _gauge("memshift_parity_pass_rate",
                  "The parity gate's figure: the share (%) of sessions whose latest judged "
                  "result passes; absent with none.")
    if gate and gate[0]:
        rate.add_metric([], 100.0 * gate[1] / gate[0])
    need = _gauge("memshift_parity_gate_pass_rate", "The pass rate (%) the stage gates need.")
    need.add_metric([], PARITY_MIN_PASS_RATE)
    recent = dict(conn.execute(query("metrics_parity_recent"),
                               {"seconds": PARITY_RECENT_SECONDS}).fetchall())
    trend = _gauge("memshift_parity_recent_checks",
                   f"Parity results by status checked in the last {PARITY_RECENT_SECONDS} s "
                   "(batch and live).", ["status"])
    for status in statuses:
        trend.add_metric([status], float(recent.get(status, 0)))
    yield from (window, rate, need, trend)


def _backfill(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    labels = ["run_id", "layout", "prefix"]
    done = CounterMetricFamily("memshift_backfill_batches_done", "Batches copied, per run.",
                               labels=labels)
    planned = _gauge("memshift_backfill_batches",
                     "Batches discovered so far, per run (the total once discovery ends).",
                     labels)
    sessions = CounterMetricFamily("memshift_backfill_sessions_migrated",
                                   "Sessions merged into PostgreSQL, per run.", labels=labels)
    messages = CounterMetricFamily("memshift_backfill_messages_migrated",
                                   "Messages in the sessions merged, per run.", labels=labels)
    quarantined = CounterMetricFamily("memshift_backfill_sessions_quarantined",
                                      "Sessions quarantined, per run.", labels=labels)
    seen = _gauge("memshift_backfill_sessions_seen", "Sessions discovered, per run.", labels)
    running = _gauge("memshift_backfill_run_state",
                     "1 for each run's state (discovering | copying | completed | abandoned).",
                     [*labels, "state"])
    started = _gauge("memshift_backfill_started_timestamp_seconds", "When each run started.",
                     labels)
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(query("backfill_runs"), {"limit": BACKFILL_RUNS}).fetchall()
    for row in rows:
        key = [str(row["run_id"]), row["layout"], row["prefix"]]
        done.add_metric(key, float(row["batches_done"]))
        planned.add_metric(key, float(row["batches_total"]))
        sessions.add_metric(key, float(row["migrated"]))
        messages.add_metric(key, float(row["messages"]))
        quarantined.add_metric(key, float(row["quarantined"]))
        seen.add_metric(key, float(row["sessions_seen"]))
        running.add_metric([*key, row["state"]], 1.0)
        started.add_metric(key, _epoch(row["started_at"]))
    yield from (done, planned, sessions, messages, quarantined, seen, running, started)


def _repair(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    depth = _gauge("memshift_repair_queue_depth",
                   "Repairs queued, by the store that missed the writes.", ["target"])
    sessions = _gauge("memshift_repair_queue_sessions",
                      "Sessions with repairs queued, by target store.", ["target"])
    age = _gauge("memshift_repair_oldest_age_seconds",
                 "Age of the oldest queued repair, by target store (0 when none).", ["target"])
    now_row = conn.execute("SELECT now()").fetchone()
    at = now_row[0] if now_row else None
    counts = {row[0]: row[1:] for row in conn.execute(query("repair_counts")).fetchall()}
    for target in ("postgres", "redis"):
        rows, distinct, oldest = counts.get(target, (0, 0, None))
        depth.add_metric([target], float(rows))
        sessions.add_metric([target], float(distinct))
        age.add_metric([target], (at - oldest).total_seconds() if at and oldest else 0.0)
    yield from (depth, sessions, age)


def _quarantine(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    family = _gauge("memshift_quarantine_sessions",
                    "Sessions in quarantine (open), by reason class.", ["reason_class"])
    counts = dict(conn.execute(query("metrics_quarantine")).fetchall())
    for reason_class in QUARANTINE_CLASSES:
        family.add_metric([reason_class], float(counts.get(reason_class, 0)))
    yield family


# The classes metrics_quarantine (queries.sql) sorts reasons into.
QUARANTINE_CLASSES = ("oversize", "invalid_utf8", "nul", "invalid_json", "wrong_redis_type",
                      "id_too_long", "invalid_record")


def _rollbacks(conn: psycopg.Connection[Any]) -> Iterator[Metric]:
    total = CounterMetricFamily(
        "memshift_rollbacks",
        "Rollbacks in the Plan's audit, by who made them: the rollback rule "
        "(`memshift watch`) or a person.", labels=["by"])
    last = _gauge("memshift_last_rollback_timestamp_seconds",
                  "When the last rollback happened, by who made it.", ["by"])
    rows = {"rule" if row[0] else "person": row[1:]
            for row in conn.execute(query("metrics_rollbacks"), {"rule_who": RULE_WHO})}
    for by in ("rule", "person"):
        count, at = rows.get(by, (0, None))
        total.add_metric([by], float(count))
        if at is not None:
            last.add_metric([by], _epoch(at))
    yield from (total, last)


# The parts of the state a scrape reads, each on its own, with what a log calls it.
_READERS: tuple[tuple[str, Callable[[psycopg.Connection[Any]], Iterator[Metric]]], ...] = (
    ("the Plan, its gates and the rule's evidence", _plan),
    ("the parity results", _parity),
    ("the backfill runs", _backfill),
    ("the repair queue", _repair),
    ("the quarantine", _quarantine),
    ("the rollbacks", _rollbacks),
)

_installed: StateCollector | None = None
_install_lock = threading.Lock()


def install_state_collector(dsn: str) -> None:
    """Register the state collector on :data:`REGISTRY` (once per process).

    Calling it again is harmless; with another DSN, the collector reads that one
    from then on (one control plane per process).
    """
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = StateCollector(dsn)
            REGISTRY.register(_installed)
        else:
            _installed.dsn = dsn


# -- exposing the registry ------------------------------------------------------------------

_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(port: int, host: str = "127.0.0.1", *, allow_remote: bool = False) -> None:
    """Serve :data:`REGISTRY` at ``http://host:port/metrics`` from a daemon thread.

    Loopback only unless ``allow_remote``: metrics name read paths, tenants' cohorts
    and queue depths, which are not for everyone on the network.
    """
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"metrics would be served on {host!r}, which is not a loopback address; pass "
            "allow_remote=True (CLI: --metrics-host with --metrics-allow-remote) to serve "
            "them beyond this machine, or use 127.0.0.1"
        )
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be 0 to 65535, got {port}")
    try:
        _start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
            "port (--metrics-port)"
        ) from None


def asgi_app() -> Any:
    """An ASGI app that serves :data:`REGISTRY` (the dashboard mounts it at /metrics)."""
    return make_asgi_app(registry=REGISTRY)
