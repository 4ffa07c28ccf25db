"""`memshift demo` and `memshift generate`: generated sessions, written as an app would.

The demo starts embedded servers when none are given and runs a whole staged
migration on generated agent sessions while traffic keeps flowing: the legacy app
writes to Redis; the app swaps in the MigratingStore; the Plan moves through
dual_write (with the backfill), shadow, cutover (a read slice at 10 %, 50 % and
100 %), pg_primary and retired, with a parity run at each step. During cutover it
injects one drift (a session's latest checkpoint lost in PostgreSQL), and the
rollback rule, enforced as `memshift watch` does, moves the slice back to Redis;
the session is repaired and a person re-advances. It ends with a table of every
step: sessions, messages, parity, rollbacks, time, and whether it passed.

Its metrics (the router's and the control plane's) are in ``observe.metrics.REGISTRY``;
``metrics_port`` serves them, and ``dashboard=True`` keeps the web dashboard open at
the end (it serves them at /metrics too).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import redis
from rich.console import Console
from rich.table import Table

from memshift import embedded
from memshift.config import Settings
from memshift.errors import ConfigError, MemshiftError
from memshift.generate import GeneratedSession, generate_sessions, session_ids
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.backfill import Summary as BackfillSummary
from memshift.migrate.parity import ParityTotals, parity
from memshift.migrate.plan import (
    GateRefused,
    PlanWatcher,
    Stage,
    load_plan,
    set_slice,
    set_stage,
)
from memshift.migrate.repair import repair
from memshift.migrate.rule import Firing, set_rule, watch
from memshift.model import Message, SessionState, ToolRun, now
from memshift.observe import metrics
from memshift.observe.progress import progress
from memshift.redact import redact
from memshift.sql.migrations import upgrade
from memshift.sql.queries import query
from memshift.stores.layouts import get_layout
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore


def legacy_housekeeping(client: redis.Redis, prefix: str, generated: GeneratedSession) -> int:
    """What the legacy app does beside its writes: LTRIM long transcripts, EXPIRE.
    Returns how many messages LTRIM dropped."""
    keys = get_layout("reference", prefix).session_keys(generated.session_id)
    hash_key, messages_key = keys[0], keys[1]
    dropped = 0
    if generated.keep_last is not None:
        held = int(client.llen(messages_key))
        dropped = held - generated.keep_last
        if dropped > 0:
            pipe = client.pipeline(transaction=True)
            pipe.ltrim(messages_key, dropped, -1)
            pipe.hincrby(hash_key, "messages_trimmed", dropped)
            pipe.execute()
    if generated.ttl_seconds is not None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, generated.ttl_seconds)
        pipe.execute()
    return max(dropped, 0)


def generate_into_redis(
    settings: Settings, count: int, seed: int, *, console: Console, quiet: bool
) -> dict[str, int]:
    """`memshift generate`: legacy sessions into Redis only.

    Refuses (before any write) when some of the sessions exist already: the same seed
    makes the same sessions, and replaying their writes would fail partway (a status
    cannot move to the status it has). ``messages_trimmed`` counts what the legacy
    app's LTRIM dropped of the ``messages`` written.
    """
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    store = RedisStore(
        client, layout=settings.layout, prefix=settings.prefix, ttl_seconds=settings.ttl_seconds
    )
    messages = trimmed = 0
    try:
        _refuse_existing(client, settings, count, seed)
        with progress(console, quiet) as bar:
            task = bar.add_task("generating", total=count, rate="")
            for generated in generate_sessions(count, seed=seed):
                generated.play(store)
                trimmed += legacy_housekeeping(client, settings.prefix, generated)
                messages += sum(1 for c in generated.calls if c.method == "append_message")
                bar.advance(task)
    finally:
        store.close()
        client.close()
    return {"sessions": count, "messages": messages, "messages_trimmed": trimmed}


def _refuse_existing(client: redis.Redis, settings: Settings, count: int, seed: int) -> None:
    """ConfigError when Redis holds any key of a session this seed would generate."""
    layout = get_layout(settings.layout, settings.prefix)
    ids = session_ids(count, seed=seed)
    found = 0
    first: str | None = None
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = client.pipeline(transaction=False)
        for sid in chunk:
            pipe.exists(*layout.session_keys(sid))
        held = [sid for sid, n in zip(chunk, pipe.execute(), strict=True) if n]
        found += len(held)
        first = first or (held[0] if held else None)
    if found:
        raise ConfigError(
            f"{found:,} of the {count:,} sessions that --seed {seed} generates exist already "
            f"under prefix {settings.prefix!r} (e.g. {first}): the same seed makes the same "
            f"sessions; pass another --seed (e.g. --seed {seed + 1}) or --prefix"
        )


# The read path the demo's traffic uses, and its cutover slices, in order.
READ_PATH = "resume"
SLICES = (10.0, 50.0, 100.0)
# The slice at which one session's PostgreSQL copy is corrupted (a lost write).
DRIFT_AT = 50.0
# A share of shadow and cutover reads compared live, so the dashboard shows some.
LIVE_SAMPLE_RATE = 0.05
WHO = "memshift demo"


def run_demo(
    settings: Settings, *, sessions: int, seed: int, console: Console, quiet: bool,
    step_seconds: float = 0.5, metrics_port: int | None = None, dashboard: bool = False,
    dashboard_host: str = "127.0.0.1", dashboard_port: int = 8765,
) -> dict[str, Any]:
    """A whole staged migration on generated sessions while traffic keeps flowing.

    Half of the sessions are written by the legacy app alone (``redis_only``); then
    the app swaps in the MigratingStore and the Plan moves ``dual_write → shadow →
    cutover (10 %, 50 %, 100 %) → pg_primary → retired`` while a traffic thread keeps
    writing and reading through the router, the backfill copies what Redis held
    before, and the rollback rule is enforced in the background. Each step lets the
    traffic run ``step_seconds`` and ends with a parity run. The report's ``steps``
    say what each step did and whether it passed; ``passed`` is all of them.

    ``metrics_port`` serves the metrics on loopback while it runs; ``dashboard``
    keeps the web dashboard open at the end, until Ctrl-C.
    """
    if step_seconds < 0:
        raise ConfigError(f"step_seconds must be 0 or more, got {step_seconds}")
    serve_dashboard = _dashboard_server() if dashboard else None
    say = (lambda *a, **k: None) if quiet else console.print
    with embedded.servers(settings) as (postgres_dsn, redis_url, started):
        for server in started:
            say(f"[dim]started embedded {server.kind} at {redact(server.url)}[/]")
        applied = upgrade(postgres_dsn)
        say(f"schema memshift: {len(applied)} migration(s) applied")
        metrics.install_state_collector(postgres_dsn)
        if metrics_port is not None:
            metrics.serve(metrics_port)
            say(f"metrics at http://127.0.0.1:{metrics_port}/metrics")
        with psycopg.connect(postgres_dsn, autocommit=True) as conn, _rule_said_by_demo():
            _start_over(conn, started)
            demo = _Demo(settings, postgres_dsn, redis_url, conn, console, quiet, step_seconds)
            try:
                report = demo.run(sessions, seed)
            finally:
                demo.close()
        if not quiet:
            _show(console, report)
        if serve_dashboard is not None:
            _keep_dashboard_open(serve_dashboard, demo.settings, dashboard_host, dashboard_port,
                                 console)
    return report


@contextlib.contextmanager
def _rule_said_by_demo() -> Iterator[None]:
    """The demo tells of the rule's firings in its own lines: keep the rule's log
    warning (which `memshift watch` shows an operator) from printing among them."""
    logger = logging.getLogger("memshift.rule")
    quiet = logging.NullHandler()
    logger.addHandler(quiet)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate


def _start_over(conn: psycopg.Connection[Any], started: Sequence[embedded.EmbeddedServer]) -> None:
    stage = load_plan(conn).stage
    if stage is not Stage.REDIS_ONLY and any(s.kind == "postgres" for s in started):
        # The embedded servers are the demo's own: a second run starts over.
        set_stage(conn, Stage.REDIS_ONLY, "the demo starts over", force=True, who=WHO)
    elif stage is not Stage.REDIS_ONLY:
        raise ConfigError(
            "the demo moves the Plan from redis_only to retired, but this database's Plan "
            f"is at {stage}; run the demo on a scratch database (point --postgres-dsn or "
            "MEMSHIFT_POSTGRES_DSN at it), or with neither set so that it starts embedded "
            "servers of its own"
        )


DashboardServer = Callable[[Settings, str, int, str], None]


def _dashboard_server() -> DashboardServer:
    """The web dashboard's entry point, checked before the demo runs, not after."""
    how = ("reinstall memshift with its dependencies (starlette, jinja2, uvicorn), or run "
           "the demo without --dashboard")
    try:
        from memshift.web import serve_dashboard
    except ImportError as exc:
        raise ConfigError(f"--dashboard needs the web dashboard, which cannot be imported "
                          f"here ({exc}); {how}") from None
    if importlib.util.find_spec("uvicorn") is None:
        raise ConfigError(f"--dashboard needs uvicorn to serve the dashboard; {how}")
    return serve_dashboard


