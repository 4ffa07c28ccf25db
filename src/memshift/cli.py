"""The ``memshift`` command line. Library code raises; only this module prints errors.

Settings come from flags, then ``MEMSHIFT_*`` environment variables, then
``memshift.toml``; see ``memshift config``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from typer.core import TyperArgument, TyperOption

from memshift import __version__
from memshift.config import (
    CONFIG_FILENAME,
    Settings,
    describe,
    explain_settings,
    where_to_set,
)
from memshift.errors import ConfigError, MemshiftError, SessionNotFound
from memshift.redact import redact

app = typer.Typer(
    name="memshift",
    help=(
        "Move an AI agent's session memory from Redis to PostgreSQL while the product "
        "is live: dual-write, backfill, parity checks and sliced read cutover.\n\n"
        "Start with `memshift demo` (no servers needed), then `memshift db upgrade`."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create and inspect the memshift schema in PostgreSQL.")
app.add_typer(db_app, name="db", no_args_is_help=True)

# Off a terminal (a pipe, a CI log) rich would wrap and cut tables at 80 columns: there,
# lines are as long as their content, unless $COLUMNS asks for a width.
UNWRAPPED_WIDTH = 100_000


def _console(*, stderr: bool = False) -> Console:
    """A console that wraps at the terminal's width, and off a terminal not at all."""
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = UNWRAPPED_WIDTH
    return console


out = _console()
err = _console(stderr=True)


def _help_as_click_shows_it() -> None:
    """typer's rich help shows every flag (--help too) as taking a ``<bool>``, and a
    required argument as ``{NAME}`` in the usage line; a flag takes no value, and
    ``NAME`` (``[NAME]`` when optional) is how click and man pages write arguments."""
    typed = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else typed(self, ctx)

    def usage_name(self: TyperArgument) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]


_help_as_click_shows_it()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]
LayoutOption = Annotated[
    str | None, typer.Option("--layout", help="Redis layout [default: the global one].")
]
PrefixOption = Annotated[
    str | None, typer.Option("--prefix", help="Redis key prefix [default: the global one].")
]


def _version(value: bool) -> None:
    if value:
        out.print(f"memshift {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis holding the legacy sessions [env MEMSHIFT_REDIS_URL].",
            show_default=False,
        ),
    ] = None,
    postgres_dsn: Annotated[
        str | None,
        typer.Option(
            "--postgres-dsn",
            help="PostgreSQL to migrate into [env MEMSHIFT_POSTGRES_DSN].",
            show_default=False,
        ),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout", help="Redis key layout [env MEMSHIFT_LAYOUT; default reference]."
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", help="Redis key prefix [env MEMSHIFT_PREFIX; default agent]."),
    ] = None,
    ttl_seconds: Annotated[
        int | None,
        typer.Option(
            "--ttl-seconds",
            help="TTL refreshed on a session's Redis keys at every write "
            "[env MEMSHIFT_TTL_SECONDS; default: keep the TTL sessions have].",
            show_default=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where embedded servers keep their data "
            "[env MEMSHIFT_DATA_DIR; default .memshift].",
            show_default=False,
        ),
    ] = None,
    secondary_timeout_seconds: Annotated[
        float | None,
        typer.Option(
            "--secondary-timeout-seconds",
            help="How long a router's write to PostgreSQL as the secondary may take before "
            "it is queued for repair [env MEMSHIFT_SECONDARY_TIMEOUT_SECONDS; default 2].",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Settings file [default ./memshift.toml if present]."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    ctx.obj = {
        "overrides": {
            "redis_url": redis_url,
            "postgres_dsn": postgres_dsn,
            "layout": layout,
            "prefix": prefix,
            "ttl_seconds": ttl_seconds,
            "data_dir": data_dir,
            "secondary_timeout_seconds": secondary_timeout_seconds,
        },
        "config": config,
    }


def settings_of(ctx: typer.Context) -> Settings:
    return explained_settings(ctx)[0]


def explained_settings(ctx: typer.Context) -> tuple[Settings, dict[str, str]]:
    """The settings from the global options, env and memshift.toml, and where each came from."""
    obj: dict[str, Any] = ctx.find_root().obj or {}
    return explain_settings(obj.get("overrides", {}), config_file=obj.get("config"))


def need_postgres(settings: Settings) -> str:
    if not settings.postgres_dsn:
        raise ConfigError(
            "no PostgreSQL given: pass --postgres-dsn, set MEMSHIFT_POSTGRES_DSN, or put "
            "postgres_dsn in memshift.toml (e.g. postgresql://user@localhost:5432/app)"
        )
    return settings.postgres_dsn


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")


MetricsPort = Annotated[
    int | None,
    typer.Option("--metrics-port", min=1, max=65535, show_default=False,
                 help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics while it "
                      "runs (see docs/observability.md)."),
]


def serve_metrics(settings: Settings, port: int | None) -> None:
    """Expose this process's metrics, with the control plane's state, on loopback."""
    if port is None:
        return
    from memshift.observe.metrics import install_state_collector, serve

    install_state_collector(need_postgres(settings))
    serve(port)


@app.command("config", epilog="Example: memshift --prefix agent config --json")
def show_config(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show the settings in effect (passwords hidden), where each came from (default,
    flag, MEMSHIFT_* environment variable or memshift.toml) and where each can be set.

    --json prints the values, and their origins under "sources".
    """
    settings, origins = explained_settings(ctx)
    shown = describe(settings)
    if as_json:
        emit_json(shown | {"sources": origins})
        return
    table = Table("setting", Column("value", overflow="fold"), "from", title="memshift settings")
    for key, value in shown.items():
        table.add_row(key, escape("—" if value is None else str(value)), escape(origins[key]))
    out.print(table)
    out.print(f"each can be set with its flag, environment variable or key in {CONFIG_FILENAME}"
              f", e.g. {where_to_set('prefix')} (flags first, then the environment, then "
              "the file)", highlight=False)


@db_app.command("upgrade", epilog="Example: memshift --postgres-dsn postgresql://app@db:5432/app "
                                  "db upgrade")
def db_upgrade(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Apply the schema migrations PostgreSQL lacks (safe to run twice, or at once)."""
    from memshift.sql.migrations import status, upgrade

    dsn = need_postgres(settings_of(ctx))
    applied = upgrade(dsn)
    version = status(dsn).current
    if as_json:
        emit_json({"applied": [f"{m.version:04d}_{m.name}" for m in applied], "version": version})
        return
    for migration in applied:
        out.print(f"applied {migration.version:04d}_{migration.name}")
    out.print(f"schema memshift is at version {version} ({redact(dsn)})")


@db_app.command("status")
def db_status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show the schema version and any pending migrations. Exit 1 when behind."""
    from memshift.sql.migrations import status

    dsn = need_postgres(settings_of(ctx))
    state = status(dsn)
    if as_json:
        emit_json(
            {
                "version": state.current,
                "latest": state.latest,
                "up_to_date": state.up_to_date,
                "pending": [f"{m.version:04d}_{m.name}" for m in state.pending],
                "modified": state.modified,
            }
        )
    else:
        table = Table(
            "version", "migration", "applied at", title=f"memshift schema ({redact(dsn)})"
        )
        for done in state.applied:
            table.add_row(str(done.version), done.name, done.applied_at.isoformat())
        for todo in state.pending:
            table.add_row(str(todo.version), todo.name, "[yellow]pending[/]")
        out.print(table)
        if state.pending:
            out.print("[yellow]run `memshift db upgrade` to apply the pending migrations[/]")
    if not state.up_to_date:
        raise typer.Exit(1)


@app.command("generate", epilog="Example: memshift --redis-url redis://localhost:6379/0 "
                                  "--prefix trial generate -n 2000 --seed 1")
def generate_cmd(
    ctx: typer.Context,
    sessions: Annotated[int, typer.Option("--sessions", "-n", min=1, help="How many.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same sessions.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Write realistic legacy sessions into Redis in the reference layout.

    Trimmed transcripts, tool runs mid-retry, several summary versions, checkpoint
    chains, status events, and a TTL on some sessions. The same --seed makes the same
    sessions: exit 2, before any write, if some of them exist under the prefix already.
    """
    from memshift.demo import generate_into_redis

    settings = settings_of(ctx)
    if not settings.redis_url:
        raise ConfigError(
            "no Redis given: pass --redis-url or set MEMSHIFT_REDIS_URL "
            "(e.g. redis://localhost:6379/0)"
        )
    counts = generate_into_redis(settings, sessions, seed, console=err, quiet=as_json)
    if as_json:
        emit_json(counts)
    else:
        trimmed = counts["messages_trimmed"]
        held = counts["messages"] - trimmed
        out.print(
            f"wrote {counts['sessions']:,} sessions ({counts['messages']:,} messages) under "
            f"prefix {settings.prefix!r}"
            + (f"; the legacy app's LTRIM then trimmed {trimmed:,} of them from long "
               f"transcripts, so Redis holds {held:,}" if trimmed else ""),
            highlight=False,
        )


@app.command("demo", epilog="Example: memshift demo -n 200 (embedded servers in .memshift), or "
                            "memshift demo --dashboard")
def demo_cmd(
    ctx: typer.Context,
    sessions: Annotated[int, typer.Option("--sessions", "-n", min=1, help="How many.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same sessions.")] = 0,
    step_seconds: Annotated[
        float, typer.Option("--step-seconds", min=0, help="Traffic time at each step.")
    ] = 0.5,
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Keep the web dashboard open at the end "
                                               "(until Ctrl-C).")
    ] = False,
    dashboard_port: Annotated[
        int, typer.Option("--dashboard-port", min=1, max=65535, help="Its port on 127.0.0.1.")
    ] = 8765,
    metrics_port: MetricsPort = None,
    as_json: JsonFlag = False,
) -> None:
    """Run memshift end to end on generated sessions: a whole staged migration under
    live traffic, with parity at each step, one injected drift that the rollback rule
    rolls back, and a final table of every step. Exit 1 if a step failed.

    With no PostgreSQL or Redis given, starts embedded ones (real servers, in
    --data-dir .memshift) and stops them at the end.
    """
    from memshift.demo import run_demo

    report = run_demo(settings_of(ctx), sessions=sessions, seed=seed, console=out,
                      quiet=as_json, step_seconds=step_seconds, metrics_port=metrics_port,
                      dashboard=dashboard, dashboard_port=dashboard_port)
    if as_json:
        emit_json(report)
    if not report["passed"]:
        raise typer.Exit(1)