def _keep_dashboard_open(
    serve_dashboard: DashboardServer, settings: Settings, host: str, port: int,
    console: Console,
) -> None:
    from memshift.web import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    console.print(f"dashboard at [bold]http://{host}:{port}/[/] (metrics at /metrics); "
                  "press Ctrl-C to stop it and the demo's servers")
    if TOKEN_ENV not in os.environ:
        console.print(f"log in with the token [bold]{token}[/] (shown once; set {TOKEN_ENV} "
                      "to choose it)")
    serve_dashboard(settings, host, port, token)


@dataclass
class Step:
    """One step of the demo, as its final table shows it."""

    name: str
    stage: str = ""
    seconds: float = 0.0
    sessions: int = 0  # in PostgreSQL at the end of the step
    messages: int = 0
    parity: dict[str, int] = field(default_factory=dict)  # status -> sessions
    rollbacks: int = 0  # by the rollback rule, during the step
    passed: bool = False
    note: str = ""

    def add(self, totals: ParityTotals) -> ParityTotals:
        for status, n in totals.counts.items():
            self.parity[status] = self.parity.get(status, 0) + n
        return totals

    def clean(self, totals: ParityTotals) -> bool:
        """No session failed or could not be read (pending ones were in flight)."""
        return totals.counts["fail"] == 0 and totals.counts["error"] == 0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "seconds": round(self.seconds, 2),
                "sessions": self.sessions, "messages": self.messages, "parity": self.parity,
                "rollbacks": self.rollbacks, "passed": self.passed, "note": self.note}