quarantine_app = typer.Typer(help="Sessions that could not be migrated as they are.")
app.add_typer(quarantine_app, name="quarantine", no_args_is_help=True)


@app.command("backfill", epilog="Example: memshift backfill --workers 4 (again after an "
                                "interruption: it resumes), then memshift backfill --status")
def backfill_cmd(
    ctx: typer.Context,
    layout: LayoutOption = None,
    prefix: PrefixOption = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=1, help="Worker processes.")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=100_000, help="Sessions per batch.")
    ] = 200,
    lease_seconds: Annotated[
        float,
        typer.Option("--lease-seconds", min=0.1,
                     help="Seconds after which another worker retakes the batch of a worker "
                          "that stopped answering."),
    ] = 30.0,
    fail_on_quarantine: Annotated[
        bool,
        typer.Option("--fail-on-quarantine", help="Exit 9 if any session was quarantined."),
    ] = False,
    status: Annotated[
        bool, typer.Option("--status", help="Show the latest runs instead of running.")
    ] = False,
    abandon: Annotated[
        int | None,
        typer.Option("--abandon", metavar="RUN_ID", show_default=False,
                     help="Give up on this unfinished run instead of running (e.g. one "
                          "started against a wrong Redis URL), so the stage gates stop "
                          "waiting for it; needs --reason."),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option("--reason", show_default=False,
                     help="Why the run is abandoned (with --abandon): kept with the run."),
    ] = None,
    metrics_port: MetricsPort = None,
    as_json: JsonFlag = False,
) -> None:
    """Copy every session in Redis into PostgreSQL: resumable, parallel, safe beside
    live writes.

    Run it again after an interruption: it joins the unfinished run and goes on where
    it stopped. Sessions that cannot be read are quarantined with a reason; the run
    goes on (see `memshift quarantine list`).
    """
    from memshift.migrate.backfill import BackfillOptions, backfill, connect, runs
    from memshift.observe.progress import BackfillProgress

    settings = settings_of(ctx)
    if abandon is not None:
        abandon_backfill(settings, abandon, reason or "", as_json)
        return
    if status:
        with connect(need_postgres(settings)) as conn:
            found = runs(conn)
        if as_json:
            emit_json([r.as_json() | r.extra for r in found])
            return
        table = Table("run", "state", "source", "seen", "done", "migrated", "unchanged",
                      "quarantined", "vanished", "messages", "seconds", title="backfill runs")
        for r in found:
            table.add_row(str(r.run_id), r.state, f"{r.extra['source']} {r.extra['prefix']}",
                          f"{r.sessions_seen:,}", f"{r.sessions_done:,}", f"{r.migrated:,}",
                          f"{r.unchanged:,}", f"{r.quarantined:,}", f"{r.vanished:,}",
                          f"{r.messages:,}", f"{r.seconds:,.1f}")
        out.print(table)
        for r in found:
            if "abandoned_by" in r.extra:
                out.print(f"run {r.run_id} was abandoned by {r.extra['abandoned_by']}: "
                          f"{r.extra['abandoned_reason']}", markup=False)
        return
    serve_metrics(settings, metrics_port)
    options = BackfillOptions(
        layout=layout or settings.layout,
        prefix=prefix or settings.prefix,
        workers=workers,
        batch_size=batch_size,
        lease_seconds=lease_seconds,
    )
    with BackfillProgress(err, quiet=as_json) as progress:
        summary = backfill(settings, options, on_progress=progress.update)
    if as_json:
        emit_json(summary.as_json())
    else:
        data = summary.as_json()
        out.print(
            f"backfill run {summary.run_id} {summary.state}: {summary.migrated:,} migrated, "
            f"{summary.unchanged:,} unchanged, {summary.quarantined:,} quarantined, "
            f"{summary.vanished:,} vanished; {summary.messages:,} messages in "
            f"{summary.seconds:,.1f} s ({data['sessions_per_second']:,} sessions/s, "
            f"{data['messages_per_second']:,} messages/s)"
        )
        if summary.quarantined:
            out.print("[yellow]see `memshift quarantine list` for the quarantined sessions[/]")
    if fail_on_quarantine and summary.quarantined:
        raise typer.Exit(9)


def abandon_backfill(settings: Settings, run_id: int, why: str, as_json: bool) -> None:
    """`memshift backfill --abandon RUN_ID --reason R`: audited, on the run itself."""
    from memshift.migrate.backfill import abandon_run, connect
    from memshift.migrate.plan import operator

    with connect(need_postgres(settings)) as conn:
        run = abandon_run(conn, run_id, why, who=operator())
    if as_json:
        emit_json(run.as_json() | run.extra)
        return
    out.print(f"backfill run {run.run_id} ({escape(run.extra['source'])}, prefix "
              f"{escape(run.extra['prefix'])}) abandoned; the stage gates no longer wait "
              "for it")


@app.command("follow", epilog="Example: memshift follow --configure-redis --workers 4")
def follow_cmd(
    ctx: typer.Context,
    layout: LayoutOption = None,
    prefix: PrefixOption = None,
    configure_redis: Annotated[
        bool,
        typer.Option("--configure-redis",
                     help="Turn on the keyspace notifications the layout needs "
                          "(CONFIG SET notify-keyspace-events) if they are off."),
    ] = False,
    sweep_seconds: Annotated[
        float, typer.Option("--sweep-seconds", min=1, help="Seconds between sweeps.")
    ] = 300.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Sessions per batch.")
    ] = 200,
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=1, max=32,
                          help="Threads that re-read and merge changed sessions.")
    ] = 4,
    report_seconds: Annotated[
        float, typer.Option("--report-seconds", min=0.5, help="Seconds between status lines.")
    ] = 10.0,
    metrics_port: MetricsPort = None,
    status: Annotated[
        bool, typer.Option("--status", help="Show the followers instead of following.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (one object per status line).")
    ] = False,
) -> None:
    """Keep PostgreSQL in step with writes that reach Redis without memshift.

    Subscribes to Redis keyspace notifications for the layout's keys, re-reads each
    changed session whole and merges it like the backfill; a sweep catches up what
    notifications missed (at start, after a reconnect, every --sweep-seconds). Runs
    until Ctrl-C or SIGTERM (recorded as stopped) or until the Plan reaches pg_primary.

    Exit 2 when Redis lacks the notifications (the message says what to set).
    --status shows each follower's lag and last sweep; exit 1 when a running follower
    lags more than the Plan's gate allows.
    """
    import signal
    import threading

    from memshift.migrate.backfill import connect
    from memshift.migrate.follow import FollowOptions, FollowStatus, follow, followers
    from memshift.migrate.plan import FOLLOW_MAX_LAG_SECONDS

    settings = settings_of(ctx)
    if status:
        with connect(need_postgres(settings)) as conn:
            found = followers(conn)
        if as_json:
            emit_json([f.as_json() for f in found])
        else:
            table = Table("follower", "source", "state", "lag s", "events", "applied",
                          "expired", "sessions/s", "last sweep", title="followers")
            for f in found:
                state = f.state if f.state == "stopped" or f.responding else "not responding"
                sweep = ("never" if f.last_sweep_finished_at is None else
                         f"{f.last_sweep_finished_at:%Y-%m-%d %H:%M:%S} "
                         f"({f.last_sweep_scanned:,} read, {f.last_sweep_applied:,} changed)")
                table.add_row(str(f.follower_id), escape(f"{f.source} {f.layout}:{f.prefix}"),
                              state, f"{f.lag_seconds:,.2f}", f"{f.events:,}",
                              f"{f.sessions_applied:,}", f"{f.sessions_expired:,}",
                              f"{f.sessions_per_second:,.1f}", sweep)
            out.print(table)
        if any(f.state == "running" and f.lag_seconds > FOLLOW_MAX_LAG_SECONDS for f in found):
            raise typer.Exit(1)
        return
    options = FollowOptions(layout=layout or settings.layout, prefix=prefix or settings.prefix,
                            configure_redis=configure_redis, sweep_seconds=sweep_seconds,
                            batch_size=batch_size, workers=workers)
    if metrics_port is not None:
        from memshift.observe.metrics import serve

        serve(metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started: list[bool] = []

    def report(now: FollowStatus) -> None:
        if as_json:
            emit_json(now.as_json())
            return
        if not started:  # the first report comes once the follower is subscribed
            started.append(True)
            out.print(f"following {options.layout}:{options.prefix} in "
                      f"{redact(settings.redis_url or '')} as follower {now.follower_id} "
                      "(Ctrl-C or SIGTERM stops it)", highlight=False)
        colour = "green" if now.lag_seconds <= FOLLOW_MAX_LAG_SECONDS else "red"
        out.print(f"lag [{colour}]{now.lag_seconds:,.2f} s[/] · {now.events_per_second:,.0f} "
                  f"events/s · {now.sessions_per_second:,.0f} sessions/s applied · "
                  f"{now.pending_sessions:,} pending · {now.sessions_applied:,} applied, "
                  f"{now.sessions_expired:,} expired, {now.quarantined:,} quarantined"
                  + ("" if now.caught_up else " · catching up"), highlight=False)

    final = follow(settings, options, stop=stop, on_status=report,
                   report_seconds=report_seconds)
    report(final)


QuarantineValues = Annotated[
    bool,
    typer.Option("--show-values", help="Show the bad record's own text (quoted in reasons; "
                                       "the raw values) in full (by default: length and hash, "
                                       "so transcripts do not leak)."),
]


@quarantine_app.command("list", epilog="Example: memshift quarantine list --all --json")
def quarantine_list(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", help="Resolved and dismissed entries too.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    show_values: QuarantineValues = False,
    as_json: JsonFlag = False,
) -> None:
    """The quarantined sessions, newest first, with the reason for each."""
    from memshift.inspect import quarantine_json
    from memshift.migrate.backfill import connect
    from memshift.migrate.quarantine import entries

    with connect(need_postgres(settings_of(ctx))) as conn:
        found = [quarantine_json(e, show_values=show_values)
                 for e in entries(conn, state=None if show_all else "open", limit=limit)]
    if as_json:
        emit_json(found)
        return
    table = Table("id", Column("session", overflow="fold"), "state", "seen", "last seen",
                  Column("reason", overflow="fold"), title="quarantine")
    for e in found:
        table.add_row(str(e["id"]), escape(e["session_id"]), e["state"], str(e["seen"]),
                      e["last_seen"], escape(e["reason"]) + dismissal(e))
    out.print(table)
    if found and not show_values:
        out.print("[dim]the record's own text is shown as length and hash; --show-values "
                  "shows it[/]")


@quarantine_app.command("show", epilog="Example: memshift quarantine show 12 --json")
def quarantine_show(
    ctx: typer.Context,
    entry_id: Annotated[int, typer.Argument(metavar="ID",
                                            help="The id from `memshift quarantine list`.")],
    show_values: QuarantineValues = False,
    as_json: JsonFlag = False,
) -> None:
    """One quarantined session: why, and every key of it as Redis held it (the values
    as length and hash unless --show-values)."""
    import base64

    from memshift.inspect import shown_raw, shown_reason
    from memshift.migrate.backfill import connect
    from memshift.migrate.quarantine import entry

    with connect(need_postgres(settings_of(ctx))) as conn:
        row = entry(conn, entry_id)
    row["session_key"] = base64.b64encode(row["session_key"]).decode()
    row["reason"] = shown_reason(row["reason"], show_values)
    row["raw"] = shown_raw(row["raw"], show_values)
    if as_json:
        emit_json(row)
        return
    out.print(f"[bold]{escape(row['session_id'])}[/] ({row['source']}, {row['state']}, "
              f"seen {row['seen']} times)")
    out.print(f"reason: {escape(row['reason'])}{dismissal(row)}")
    out.print_json(data=row["raw"])
    if not show_values:
        out.print("[dim]values are shown as length and hash; --show-values shows them as "
                  "Redis held them (bytes in base64)[/]")


@quarantine_app.command("retry", epilog="Example: memshift quarantine retry 12 13")
def quarantine_retry(
    ctx: typer.Context,
    entry_ids: Annotated[
        list[int] | None, typer.Argument(metavar="ID",
                                         help="Ids to retry [default: every open entry].")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Read quarantined sessions from Redis again and migrate those now valid.

    An entry already resolved (its session migrated) is left alone, and said so.
    """
    from memshift.migrate.backfill import retry_quarantine

    settings = settings_of(ctx)
    resolved = _resolved_entries(settings, entry_ids or [])
    todo = [i for i in entry_ids or [] if i not in resolved]
    outcome = {"migrated": 0, "still_bad": 0, "vanished": 0}
    if todo or not entry_ids:
        outcome = retry_quarantine(settings, todo or None)
    if as_json:
        emit_json(outcome | {"already_resolved": resolved})
        return
    for entry_id in resolved:
        out.print(f"quarantine entry {entry_id} is already resolved (its session was "
                  "migrated): nothing to retry")
    if todo or not entry_ids:
        out.print(f"{outcome['migrated']} migrated, {outcome['still_bad']} still bad (left in "
                  f"quarantine), {outcome['vanished']} vanished (gone from Redis)")


def _resolved_entries(settings: Settings, entry_ids: list[int]) -> list[int]:
    """Those of ``entry_ids`` whose session has been migrated already."""
    if not entry_ids:
        return []
    from memshift.migrate.backfill import connect
    from memshift.migrate.quarantine import entry

    with connect(need_postgres(settings)) as conn:
        return [i for i in dict.fromkeys(entry_ids) if entry(conn, i)["state"] == "resolved"]


@quarantine_app.command("dismiss")
def quarantine_dismiss(
    ctx: typer.Context,
    entry_ids: Annotated[
        list[int], typer.Argument(help="Ids from `memshift quarantine list`.")
    ],
    reason: Annotated[
        str, typer.Option("--reason", help="Why the loss is acceptable: kept with each entry.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Accept that these sessions are not migrated: they stay missing from PostgreSQL
    (after `retired` they read as absent), and the stage gates stop waiting for them.
    Who, when and why are kept (`memshift quarantine list --all`). Fixed in Redis
    later, a dismissed session still migrates with `memshift quarantine retry ID`."""
    from memshift.migrate.backfill import connect
    from memshift.migrate.plan import operator
    from memshift.migrate.quarantine import dismiss

    with connect(need_postgres(settings_of(ctx))) as conn:
        done = dismiss(conn, entry_ids, reason, who=operator())
    if as_json:
        emit_json({"dismissed": done})
    else:
        out.print(f"dismissed {len(done)} quarantine entr{'y' if len(done) == 1 else 'ies'}: "
                  + ", ".join(map(str, done)))


def dismissal(entry: dict[str, Any]) -> str:
    """Who dismissed a quarantine entry, when and why (empty for the others)."""
    from memshift.migrate.parity import iso_z

    if entry["state"] != "dismissed":
        return ""
    when = entry["dismissed_at"]
    return escape(f"; dismissed by {entry['dismissed_by']} at "
                  f"{when if isinstance(when, str) else iso_z(when)}: "
                  f"{entry['dismissed_reason']}")


stage_app = typer.Typer(help="The migration's stage: show it, move it (through its gates).")
app.add_typer(stage_app, name="stage", no_args_is_help=True)
slice_app = typer.Typer(help="Cut read paths over to PostgreSQL for a cohort of sessions.")
app.add_typer(slice_app, name="slice", no_args_is_help=True)
plan_app = typer.Typer(help="The Plan's audit log.")
app.add_typer(plan_app, name="plan", no_args_is_help=True)

Reason = Annotated[
    str, typer.Option("--reason", help="Why: recorded in the audit log (required).")
]


def _plan_conn(ctx: typer.Context) -> Any:
    from memshift.migrate.backfill import connect

    return connect(need_postgres(settings_of(ctx)))


def _show_plan(conn: Any, plan: Any, as_json: bool) -> None:
    from memshift.migrate.plan import Stage, check_gates

    gates = (check_gates(conn, list(Stage)[plan.stage.order + 1])
             if plan.stage is not Stage.RETIRED else [])
    if as_json:
        emit_json(plan.as_json() | {"next_stage_gates": [vars(g) for g in gates]})
        return
    primary, secondary = plan.writes()
    out.print(f"stage [bold]{plan.stage}[/] (Plan version {plan.version}, changed "
              f"{plan.changed_at.isoformat(timespec='seconds')} by {escape(plan.changed_by)})")
    out.print(f"writes: {primary} first" + (f", then {secondary}" if secondary else ""))
    if plan.slices:
        table = Table("read path", "percent", "tenants allowed", "tenants denied",
                      title="read slices (used in cutover)")
        for name, cut in sorted(plan.slices.items()):
            table.add_row(escape(name), f"{cut.percent:g} %", ", ".join(cut.tenant_allow) or "all",
                          ", ".join(cut.tenant_deny) or "none")
        out.print(table)
    if plan.stage is not Stage.RETIRED:
        following = list(Stage)[plan.stage.order + 1]
        for gate in gates:
            mark = "[green]pass[/]" if gate.passed else "[red]fail[/]"
            out.print(f"gate to {following}: {gate.name}: {mark} ({gate.detail})")
        if not gates:
            out.print(f"gate to {following}: none")


@stage_app.command("show")
def stage_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The current stage, slices, and whether the gates to the next stage pass."""
    from memshift.migrate.plan import load_plan

    with _plan_conn(ctx) as conn:
        _show_plan(conn, load_plan(conn), as_json)


@stage_app.command("set", epilog='Example: memshift stage set shadow --reason "backfill done"')
def stage_set(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(metavar="STAGE",
                                         help="redis_only, dual_write, shadow, cutover, "
                                              "pg_primary or retired.")],
    reason: Reason,
    force: Annotated[bool, typer.Option("--force", help="Override failing gates.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Move the migration to STAGE: forward one stage through its gates, back at once.

    Setting the stage the Plan is at already changes nothing (no audit entry), exit 0.
    """
    from memshift.migrate.plan import load_plan, set_stage

    with _plan_conn(ctx) as conn:
        current = load_plan(conn)
        if current.stage == stage:
            if not as_json:
                out.print(f"the Plan is at stage {stage} already: nothing changed")
            _show_plan(conn, current, as_json)
            return
        _show_plan(conn, set_stage(conn, stage, reason, force=force), as_json)


ReadPath = Annotated[
    str, typer.Argument(metavar="PATH", help="A read path: a name the app passes as "
                                             "read_path= to the router (default \"default\").")
]


@slice_app.command("set", epilog="Example: memshift slice set resume --percent 5 "
                                  "--reason \"5 % of resumes\"")
def slice_set(
    ctx: typer.Context,
    read_path: ReadPath,
    percent: Annotated[float, typer.Option("--percent", min=0, max=100,
                                           help="Share of sessions read from PostgreSQL.")],
    reason: Reason,
    tenant_allow: Annotated[str, typer.Option("--tenant-allow",
                                              help="Only these tenants (comma-separated).")] = "",
    tenant_deny: Annotated[str, typer.Option("--tenant-deny",
                                             help="Never these tenants (comma-separated).")] = "",
    new_path: Annotated[
        bool, typer.Option("--new-path", help="Allow a read path no router has reported "
                                              "yet (not a typo: the app is about to use it).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Read PATH from PostgreSQL for --percent % of sessions (in the cutover stage).

    PATH is a name the app passes as read_path= to the router (`default` when it passes
    none). A path that neither the Plan nor a router's live compare (in shadow) has seen
    is refused as a likely typo unless --new-path. Cohorts are a stable hash of the
    session id: a session stays in as the percent grows.
    """
    from memshift.migrate.plan import load_plan, set_slice

    def names(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    with _plan_conn(ctx) as conn:
        known = _known_read_paths(conn, load_plan(conn))
        if read_path not in known and not new_path:
            raise ConfigError(
                f"no router has reported read path {read_path!r} and the Plan has no slice "
                f"for it (known: {', '.join(sorted(known))}); check the spelling against "
                "the read_path= your app passes, or pass --new-path if the app is about to "
                "use it")
        plan = set_slice(conn, read_path, percent, reason, tenant_allow=names(tenant_allow),
                         tenant_deny=names(tenant_deny))
        _show_plan(conn, plan, as_json)


def _known_read_paths(conn: Any, plan: Any) -> set[str]:
    """Read paths seen: the router's default, the Plan's slices, and those the routers'
    live compares recorded parity results for (in shadow and cutover)."""
    from memshift.sql.queries import query

    seen = {row[0] for row in conn.execute(query("rule_read_paths")).fetchall()}
    return {"default"} | set(plan.slices) | seen


@slice_app.command("delete", epilog="Example: memshift slice delete resum --reason "
                                     "\"typo for resume\"")
def slice_delete(ctx: typer.Context, read_path: ReadPath, reason: Reason,
                 as_json: JsonFlag = False) -> None:
    """Remove PATH's slice (audited): its reads go where the stage sends reads that no
    slice covers (Redis in cutover)."""
    from memshift.migrate.plan import delete_slice

    with _plan_conn(ctx) as conn:
        _show_plan(conn, delete_slice(conn, read_path, reason), as_json)


@app.command("rollback", epilog='Example: memshift rollback --path resume --reason "drift on '
                                'resume"')
def rollback_cmd(
    ctx: typer.Context,
    reason: Reason,
    path: Annotated[str | None, typer.Option(
        "--path", help="Only this read path (a name the app passes as read_path=).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Move reads back to Redis at once: one read path, or all of them."""
    from memshift.migrate.plan import rollback

    with _plan_conn(ctx) as conn:
        _show_plan(conn, rollback(conn, reason, read_path=path), as_json)


@plan_app.command("history", epilog="Example: memshift plan history --limit 20")
def plan_history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Every change to the Plan, newest first: who, when, why, before and after."""
    from memshift.migrate.plan import history

    with _plan_conn(ctx) as conn:
        entries = history(conn, limit)
    if as_json:
        emit_json([vars(e) for e in entries])
        return
    table = Table("version", "at", "who", "action", "change", "why", title="Plan history")
    for e in entries:
        table.add_row(str(e.version), e.at.isoformat(timespec="seconds"), escape(e.who),
                      e.action + (" (forced)" if e.forced else ""),
                      escape(_plan_change(e.before, e.after)), escape(e.why))
    out.print(table)


def _plan_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What one audited Plan change changed, one line per part: "what: before → after"."""
    lines = []
    if before["stage"] != after["stage"]:
        lines.append(f"stage: {before['stage']} → {after['stage']}")
    old, new = before.get("slices", {}), after.get("slices", {})
    lines += [f"slice {path}: {_slice_text(old.get(path))} → {_slice_text(new.get(path))}"
              for path in sorted(old.keys() | new.keys()) if old.get(path) != new.get(path)]
    return "\n".join(lines + _changed("", _rules_in_effect(before), _rules_in_effect(after))
                     ) or "no change"


def _rules_in_effect(state: dict[str, Any]) -> dict[str, Any]:
    """The Plan's rules with their defaults filled in, so that a first `rule set` shows
    only the fields it changed, not every default becoming explicit."""
    from memshift.migrate.plan import Plan
    from memshift.migrate.rule import RollbackRule, shadow_sample_rate

    plan = Plan.model_validate(state)
    return plan.rules | {"rollback": RollbackRule.of(plan).model_dump(mode="json"),
                         "shadow_sample_rate": shadow_sample_rate(plan)}


def _changed(name: str, old: Any, new: Any) -> list[str]:
    """``name: old → new`` for each leaf that differs (rules are nested objects)."""
    if isinstance(old, dict | None) and isinstance(new, dict | None) and (old or new):
        old, new = old or {}, new or {}
        return [line for key in sorted(old.keys() | new.keys())
                for line in _changed(f"{name}.{key}" if name else key, old.get(key),
                                     new.get(key))]
    return [] if old == new else [f"{name}: {_compact(old)} → {_compact(new)}"]


def _slice_text(cut: dict[str, Any] | None) -> str:
    if cut is None:
        return "none"
    return (f"{cut['percent']:g} %"
            + (f" of tenants {', '.join(cut['tenant_allow'])}" if cut.get("tenant_allow") else "")
            + (f" except {', '.join(cut['tenant_deny'])}" if cut.get("tenant_deny") else ""))


def _compact(value: Any) -> str:
    return "default" if value is None else json.dumps(value, ensure_ascii=False,
                                                      separators=(",", ":"))


rule_app = typer.Typer(help="The Plan's rules: the rollback rule and the shadow sample rate.")
app.add_typer(rule_app, name="rule", no_args_is_help=True)


def _show_rules(plan: Any, as_json: bool, drift: list[Any] | None = None) -> None:
    from memshift.migrate.rule import RollbackRule, shadow_sample_rate

    rule = RollbackRule.of(plan)
    rate = shadow_sample_rate(plan)
    if as_json:
        shown = {"version": plan.version, "rollback": rule.model_dump(mode="json"),
                 "shadow_sample_rate": rate}
        if drift is not None:
            shown["slices"] = [d.as_json() for d in drift]
        emit_json(shown)
        return
    out.print(f"rollback rule (Plan version {plan.version}): a cutover slice goes back to "
              f"Redis when more than {rule.drift_rate:g} % of its last {rule.window} judged "
              f"parity results fail, or any fails {', '.join(rule.critical) or '(none)'}")
    out.print(f"live shadow compare: {rate:.2%} of shadow and cutover reads")
    if drift:
        _show_drift(plan, drift)


def _show_drift(plan: Any, drift: list[Any]) -> None:
    table = Table("read path", "cohort", "judged (live + batch)", "failed", "drift",
                  "critical failures", "since", "rule",
                  title=f"drift per read path, over the last {drift[0].rule.window} judged "
                        "results")
    for d in drift:
        acting = plan.stage == "cutover" and bool(d.percent)
        verdict = ("[red]fires[/]" if acting else "[yellow]over[/]") if d.over_rule else "holds"
        table.add_row(escape(d.read_path), "no slice" if d.percent is None else f"{d.percent:g} %",
                      f"{d.judged:,} ({d.live:,} + {d.judged - d.live:,})", f"{d.failed:,}",
                      f"{d.drift_rate:.2f} %",
                      ", ".join(f"{k} ({n})" for k, n in sorted(d.critical_failures.items()))
                      or "—", f"{d.since:%Y-%m-%d %H:%M:%S}" if d.since else "—", verdict)
    out.print(table)
    if plan.stage != "cutover":
        out.print(f"[dim]the rule acts only in cutover (the Plan is at {plan.stage})[/]")


@rule_app.command("show")
def rule_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The rollback rule and the live compare's sample rate, as the Plan holds them, and
    each read path's drift over the rule's window (failed share of its latest judged
    parity results since its slice or the stage last changed).
    """
    from memshift.migrate.plan import load_plan
    from memshift.migrate.rule import slice_drift

    with _plan_conn(ctx) as conn:
        _show_rules(load_plan(conn), as_json, slice_drift(conn))


@rule_app.command("set", epilog='Example: memshift rule set --drift-rate 1 --window 1000 '
                                '--reason "noisier traffic"')
def rule_set(
    ctx: typer.Context,
    reason: Reason,
    drift_rate: Annotated[
        float | None,
        typer.Option("--drift-rate", min=0, max=100, show_default=False,
                     help="Roll back above this % of failed results [default 0.5]."),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option("--window", min=1, show_default=False,
                     help="Over this many latest judged results per slice [default 500]."),
    ] = None,
    critical: Annotated[
        str | None,
        typer.Option("--critical", show_default=False,
                     help="Checks any failure of which rolls back, comma-separated ('' for none) "
                          "[default: the two named above]."),
    ] = None,
    sample_rate: Annotated[
        float | None,
        typer.Option("--shadow-sample-rate", min=0, max=1, show_default=False,
                     help="Share of shadow and cutover reads compared live [default 0.01]."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change the rollback rule and/or the live compare's sample rate (audited).

    Fields not given keep their values; give at least one. The critical checks by
    default: latest_checkpoint_matches and tool_retry_state_matches.
    """
    from memshift.migrate.rule import set_rule

    if drift_rate is None and window is None and critical is None and sample_rate is None:
        raise ConfigError("nothing to change: give at least one of --drift-rate, --window, "
                          "--critical or --shadow-sample-rate (`memshift rule show` shows "
                          "the values now)")
    names = (None if critical is None
             else tuple(n.strip() for n in critical.split(",") if n.strip()))
    with _plan_conn(ctx) as conn:
        plan = set_rule(conn, reason, drift_rate=drift_rate, window=window, critical=names,
                        shadow_sample_rate=sample_rate)
    _show_rules(plan, as_json)


@app.command("watch", epilog="Example: memshift watch --interval 5 --metrics-port 9108")
def watch_cmd(
    ctx: typer.Context,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between checks.")
    ] = 5.0,
    once: Annotated[bool, typer.Option("--once", help="Check once, then exit.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line per check (for scripts).")
    ] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """Enforce the rollback rule: move each cutover slice whose parity drifts back to
    Redis (audited as `memshift watch`). It never advances a slice again: a person does.
    """
    from datetime import UTC, datetime

    from memshift.migrate.rule import Firing, watch

    def report(firings: list[Firing]) -> None:
        at = datetime.now(UTC).isoformat(timespec="seconds")
        if as_json:
            emit_json({"at": at, "fired": [f.as_json() for f in firings]})
            return
        for firing in firings:
            out.print(f"{at} [red]rolled back[/] {escape(firing.read_path)}: "
                      f"{escape(firing.why())}")
        if once and not firings:
            out.print(f"{at} the rollback rule holds: nothing to move back")

    settings = settings_of(ctx)
    serve_metrics(settings, metrics_port)
    watch(settings, interval=interval, once=once, on_pass=report)


@app.command("repair", epilog="Example: memshift repair --from-parity")
def repair_cmd(
    ctx: typer.Context,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Repair at most this many sessions.")
    ] = None,
    spool: Annotated[
        Path | None,
        typer.Option("--spool", help="Spool file to move into the queue first "
                                     "[default: DATA_DIR/repair.spool].", show_default=False),
    ] = None,
    from_parity: Annotated[
        bool,
        typer.Option("--from-parity", help="First queue every session whose latest parity "
                     "result is a failure, to be copied whole from the Plan's primary."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Drain the repair queue: copy each session with failed secondary writes whole
    from the other store into the one that missed them.

    Moves the local spool (writes that failed while PostgreSQL was down) into the
    queue first; with --from-parity, also the sessions that `memshift parity` last
    judged `fail` (refused in retired). Safe to run twice, or from several machines
    at once. Exit 1 when some sessions could not be repaired (they stay queued, with
    the error).
    """
    from memshift.migrate.repair import repair

    summary = repair(settings_of(ctx), limit=limit, spool_path=spool, from_parity=from_parity)
    if as_json:
        emit_json(summary.as_json())
    else:
        if summary.from_parity is not None:
            queued = summary.from_parity
            out.print(f"queued {queued.queued:,} session(s) whose latest parity result is a "
                      f"failure, to copy from {queued.source} into {queued.target} "
                      f"({queued.already_queued:,} were queued already)")
        out.print(
            f"repaired {summary.sessions_repaired:,} session(s) ({summary.entries_done:,} "
            f"queued write(s), {summary.vanished:,} gone from their source), "
            f"{summary.moved_from_spool:,} moved from the spool, {len(summary.failed):,} "
            f"failed; {summary.remaining:,} left in the queue"
        )
        for failure in summary.failed:
            out.print(f"[red]failed[/] {escape(failure.session_id)} → {failure.target}: "
                      f"{escape(failure.error)}")
    if summary.failed:
        raise typer.Exit(1)


@app.command("parity", epilog="Example: memshift parity --sample 500, or memshift parity "
                              "--session SESSION_ID --show-values")
def parity_cmd(
    ctx: typer.Context,
    session: Annotated[
        list[str] | None,
        typer.Option("--session", help="Check this session (repeat for several).",
                     show_default=False),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=1, help="Check a random sample of this many sessions.",
                     show_default=False),
    ] = None,
    check_all: Annotated[
        bool, typer.Option("--all", help="Check every session of both stores.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Sessions per batch.")
    ] = 200,
    show_values: Annotated[
        bool,
        typer.Option("--show-values", help="Show differing values in full (by default: "
                                           "length and hash, so transcripts do not leak)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON report per line (for scripts).")
    ] = False,
) -> None:
    """Compare sessions in Redis and PostgreSQL and record the results.

    One report per session: the checks listed in docs/parity.md, PostgreSQL's
    invariants, and status pass, fail, pending (written during the check: check again
    later) or error (a store could not read it). Exit 1 when any session fails or errors.
    """
    from memshift.migrate.parity import ParityOptions, ParityTotals, parity

    chosen = sum((bool(session), sample is not None, check_all))
    if chosen != 1:
        raise ConfigError("choose what to check: --session ID (repeatable), --sample N or --all")
    totals = ParityTotals()
    shown: list[Any] = []
    limit = 200
    reports = parity(settings_of(ctx), session_ids=session or None, sample=sample,
                     options=ParityOptions(batch_size=batch_size))
    missing: list[str] = []
    for report in reports:
        if session and report.in_neither:
            missing.append(report.session_id)  # a named id that exists nowhere
            continue
        totals.add(report)
        if as_json:
            emit_json(report.as_json(show_values=show_values))
        elif (session or report.parity_status != "pass") and len(shown) < limit:
            shown.append(report)
    if not as_json and (shown or totals.checked or not missing):
        _show_parity(shown, totals, show_values, limit)
    settings = settings_of(ctx)
    for sid in missing:
        err.print(f"[red]session {escape(repr(sid))}: neither Redis (prefix "
                  f"{escape(settings.prefix)!r}, layout {escape(settings.layout)!r}) nor "
                  "PostgreSQL holds it[/]; check the id, --prefix and --layout")
    if totals.counts["fail"] or totals.counts["error"]:
        raise typer.Exit(1)
    if missing:
        raise typer.Exit(SessionNotFound.exit_code)


def _show_parity(reports: list[Any], totals: Any, show_values: bool, limit: int) -> None:
    colours = {"pass": "green", "fail": "red", "pending": "yellow", "error": "red"}
    if reports:
        table = Table("session", "status", "failed checks", "diffs", "checked at",
                      title="parity")
        for report in reports:
            data = report.as_json(show_values=show_values)
            diffs = "\n".join(
                f"{d['check']} {d['field']}: redis={json.dumps(d['redis'], ensure_ascii=False)}"
                f" postgres={json.dumps(d['postgres'], ensure_ascii=False)}"
                for d in data["diffs"]
            )
            colour = colours[report.parity_status]
            table.add_row(escape(report.session_id), f"[{colour}]{report.parity_status}[/]",
                          ", ".join(report.failed_checks) or "—", escape(diffs) or "—",
                          data["checked_at"])
        out.print(table)
    not_pass = totals.checked - totals.counts["pass"]
    if not_pass > len(reports) and not_pass > limit:
        out.print(f"[dim]showing the first {limit} sessions that did not pass; "
                  "--json prints every report[/]")
    counts = totals.counts
    out.print(f"{totals.checked:,} session(s) checked: {counts['pass']:,} pass, "
              f"{counts['fail']:,} fail, {counts['pending']:,} pending, "
              f"{counts['error']:,} error; drift rate {totals.drift_rate:.2%}")
    if counts["pending"]:
        out.print("[yellow]pending sessions were written during the check: run it again[/]")


@app.command("rehearse", epilog="Example: memshift rehearse --sample 50, or memshift rehearse "
                                "--drill kill-backfill")
def rehearse_cmd(
    ctx: typer.Context,
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=1, help="Rehearse a random sample of this many sessions.",
                     show_default=False),
    ] = None,
    session: Annotated[
        list[str] | None,
        typer.Option("--session", help="Rehearse this session (repeat for several).",
                     show_default=False),
    ] = None,
    show_values: Annotated[
        bool,
        typer.Option("--show-values", help="Show differing values in full (by default: "
                                           "length and hash, so transcripts do not leak)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON verdict per line, then the total.")
    ] = False,
    drill: Annotated[
        str | None,
        typer.Option("--drill", help="Run an interruption drill instead: kill-backfill or "
                                     "pg-outage.", show_default=False),
    ] = None,
    sessions: Annotated[
        int | None,
        typer.Option("--sessions", min=1, show_default=False,
                     help="Drill: sessions to generate [default 300 for kill-backfill, 40 "
                          "for pg-outage]."),
    ] = None,
    kills: Annotated[
        int, typer.Option("--kills", min=0, help="kill-backfill: times to SIGKILL the backfill.")
    ] = 3,
    outage: Annotated[
        float, typer.Option("--outage", min=0.1,
                            help="pg-outage: seconds PostgreSQL is unreachable.")
    ] = 6.0,
    faults: Annotated[
        str, typer.Option("--faults", help="pg-outage: the faults, in turn, each for an equal "
                                           "share of --outage (hang, refuse, cut).")
    ] = "hang,refuse,cut",
    stage: Annotated[
        str, typer.Option("--stage", help="pg-outage: the stage the traffic runs in "
                                          "(dual_write, or cutover with `resume` cut over).")
    ] = "dual_write",
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="pg-outage: routers writing at once.")
    ] = 4,
) -> None:
    """Resume sample sessions from PostgreSQL and from Redis side by side.

    Compares what a resuming agent reads: the transcript in order, the latest
    checkpoint, the tool runs still to retry (with their attempts) and the latest
    summary. A verdict per session (same, differs, error) and overall; exit 1 on any
    difference or error.

    --drill kill-backfill generates --sessions sessions under a key prefix of its own,
    SIGKILLs `memshift backfill` --kills times, runs it to completion, then checks the
    stores, parity and the Plan; exit 1 if any figure is off. Its synthetic sessions
    are deleted from both stores afterwards (its backfill run row stays as the record).

    --drill pg-outage runs synthetic agent traffic through routers in --stage (in a
    scratch database of its own), makes PostgreSQL unreachable for --outage seconds
    (--faults), heals it, drains `memshift repair`, then checks the stores session by
    session, parity and the Plan; exit 1 if any figure is off. The scratch database
    and the drill's Redis keys are removed afterwards.
    """
    from memshift.migrate.rehearse import DRILLS, drill_kill_backfill, drill_pg_outage, rehearse

    if drill is not None:
        if drill not in DRILLS:
            raise ConfigError(f"unknown drill {drill!r}; known: {', '.join(DRILLS)}")
        if sample is not None or session:
            raise ConfigError("--drill runs on sessions of its own: drop --sample/--session")
        if drill == "kill-backfill":
            report = drill_kill_backfill(settings_of(ctx), sessions=sessions or 300,
                                         kills=kills)
            left = "its backfill run row is the record"
        else:
            report = drill_pg_outage(
                settings_of(ctx), sessions=sessions or 40, outage=outage, stage=stage,
                faults=[f.strip() for f in faults.split(",") if f.strip()], workers=workers)
            left = "so was its scratch database"
        _show_drill(report, left, as_json)
        if not report.ok:
            raise typer.Exit(1)
        return
    if (sample is None) == (not session):
        raise ConfigError("choose what to rehearse: --sample N or --session ID (repeatable)")
    counts = {"same": 0, "differs": 0, "error": 0}
    table = Table("session", "verdict", "resumes (from Redis)", "diffs", title="rehearse")
    for result in rehearse(settings_of(ctx), sample=sample, session_ids=session or None):
        counts[result.verdict] += 1
        data = result.as_json(show_values=show_values)
        if as_json:
            emit_json(data)
            continue
        colour = "green" if result.verdict == "same" else "red"
        diffs = "\n".join(
            f"{d['check']} {d['field']}: redis={json.dumps(d['redis'], ensure_ascii=False)}"
            f" postgres={json.dumps(d['postgres'], ensure_ascii=False)}"
            for d in data["diffs"]
        )
        resumes = json.dumps(data["resumes"], ensure_ascii=False) if data["resumes"] else "—"
        table.add_row(escape(result.session_id), f"[{colour}]{result.verdict}[/]",
                      escape(resumes), escape(diffs) or "—")
    overall = "same" if counts["differs"] == counts["error"] == 0 else "differs"
    if as_json:
        emit_json({"overall": overall, **counts})
    else:
        out.print(table)
        out.print(f"{sum(counts.values()):,} session(s) rehearsed: {counts['same']:,} same, "
                  f"{counts['differs']:,} differ, {counts['error']:,} error; overall {overall}")
    if overall != "same":
        raise typer.Exit(1)


@app.command("inspect", epilog="Example: memshift inspect sess_0_000042 --tail 20")
def inspect_cmd(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION", help="The session id.")],
    tail: Annotated[
        int, typer.Option("--tail", min=0, help="Latest transcript messages to show.")
    ] = 10,
    show_values: Annotated[
        bool,
        typer.Option("--show-values", help="Show message content, summary text, checkpoint "
                                           "state and tool errors (by default: length and "
                                           "hash, so transcripts do not leak)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (for scripts).")
    ] = False,
) -> None:
    """One session in Redis and PostgreSQL side by side: status, transcript tail, tool
    runs with attempts, summary, latest checkpoint; the diffs now, its recorded parity
    results, the store each read path serves it from under the current Plan, and its
    repair queue and quarantine entries.

    Read-only. Exit 4 when neither store holds the session and nothing names it.
    """
    from memshift.inspect import inspect_session, renderables

    found = inspect_session(settings_of(ctx), session_id)
    if as_json:
        emit_json(found.as_json(show_values=show_values, tail=tail))
        return
    for part in renderables(found, show_values=show_values, tail=tail):
        out.print(part)


@app.command("dashboard", epilog="Example: MEMSHIFT_DASHBOARD_TOKEN=... memshift dashboard "
                                 "--port 8765")
def dashboard_cmd(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8765,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote",
                     help="Allow a --host that is not loopback (others on the network can "
                          "then reach the page; it is plain HTTP)."),
    ] = False,
) -> None:
    """Serve the web dashboard: the Plan and its gates, parity trend and failing sessions,
    backfill, repair queue, quarantine, audit log, a page per session, and /metrics.

    Every page needs the token: $MEMSHIFT_DASHBOARD_TOKEN, or one generated now and
    printed once. Plan changes (rollback, stage) ask for confirmation.
    """
    import os
    import secrets

    from memshift.web import TOKEN_ENV, check_listen, check_token, serve_dashboard

    settings = settings_of(ctx)
    need_postgres(settings)
    remote = check_listen(host, allow_remote=allow_remote)
    token = check_token(os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24))
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    out.print(f"memshift dashboard on [bold]{url}[/] (Ctrl-C stops it)", highlight=False)
    if os.environ.get(TOKEN_ENV):
        out.print(f"token: the one in ${TOKEN_ENV}")
    else:
        out.print(f"token (shown once; set ${TOKEN_ENV} to choose one): [bold]{token}[/]",
                  highlight=False)
    if remote:
        err.print(f"[yellow]warning:[/] anyone who reaches {escape(host)}:{port} "
                  "and has the token can change the Plan; the page is plain HTTP, so put TLS "
                  "in front of it beyond a trusted network", highlight=False)
    serve_dashboard(settings, host, port, token, allow_remote=allow_remote)


def _show_drill(report: Any, left: str, as_json: bool) -> None:
    if as_json:
        emit_json(report.as_json())
        return
    table = Table("figure", "value", "expected", "ok", title=f"rehearse --drill {report.drill}")
    for figure in report.figures:
        mark = "[green]ok[/]" if figure.ok else "[red]OFF[/]"
        expected = "—" if figure.expected is None else str(figure.expected)
        table.add_row(escape(figure.name), escape(str(figure.value)), escape(expected), mark)
    out.print(table)
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}")
    out.print(f"drill {report.drill} on prefix {escape(report.prefix)}: verdict "
              f"{report.verdict}. Its {len(report.session_ids):,} synthetic session(s) were "
              f"deleted from both stores; {left}.")


@app.command("drill", epilog="Example: memshift drill --quick, or memshift drill outage-postgres")
def drill_cmd(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="NAME",
                       help="Drills to run [default: all]: crash-backfill, crash-repair, "
                            "crash-dual-write, outage-postgres, outage-redis, concurrency, "
                            "hostile-input, security.", show_default=False),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The short configuration (as in CI).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same random choices.")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per drill (for scripts).")
    ] = False,
) -> None:
    """Fault drills: crash, outage, concurrency, hostile input, security; a table of figures.

    Each drill runs in a scratch database of its own (created beside --postgres-dsn's,
    dropped afterwards: the role needs CREATEDB) and a key prefix of its own in Redis,
    so your migration's Plan, queue and sessions are not touched. Exit 1 when any
    drill fails. See docs/drills.md.
    """
    from memshift.drills.runner import run_drills
    from memshift.drills.table import json_line, print_result, print_summary

    results = []
    for result in run_drills(settings_of(ctx), names or (), quick=quick, seed=seed):
        results.append(result)
        if as_json:
            sys.stdout.write(json_line(result) + "\n")
            sys.stdout.flush()
        else:
            print_result(out, result)
    if not as_json:
        print_summary(out, results)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def main() -> None:
    """Entry point: usage errors are typer's; memshift errors become a message and code."""
    try:
        app()
    except MemshiftError as exc:
        err.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