class _Demo:
    def __init__(
        self, settings: Settings, postgres_dsn: str, redis_url: str,
        conn: psycopg.Connection[Any], console: Console, quiet: bool, step_seconds: float,
    ) -> None:
        self.settings = replace(settings, postgres_dsn=postgres_dsn, redis_url=redis_url)
        self.conn = conn
        self.console = console
        self.quiet = quiet
        self.step_seconds = step_seconds
        self.client = redis.Redis.from_url(redis_url)
        self.legacy = RedisStore(self.client, layout=settings.layout, prefix=settings.prefix,
                                 ttl_seconds=settings.ttl_seconds)
        self.truth = PostgresStore(postgres_dsn)
        self.watcher = PlanWatcher(postgres_dsn, poll_seconds=1.0)
        self.router = MigratingStore(
            RedisStore(redis_url, layout=settings.layout, prefix=settings.prefix),
            PostgresStore(postgres_dsn),
            self.watcher,
            spool_path=Path(settings.data_dir) / "repair.spool",
            secondary_timeout=settings.secondary_timeout_seconds,
        )
        self.steps: list[Step] = []
        self.traffic: _Traffic | None = None  # the app's traffic through the router
        self.firings: list[Firing] = []  # the rollback rule's, as `memshift watch` heard them
        self._rule_stop = threading.Event()
        self._rule = threading.Thread(target=self._enforce_rule, name="memshift-demo-watch",
                                      daemon=True)
        self.started = time.perf_counter()

    def close(self) -> None:
        self._rule_stop.set()
        if self._rule.is_alive():
            self._rule.join(timeout=10)
        self.router.close()
        self.watcher.close()
        self.legacy.close()
        self.truth.close()
        self.client.close()

    def say(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"[dim]{elapsed:6.1f}s[/] {text}")

    # -- the steps ----------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time a step and, at its end, count what PostgreSQL holds and the rule did."""
        current = Step(name)
        fired = len(self.firings)
        began = time.perf_counter()
        yield current
        current.seconds = time.perf_counter() - began
        current.stage = str(load_plan(self.conn).stage)
        row = self.conn.execute(query("demo_totals")).fetchone()
        current.sessions, current.messages = row if row else (0, 0)
        current.rollbacks = len(self.firings) - fired
        self.steps.append(current)
        mark = "[green]passed[/]" if current.passed else "[red]FAILED[/]"
        self.say(f"{mark} {name}: {current.note}")

    def stage(self, target: Stage, why: str) -> None:
        plan = set_stage(self.conn, target, why, who=WHO)
        primary, secondary = plan.writes()
        self.say(f"stage [bold]{plan.stage}[/]: writes to {primary}"
                 + (f" then {secondary}" if secondary else "") + f" — {why}")

    def run(self, count: int, seed: int) -> dict[str, Any]:
        # Ids of this run's own, so a second demo on the same servers starts afresh.
        generated = list(generate_sessions(count, seed=seed, namespace=f"demo{int(time.time())}"))
        split = max(count // 2, 1)
        legacy_half, live_half = generated[:split], generated[split:]
        ids = [g.session_id for g in generated]
        self.redis_only(legacy_half)
        self._rule.start()
        traffic = self.traffic = _Traffic(self.router, [g.session_id for g in legacy_half])
        try:
            summary = self.dual_write(live_half, ids, traffic)
            self.shadow(ids)
            self.cutover(ids, live_half or legacy_half)
            checked = self.pg_primary(ids)
        finally:
            traffic.stop()
        repaired = repair(self.settings, spool_path=self.router.spool_path)
        self.say(f"traffic: {traffic.writes:,} writes and {traffic.reads:,} reads during the "
                 f"migration, {traffic.failures} failed; "
                 f"{repaired.sessions_repaired} session(s) repaired")
        report = _compare(self.legacy, self.truth, ids)
        self.retired(ids, [g.session_id for g in legacy_half])
        report.update(
            seconds=round(time.perf_counter() - self.started, 2),
            stage=str(load_plan(self.conn).stage),
            traffic={"writes": traffic.writes, "reads": traffic.reads,
                     "failed": traffic.failures},
            backfill=summary.as_json(),
            parity=checked.as_json(),
            steps=[s.as_json() for s in self.steps],
            rollbacks={"by_rule": len(self.firings),
                       "read_paths": [f.read_path for f in self.firings]},
            passed=all(s.passed for s in self.steps),
        )
        return report

    def redis_only(self, legacy_half: list[GeneratedSession]) -> None:
        with self.step("redis_only: the legacy app") as step, \
                progress(self.console, self.quiet) as bar:
            task = bar.add_task("legacy app writes to Redis", total=len(legacy_half), rate="")
            for item in legacy_half:
                item.play(self.legacy)
                legacy_housekeeping(self.client, self.settings.prefix, item)
                bar.advance(task)
            held = sum(self.legacy.load_session(g.session_id) is not None for g in legacy_half)
            step.passed = held == len(legacy_half)
            step.note = (f"wrote {len(legacy_half)} sessions to Redis (long transcripts "
                         f"trimmed, some with a TTL); {held} readable")

    def dual_write(
        self, live_half: list[GeneratedSession], ids: list[str], traffic: _Traffic
    ) -> BackfillSummary:
        with self.step("dual_write + backfill") as step:
            self.stage(Stage.DUAL_WRITE, "the app now writes through MigratingStore")
            traffic.start()
            for item in live_half:
                item.play(self.router)
            self.say(f"dual_write: {len(live_half)} new sessions written through the router")
            summary = backfill(self.settings, BackfillOptions(layout=self.settings.layout,
                                                              prefix=self.settings.prefix))
            self.say(f"backfill run {summary.run_id}: {summary.migrated} migrated, "
                     f"{summary.unchanged} unchanged (in PostgreSQL already: written through "
                     "the router, or by an earlier demo run on these servers), "
                     f"{summary.quarantined} quarantined, {summary.messages:,} messages in "
                     f"{summary.seconds:.1f} s")
            totals = step.add(self.parity(ids))
            step.passed = (summary.state == "completed" and step.clean(totals)
                           and traffic.failures == 0)
            step.note = (f"backfill {summary.state}: {summary.migrated} migrated, "
                         f"{summary.quarantined} quarantined; parity {_counts(totals)}")
        return summary

    def shadow(self, ids: list[str]) -> None:
        with self.step("shadow") as step:
            set_rule(self.conn, "the demo compares a share of reads live",
                     shadow_sample_rate=LIVE_SAMPLE_RATE, who=WHO)
            self.stage(Stage.SHADOW, "backfill complete")
            self.traffic_runs()
            totals = step.add(self.parity(ids))
            step.passed = step.clean(totals)
            step.note = (f"Redis serves, {LIVE_SAMPLE_RATE:.0%} of reads compared live; "
                         f"parity {_counts(totals)}")

    def cutover(self, ids: list[str], candidates: list[GeneratedSession]) -> None:
        self.stage(Stage.CUTOVER, "start reading from PostgreSQL, slice by slice")
        for percent in SLICES:
            with self.step(f"cutover {percent:g} %") as step:
                fired = len(self.firings)
                served = self.slice(percent, f"{READ_PATH} {percent:g} %")
                totals = step.add(self.parity(ids))
                step.passed = step.clean(totals) and len(self.firings) == fired
                step.note = f"reads served by {_served(served)}; parity {_counts(totals)}"
            if percent == DRIFT_AT:
                self.drift_and_rollback(candidates, percent)

    def drift_and_rollback(self, candidates: list[GeneratedSession], percent: float) -> None:
        """A lost write in PostgreSQL: parity finds it, the rule moves the slice back, the
        session is repaired, and a person re-advances the slice."""
        with self.step(f"cutover {percent:g} %: drift → rollback → repair") as step:
            victim = self.inject_drift(candidates)
            before = len(self.firings)
            found = step.add(self.parity([victim]))
            fired = self.fired_since(before, wait=10.0)
            served = self.traffic_runs()
            self.say(f"reads of {READ_PATH!r} after the rollback: {_served(served)}")
            self.conn.execute(query("repair_enqueue"), {
                "session_id": victim, "target": "postgres", "operation": "demo: lost write",
                "error": "parity found PostgreSQL behind Redis", "enqueued_at": now(),
                "spool_id": None,
            })
            repaired = repair(self.settings, spool_path=self.router.spool_path)
            after = step.add(self.parity([victim]))
            self.say(f"repair copied {repaired.sessions_repaired} session(s) from Redis: "
                     f"parity of {victim} now {_counts(after)}")
            again = self.slice(percent, "drift repaired: a person re-advances the slice")
            step.passed = (found.counts["fail"] == 1 and fired is not None
                           and len(self.firings) == before + 1
                           and after.counts["pass"] == 1 and "postgres" not in served)
            step.note = ("one checkpoint lost in PostgreSQL; "
                         + (f"the rule fired: {fired.why()}" if fired else "the rule did NOT fire")
                         + f"; repaired; re-advanced to {percent:g} %: {_served(again)}")

    def pg_primary(self, ids: list[str]) -> ParityTotals:
        with self.step("pg_primary") as step:
            repair(self.settings, spool_path=self.router.spool_path)  # the gate: queue empty
            extra = self.advance(Stage.PG_PRIMARY, "PostgreSQL is the truth; Redis follows")
            self.traffic_runs()
            totals = step.add(self.parity(ids))
            step.passed = step.clean(totals)
            step.note = (f"PostgreSQL primary, Redis secondary; parity {_counts(totals)}"
                         + (f" ({extra} more parity run(s) for the gate)"
                            if extra else ""))
        return totals

    def retired(self, ids: list[str], traffic_ids: list[str]) -> None:
        """Redis only caches: reads through the router must agree with PostgreSQL."""
        with self.step("retired") as step:
            self.advance(Stage.RETIRED, "Redis is a cache in front of PostgreSQL now")
            traffic = _Traffic(self.router, traffic_ids)
            traffic.start()
            try:
                served = self.traffic_runs(traffic)
            finally:
                traffic.stop()
            # Each session read twice through the router: the first read fills the cache,
            # the second is served by it; both must show what PostgreSQL holds.
            agree, second = 0, dict.fromkeys(("cache", "postgres", "redis"), 0)
            for sid in ids:
                truth = self.truth.load_session(sid)
                first, again = (self.router.read(sid, READ_PATH) for _ in range(2))
                second[again.source] += 1
                agree += _same(first.state, truth) and _same(again.state, truth)
            step.parity = {"pass": agree, "fail": len(ids) - agree}
            step.passed = (agree == len(ids) and traffic.failures == 0
                           and set(served) <= {"cache", "postgres"} and second["redis"] == 0)
            step.note = (f"traffic's reads served by {_served(served)}; {agree}/{len(ids)} "
                         "sessions read twice through the router agree with PostgreSQL "
                         f"(second reads: {_served({k: v for k, v in second.items() if v})})")

    # -- helpers --------------------------------------------------------------------------

    def slice(self, percent: float, why: str) -> dict[str, int]:
        set_slice(self.conn, READ_PATH, percent, why, who=WHO)
        served = self.traffic_runs()
        self.say(f"slice {READ_PATH} at {percent:g} %: reads served by {_served(served)}")
        return served

    def traffic_runs(self, traffic: _Traffic | None = None) -> dict[str, int]:
        """Let the traffic run a while under the Plan just set; where its reads went."""
        traffic = traffic or self.traffic
        if traffic is None:
            return {}
        traffic.sources()
        time.sleep(max(self.step_seconds, 0.3))  # the watcher hears the change (NOTIFY)
        return traffic.sources()

    def advance(self, target: Stage, why: str) -> int:
        """Move forward. When the parity gate refuses (a session's latest check, made
        under live traffic, failed), do what its message says: run parity again, once;
        it stops the demo if that run fails too. Returns the runs."""
        runs = 0
        while True:
            try:
                self.stage(target, why)
                return runs
            except GateRefused as refused:
                if "parity" not in str(refused) or runs >= 1:
                    raise
                if runs == 0:
                    self.say(f"[yellow]gate[/]: {refused}")
                totals = self.parity(None, quiet=True)
                runs += 1
                if totals.counts["fail"] or totals.counts["error"]:
                    raise  # real drift: the demo stops, as a person would

    def inject_drift(self, candidates: list[GeneratedSession]) -> str:
        """Lose one session's latest checkpoint in PostgreSQL (a write that never came)."""
        for item in candidates:
            row = self.conn.execute(query("demo_drop_latest_checkpoint"),
                                    {"session_id": item.session_id}).fetchone()
            if row is not None:
                self.say(f"[red]drift[/]: checkpoint {row[0]} of session {item.session_id} "
                         "deleted from PostgreSQL with raw SQL")
                return item.session_id
        raise MemshiftError("the demo found no session with a checkpoint to corrupt")

    def fired_since(self, seen: int, wait: float) -> Firing | None:
        """The rule's first firing on the read path after the first ``seen`` firings,
        waiting up to ``wait`` seconds for it."""
        deadline = time.monotonic() + wait
        while True:
            for firing in self.firings[seen:]:
                if firing.read_path == READ_PATH:
                    plan = load_plan(self.conn)
                    self.say(f"[red]rollback[/] by the rule: {firing.why()}; slice {READ_PATH} "
                             f"now at {plan.slices[READ_PATH].percent:g} % "
                             f"(Plan version {plan.version})")
                    return firing
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _enforce_rule(self) -> None:
        """`memshift watch` in a thread: it enforces the rollback rule every 0.2 s."""
        try:
            watch(self.settings, interval=0.2, stop=self._rule_stop, on_pass=self.firings.extend)
        except MemshiftError as exc:  # the steps will say the rule did not fire
            self.say(f"[red]the rollback rule stopped[/]: {exc}")

    def parity(self, ids: list[str] | None, *, quiet: bool = False) -> ParityTotals:
        """`memshift parity` of these sessions (all when None) while traffic flows."""
        totals = ParityTotals()
        for report in parity(self.settings, session_ids=ids):
            totals.add(report)
        if not quiet:
            self.say(f"parity of {totals.checked} session(s) under live traffic: "
                     f"{_counts(totals)}; drift rate {totals.drift_rate:.2%}")
        return totals


def _same(seen: SessionState | None, truth: SessionState | None) -> bool:
    if seen is None or truth is None:
        return seen is truth
    return _resume_view(seen) == _resume_view(truth)


def _counts(totals: ParityTotals) -> str:
    counts = totals.counts
    text = f"{counts['pass']} pass"
    for status in ("fail", "pending", "error"):
        if counts[status]:
            text += f", {counts[status]} {status}"
    return text


def _served(served: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(served.items())) or "no reads"


class _Traffic(threading.Thread):
    """The live app: keeps resuming, appending and retrying tools through the router."""

    def __init__(self, router: MigratingStore, ids: list[str]) -> None:
        super().__init__(name="memshift-demo-traffic", daemon=True)
        self.router = router
        self.ids = ids
        self.halt = threading.Event()
        self.writes = self.reads = self.failures = 0
        self.served: dict[str, int] = {}
        self.lock = threading.Lock()

    def sources(self) -> dict[str, int]:
        with self.lock:
            seen, self.served = self.served, {}
        return seen

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        rng = random.Random(1)
        n = 0
        while not self.halt.is_set():
            sid = rng.choice(self.ids)
            n += 1
            try:
                read = self.router.read(sid, read_path="resume")
                with self.lock:
                    self.reads += 1
                    self.served[read.source] = self.served.get(read.source, 0) + 1
                if read.state is None:
                    continue  # expired in Redis before the migration: nothing to resume
                if n % 3:
                    self.router.append_message(sid, Message(
                        message_id=f"{sid}-live-{n}", role="user", content=f"still here ({n})"))
                else:
                    run = read.state.tool_runs[0] if read.state.tool_runs else ToolRun(
                        tool_call_id=f"{sid}-live", name="probe")
                    self.router.upsert_tool_run(sid, run.model_copy(
                        update={"attempts": run.attempts + 1, "updated_at": now()}))
                self.writes += 1
            except MemshiftError:
                self.failures += 1
            time.sleep(0.002)


def _resume_view(state: SessionState) -> dict[str, Any]:
    """What an agent needs to resume: compared across the two stores."""
    summary = state.latest_summary
    checkpoint = state.latest_checkpoint
    return {
        "status": state.session.status,
        "message_count": state.message_count,
        "tail": [(m.seq, m.message_id, m.content) for m in state.messages[-5:]],
        "tools": sorted((t.tool_call_id, t.status, t.attempts) for t in state.tool_runs),
        "summary_version": summary.version if summary else None,
        "checkpoint": (checkpoint.checkpoint_id, checkpoint.step) if checkpoint else None,
    }


def _compare(legacy: RedisStore, truth: PostgresStore, ids: list[str]) -> dict[str, Any]:
    totals: dict[str, dict[str, int]] = {
        store: dict.fromkeys(
            ("sessions", "messages held", "messages trimmed", "tool runs", "tool runs mid-retry",
             "summary versions", "checkpoints", "status events", "with TTL"),
            0,
        )
        for store in ("redis", "postgres")
    }
    agree = 0
    differing: list[str] = []
    for sid in ids:
        states = {"redis": legacy.load_session(sid), "postgres": truth.load_session(sid)}
        for name, state in states.items():
            if state is None:
                continue
            row = totals[name]
            row["sessions"] += 1
            row["messages held"] += len(state.messages)
            row["messages trimmed"] += state.session.messages_trimmed if name == "redis" else 0
            row["tool runs"] += len(state.tool_runs)
            row["tool runs mid-retry"] += sum(1 for t in state.tool_runs if not t.terminal)
            row["summary versions"] += len(state.summaries)
            row["checkpoints"] += len(state.checkpoints)
            row["status events"] += len(state.events)
            row["with TTL"] += state.session.expires_at is not None
        redis_state, pg_state = states["redis"], states["postgres"]
        if redis_state and pg_state and _resume_view(redis_state) == _resume_view(pg_state):
            agree += 1
        else:
            differing.append(sid)
    return {"sessions": len(ids), "stores": totals, "resume_state_agrees": agree,
            "differing": differing[:20]}


def _show(console: Console, report: dict[str, Any]) -> None:
    table = Table("", "Redis (legacy)", "PostgreSQL (truth)", title="What is where")
    redis_row, pg_row = report["stores"]["redis"], report["stores"]["postgres"]
    for key in redis_row:
        table.add_row(key, f"{redis_row[key]:,}", f"{pg_row[key]:,}")
    console.print(table)
    console.print(
        "Redis keeps the latest summary and checkpoint and the untrimmed tail; "
        "PostgreSQL keeps every version, the whole checkpoint chain and every message."
    )
    agree, total = report["resume_state_agrees"], report["sessions"]
    colour = "green" if agree == total else "red"
    console.print(
        f"[{colour}]{agree}/{total} sessions resume the same from both stores[/] "
        "(status, message count and tail, tool retry state, summary version, checkpoint) "
        f"— {report['seconds']} s"
    )
    _show_steps(console, report)


def _show_steps(console: Console, report: dict[str, Any]) -> None:
    table = Table("step", "stage", "sessions in PG", "messages in PG", "parity", "rollbacks",
                  "seconds", "passed", title="The migration, step by step")
    for step in report["steps"]:
        counts = step["parity"]
        checked = (", ".join(f"{n} {status}" for status, n in counts.items() if n)
                   if counts else "—")
        table.add_row(step["name"], step["stage"], f"{step['sessions']:,}",
                      f"{step['messages']:,}", checked, str(step["rollbacks"]),
                      f"{step['seconds']:.1f}",
                      "[green]passed[/]" if step["passed"] else "[red]FAILED[/]")
    console.print(table)
    rollbacks = report["rollbacks"]["by_rule"]
    verdict = "[green]every step passed[/]" if report["passed"] else "[red]a step failed[/]"
    console.print(f"{verdict}; {rollbacks} rollback(s) by the rollback rule; "
                  f"final stage {report['stage']} — {report['seconds']} s in all")
