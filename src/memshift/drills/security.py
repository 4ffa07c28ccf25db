"""Security drill: secrets stay secret, SQL stays parameterised, ids stay in their lane.

1. **No password in any output or log.** Every ``memshift`` command runs as a child
   process with a PostgreSQL DSN and a Redis URL that carry a password made up for
   the drill (PostgreSQL under trust authentication ignores it; Redis is a private
   server started with that password), plus the error paths (an unreachable server,
   a DSN given by flag in key=value form); its stdout, stderr and the files it left
   are searched for the password. The router's own log records are searched too,
   after writes to an unreachable PostgreSQL named by a DSN with the password.
2. **The dashboard without a token answers 401** (with it, 200).
3. **SQL is parameterised everywhere**: the package's source is parsed and every
   ``execute``/``executemany``/``copy``/``sql.SQL`` given a string built at run time
   (an f-string, ``%`` or ``+`` on text, ``.format``), and every f-string that holds
   a SQL statement, is reported with its file and line.
4. **A hostile session id cannot read or write another session's keys**, through
   RedisStore (both reference layouts) and MigratingStore (dual_write, pg_primary,
   retired): ids made of a victim's id and ``* ? [ ] : { }``, newlines, the layout's
   child names, or the victim's id as a prefix.
"""

from __future__ import annotations

import ast
import contextlib
import re
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import redis as redis_client
import typer.main

from memshift.drills.children import child_env, memshift_command
from memshift.drills.context import DrillContext, DrillSkipped, Figures
from memshift.drills.logs import captured_logs
from memshift.drills.private_redis import PrivateRedis
from memshift.drills.writer import plan_at
from memshift.errors import MemshiftError
from memshift.migrate.plan import Stage, StaticPlan
from memshift.model import Checkpoint, MemorySummary, Message, Session, SessionState, ToolRun
from memshift.stores.layouts import get_layout
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

FAMILY = "security"
PACKAGE = Path(__file__).resolve().parent.parent  # src/memshift
DEAD_PORT = 1  # nothing listens on port 1 of the loopback: connections are refused


# -- 1. secrets in output ----------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One run of the CLI: its arguments, and how it ends."""

    args: tuple[str, ...]
    # A server or a follower: started, given this long, then stopped with SIGTERM.
    run_for: float | None = None
    env: tuple[tuple[str, str], ...] = ()


def invocations(
    ctx: DrillContext, secret_dsn: str, secret_url: str, *, may_configure_redis: bool
) -> tuple[list[Invocation], list[Invocation], list[Invocation]]:
    """The commands to run, with small sizes: in this order, then in any order, then
    the demo (which wants the Plan at its start).

    The quick configuration runs every command once, in the form most likely to
    show a DSN (the human one, mostly), and every error path; the full one adds the
    other forms.
    """
    spool = str(ctx.workdir / "repair.spool")
    dead_dsn = psycopg.conninfo.make_conninfo(secret_dsn, host="127.0.0.1", port=str(DEAD_PORT))
    dead_url = re.sub(r"@[^/]+/", f"@127.0.0.1:{DEAD_PORT}/", secret_url)
    bad_port = f"postgresql://drill:{_password(secret_dsn)}@127.0.0.1:notaport/x"
    ordered = [
        ("db", "upgrade"), ("generate", "-n", "4", "--json"), ("backfill",),
        ("stage", "set", "dual_write", "--reason", "d"),
        ("stage", "set", "shadow", "--reason", "d", "--force"),
        ("stage", "set", "cutover", "--reason", "d", "--force"),
        ("slice", "set", "resume", "--percent", "50", "--reason", "d"),
        ("rollback", "--reason", "d"), ("stage", "set", "retired", "--reason", "illegal"),
        ("rule", "set", "--drift-rate", "1", "--reason", "d"),
    ]
    anyhow = [
        ("config",), ("db", "status"), ("backfill", "--status"), ("quarantine", "list"),
        ("quarantine", "show", "999999"), ("quarantine", "retry"), ("stage", "show"),
        ("plan", "history"), ("repair", "--spool", spool), ("parity", "--all"),
        ("rule", "show"), ("watch", "--once"), ("rehearse", "--sample", "2"),
        ("inspect", "sess_0_000000"), ("follow", "--status"),
        ("--postgres-dsn", dead_dsn, "db", "status"),
        ("--redis-url", dead_url, "generate", "-n", "1"),
        ("--postgres-dsn", bad_port, "config"),
    ]
    if not ctx.quick:
        ordered[:0] = [("db", "upgrade", "--json"), ("generate", "-n", "2")]
        anyhow += [
            ("config", "--json"), ("db", "status", "--json"), ("backfill", "--status", "--json"),
            ("quarantine", "list", "--json"), ("quarantine", "retry", "--json"),
            ("stage", "show", "--json"), ("plan", "history", "--json"), ("repair", "--json"),
            ("parity", "--sample", "2", "--json"), ("rule", "show", "--json"),
            ("watch", "--once", "--json"), ("rehearse", "--sample", "2", "--json"),
            ("rehearse", "--drill", "kill-backfill", "--sessions", "10", "--kills", "1"),
            ("inspect", "nobody", "--json"), ("follow", "--status", "--json"),
            ("--postgres-dsn", dead_dsn, "backfill", "--json"),
            ("--redis-url", dead_url, "parity", "--all"),
        ]
    runs = [Invocation(args) for args in anyhow]
    if may_configure_redis:  # only ever on the drill's private Redis
        runs.append(Invocation(("follow", "--configure-redis", "--sweep-seconds", "1",
                                "--report-seconds", "0.5"), run_for=3.0))
    last = [Invocation(("stage", "set", "redis_only", "--reason", "d", "--force")),
            Invocation(("demo", "-n", "4", "--step-seconds", "0"))]
    return [Invocation(args) for args in ordered], runs, last


def _password(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn).get("password") or "")


@dataclass
class Ran:
    invocation: Invocation
    returncode: int
    output: str  # stdout and stderr
    seconds: float = 0.0


def run_cli(ctx: DrillContext, invocation: Invocation, env: dict[str, str]) -> Ran:
    started = time.monotonic()
    ran = _run_cli(ctx, invocation, env)
    ran.seconds = time.monotonic() - started
    return ran


def _run_cli(ctx: DrillContext, invocation: Invocation, env: dict[str, str]) -> Ran:
    command = memshift_command(*invocation.args)
    full_env = env | dict(invocation.env)
    if invocation.run_for is None:
        try:
            done = subprocess.run(command, env=full_env, capture_output=True, text=True,
                                  timeout=min(ctx.left(), 120), check=False)
        except subprocess.TimeoutExpired as exc:
            return Ran(invocation, -1, _text(exc.stdout) + _text(exc.stderr))
        return Ran(invocation, done.returncode, done.stdout + done.stderr)
    child = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(invocation.run_for)
    child.send_signal(signal.SIGTERM)
    try:
        output, _ = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
    return Ran(invocation, child.returncode, output)


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def leaked(text: str, words: list[str]) -> bool:
    return any(word and word in text for word in words)


def cli_commands() -> set[str]:
    """Every command of ``memshift`` (``db upgrade`` for groups), from the app itself."""
    from memshift.cli import app

    found: set[str] = set()

    def walk(command: Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "list_commands"):
            for name in command.list_commands(None):
                walk(command.get_command(None, name), (*path, name))
        else:
            found.add(" ".join(path))

    walk(typer.main.get_command(app), ())
    return found


def _ran_commands(runs: list[Ran]) -> set[str]:
    names = cli_commands()
    covered = set()
    for ran in runs:
        words = [a for a in ran.invocation.args if not a.startswith("-")]
        for size in (2, 1):
            if " ".join(words[:size]) in names:
                covered.add(" ".join(words[:size]))
                break
    return covered


def secret_stores(ctx: DrillContext, server: PrivateRedis | None) -> tuple[str, str, list[str]]:
    """(DSN, Redis URL, the passwords in them): passwords made up unless already there."""
    secret = f"drillSecret{secrets.token_hex(8)}"
    params = psycopg.conninfo.conninfo_to_dict(ctx.postgres_dsn)
    words = []
    if params.get("password"):
        dsn = ctx.postgres_dsn
        words.append(str(params["password"]))
    else:
        dsn = psycopg.conninfo.make_conninfo(ctx.postgres_dsn, password=secret)
        try:
            with psycopg.connect(dsn, connect_timeout=5):
                pass
        except psycopg.OperationalError:
            raise DrillSkipped(
                "PostgreSQL refuses a made-up password and the DSN has none of its own: "
                "give a DSN with a password to check that it is never shown") from None
        words.append(secret)
    dsn_url = _as_url(dsn)
    if server is not None:
        url = server.url
        words.append(server.password or "")
    else:
        url = ctx.redis_url
    return dsn_url, url, words


def _as_url(dsn: str) -> str:
    """A DSN as a postgresql:// URL (the form most often pasted into settings)."""
    p = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    user = p.pop("user", "postgres")
    password = p.pop("password", "")
    host = p.pop("host", "127.0.0.1")
    port = p.pop("port", "5432")
    dbname = p.pop("dbname", "postgres")
    query = "&".join(f"{k}={v}" for k, v in p.items())
    return (f"postgresql://{user}:{password}@{host}:{port}/{dbname}"
            + (f"?{query}" if query else ""))


def check_outputs(ctx: DrillContext, figs: Figures, dsn: str, url: str, words: list[str],
                  *, may_configure_redis: bool) -> None:
    env = child_env(replace(ctx, settings=replace(ctx.settings, postgres_dsn=dsn,
                                                  redis_url=url)))
    ordered, anyhow, last = invocations(ctx, dsn, url, may_configure_redis=may_configure_redis)
    runs = [run_cli(ctx, each, env) for each in ordered]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs += list(pool.map(lambda each: run_cli(ctx, each, env), anyhow))
    runs += [run_cli(ctx, each, env) for each in last]
    missing = sorted(cli_commands() - _ran_commands(runs) - {"drill", "dashboard"})
    for name in missing:  # a command added since: at least its --help is read
        runs.append(run_cli(ctx, Invocation((*name.split(), "--help")), env))
    leaking = [" ".join(r.invocation.args)[:80] for r in runs if leaked(r.output, words)]
    files = [str(p) for p in ctx.workdir.rglob("*")
             if p.is_file() and p.stat().st_size < 50_000_000
             and leaked(p.read_text("utf-8", "replace"), words)]
    figs.info("CLI runs with a password in the DSN and the URL", len(runs))
    figs.info("commands run only with --help (added since this drill was written)", missing)
    figs.info("of them failing (non-zero exit, as some must)",
              sum(1 for r in runs if r.returncode != 0))
    # The commands were given the passwords: where they show the settings, *** stands in.
    figs.at_least("outputs showing *** where a password was",
                  sum(1 for r in runs if "***" in r.output), 1)
    figs.expect("outputs showing a password", leaking, [])
    figs.expect("files left showing a password", files, [])
    figs.expect("router log records showing a password", _router_logs_leak(ctx, dsn, words), 0)


def _router_logs_leak(ctx: DrillContext, dsn: str, words: list[str]) -> int:
    """Write through a router whose PostgreSQL (named with the password) is unreachable."""
    dead = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(DEAD_PORT))
    with captured_logs() as logs:
        router = MigratingStore(RedisStore(ctx.redis_url, prefix=ctx.prefix),
                                PostgresStore(dead, timeout=0.5),
                                StaticPlan(plan_at(Stage.DUAL_WRITE)),
                                spool_path=ctx.workdir / "router.spool")
        try:
            router.save_session(Session(session_id="sec-log", tenant_id="t"))
            router.append_message("sec-log", Message(message_id="m0", role="user",
                                                     content="x"))
            with contextlib.suppress(MemshiftError):
                PostgresStore(dead, timeout=0.5).load_session("sec-log")
        finally:
            router.close()
    text = logs.text
    return sum(1 for line in text.splitlines() if leaked(line, words)) + (
        0 if logs.lines else 1)  # no records at all would prove nothing


# -- 2. the dashboard ----------------------------------------------------------------------


def check_dashboard(ctx: DrillContext, figs: Figures, env: dict[str, str],
                    words: list[str]) -> None:
    if "dashboard" not in cli_commands():
        figs.info("dashboard without a token", "skipped: this memshift has no dashboard")
        return
    token = secrets.token_urlsafe(24)
    port = _free_port()
    child = subprocess.Popen(memshift_command("dashboard", "--port", str(port)),
                             env=env | {"MEMSHIFT_DASHBOARD_TOKEN": token},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        ctx.wait_for(lambda: child.poll() is not None or _status(base + "/login") != 0,
                     "waiting for the dashboard to listen", poll=0.1)
        paths = ("/", "/metrics", "/api/plan", "/sessions/x")
        anonymous = {p: _status(base + p) for p in paths}
        bad = {p: _status(base + p, "Bearer " + "x" * 32) for p in paths[:1]}
        good = _status(base + "/", "Bearer " + token)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            output, _ = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate()
    figs.expect("dashboard without a token", anonymous, dict.fromkeys(paths, 401))
    figs.expect("dashboard with a wrong token", bad, {"/": 401})
    figs.expect("dashboard with the token", good, 200)
    figs.expect("dashboard output showing its token or a password",
                leaked(output, [*words, token]), False)


def _status(url: str, authorization: str | None = None) -> int:
    """The HTTP status of a GET, 0 when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": authorization}
                                     if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- 3. parameterised SQL ----------------------------------------------------------------------

_SQL_STATEMENT = re.compile(
    r"\b(SELECT\b.+\bFROM|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX|"
    r"DATABASE|ROLE|SCHEMA)|DROP\s+(TABLE|INDEX|DATABASE|ROLE|SCHEMA)|ALTER\s+(TABLE|ROLE)|"
    r"TRUNCATE\s|GRANT\s|COPY\s+\S+\s+(FROM|TO))", re.DOTALL)
_EXECUTORS = {"execute", "executemany", "copy", "SQL", "query_one"}


def _built_at_run_time(node: ast.AST) -> bool:
    """A string made at run time from pieces: an f-string, ``%``, ``+`` or ``.format``."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return isinstance(node.left, ast.Constant | ast.JoinedStr | ast.BinOp)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
    return False


def _literal_text(node: ast.JoinedStr) -> str:
    """The f-string's text with ``{}`` for each value put in it."""
    return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                   for v in node.values)


def string_built_sql(root: Path = PACKAGE) -> tuple[int, list[str]]:
    """(calls checked, where SQL is built from strings at run time) under ``root``."""
    checked = 0
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                name = node.func.attr if isinstance(node.func, ast.Attribute) else (
                    node.func.id if isinstance(node.func, ast.Name) else "")
                if name in _EXECUTORS:
                    checked += 1
                    if _built_at_run_time(node.args[0]):
                        found.append(f"{where}:{node.lineno}: {name}() of a string built "
                                     "at run time")
            if isinstance(node, ast.JoinedStr) and _SQL_STATEMENT.search(_literal_text(node)):
                found.append(f"{where}:{node.lineno}: an f-string holding SQL")
    return checked, sorted(found, key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


def check_sql(figs: Figures) -> None:
    checked, found = string_built_sql()
    figs.info("SQL calls checked in the source", checked)
    figs.expect("SQL built from strings at run time", found, [])


# -- 4. hostile session ids ---------------------------------------------------------------------


def hostile_ids(victim: str) -> list[str]:
    """Ids that a careless key builder would let reach the victim's keys."""
    v = victim
    return list(dict.fromkeys([
        f"{v}*", f"{v}?", f"{v}[", f"{v}]", f"{v}[a-z]", f"{v}:", f"{v}{{", f"{v}}}",
        f"{{{v}}}", f"{v}\n", f"{v}\r\n", f"\n{v}", f"{v}:x", f"{v}:messages", f"{v}:tools",
        f"{v}:summary", f"{v}:checkpoint", f"{v}:events", f"{v}:cache", f"{v}:gen",
        f"{v}:writing", f"{v}}}:gen", f"{v}}}:messages", f"{v}:messages:x", f"{v} ",
        f"{v[:3]}*", "*", "?", "[a-z]*", "\\*", f"{v}\x00", f"{v}%s", f"{v}'--",
    ]))


def _write_all(store: Any, sid: str, marker: str) -> int:
    """Every write of the Store API for ``sid``; how many the store refused."""
    refused = 0
    writes: list[Callable[[], object]] = [
        # A mapping, not a Session: the store validates it (a Session refuses a bad id
        # before any store could).
        lambda: store.save_session({"session_id": sid, "tenant_id": marker}),
        lambda: store.append_message(sid, Message(message_id=f"{marker}-m0", role="user",
                                                  content=marker)),
        lambda: store.append_message(sid, Message(message_id=f"{marker}-m1", role="user",
                                                  content=marker)),
        lambda: store.upsert_tool_run(sid, ToolRun(tool_call_id=f"{marker}-t", name="tool",
                                                   args={"m": marker}, attempts=2)),
        lambda: store.put_summary(sid, MemorySummary(version=3, text=marker)),
        lambda: store.put_checkpoint(sid, Checkpoint(checkpoint_id=f"{marker}-c", step=4,
                                                     state={"m": marker})),
        lambda: store.set_status(sid, "paused"),
    ]
    for write in writes:
        try:
            write()
        except MemshiftError:
            refused += 1
    return refused


def _seen(store: Any, sid: str) -> SessionState | None:
    try:
        state: SessionState | None = store.load_session(sid)
    except MemshiftError:
        return None
    return state


@dataclass
class LaneCheck:
    """One store path: the hostile ids tried, refused, and lanes crossed."""

    path: str
    tried: int = 0
    refused_writes: int = 0
    cross_reads: int = 0
    cross_writes: int = 0
    crashes: list[str] = field(default_factory=list)


def _victim_keys(client: redis_client.Redis, prefix: str, layout_keys: list[str],
                 victim: str) -> dict[bytes, bytes | None]:
    names = [k.encode() for k in layout_keys] + [
        f"{prefix}:cache:{{{victim}}}{tail}".encode() for tail in ("", ":gen", ":writing")]
    return {name: client.dump(name) for name in names}


def check_lane(store: Any, path: str, victim: str, client: redis_client.Redis, prefix: str,
               layout_keys: list[str]) -> LaneCheck:
    check = LaneCheck(path, len(hostile_ids(victim)))
    victim_marker = f"VICTIM-{secrets.token_hex(4)}"
    _write_all(store, victim, victim_marker)
    before = _seen(store, victim)
    raw_before = _victim_keys(client, prefix, layout_keys, victim)
    for number, sid in enumerate(hostile_ids(victim)):
        marker = f"H{number}"
        try:
            check.refused_writes += _write_all(store, sid, marker)
            state = _seen(store, sid)
        except Exception as exc:  # anything but a MemshiftError is a crash
            check.crashes.append(f"{sid!r}: {type(exc).__name__}: {exc}"[:200])
            continue
        if state is not None and victim_marker in state.model_dump_json():
            check.cross_reads += 1
    after = _seen(store, victim)
    raw_after = _victim_keys(client, prefix, layout_keys, victim)
    changed = [k for k in raw_before if raw_before[k] != raw_after[k]
               and not k.endswith((b":gen", b":writing"))]
    if before is None or after != before or changed:
        check.cross_writes += 1
    return check


def check_hostile_ids(ctx: DrillContext, figs: Figures) -> None:
    client = redis_client.Redis.from_url(ctx.redis_url)
    checks = []
    try:
        for layout in ("reference", "reference-hashtag"):
            prefix = f"{ctx.prefix}:ids-{layout}"
            with RedisStore(ctx.redis_url, layout=layout, prefix=prefix) as store:
                keys = store.layout.session_keys("victim")
                checks.append(check_lane(store, f"RedisStore ({layout})", "victim", client,
                                         prefix, keys))
        for stage in (Stage.DUAL_WRITE, Stage.PG_PRIMARY, Stage.RETIRED):
            prefix = f"{ctx.prefix}:ids-{stage}"
            victim = f"victim-{stage}"
            router = MigratingStore(RedisStore(ctx.redis_url, prefix=prefix),
                                    PostgresStore(ctx.postgres_dsn, max_size=2),
                                    StaticPlan(plan_at(stage)),
                                    spool_path=ctx.workdir / f"ids-{stage}.spool")
            try:
                with captured_logs():
                    checks.append(check_lane(
                        router, f"MigratingStore ({stage})", victim, client, prefix,
                        get_layout("reference", prefix).session_keys(victim)))
            finally:
                router.close()
    finally:
        client.close()
    figs.info("hostile ids tried per store path", checks[0].tried)
    for check in checks:
        figs.info(f"{check.path}: writes refused", check.refused_writes)
        figs.expect(f"{check.path}: reads of another session's data", check.cross_reads, 0)
        figs.expect(f"{check.path}: writes into another session", check.cross_writes, 0)
        figs.expect(f"{check.path}: crashes", check.crashes, [])


# -- the drill ------------------------------------------------------------------------------------


def drill_security(ctx: DrillContext) -> Figures:
    """Passwords never shown, the dashboard locked, SQL parameterised, ids in their lane."""
    figs = Figures()
    check_sql(figs)
    check_hostile_ids(ctx, figs)
    with _private_redis(ctx) as server:
        dsn, url, words = secret_stores(ctx, server)
        check_outputs(ctx, figs, dsn, url, words, may_configure_redis=server is not None)
        env = child_env(replace(ctx, settings=replace(ctx.settings, postgres_dsn=dsn,
                                                      redis_url=url)))
        check_dashboard(ctx, figs, env, words)
    figs.info("passwords searched for", len([w for w in words if w]))
    return figs


@contextlib.contextmanager
def _private_redis(ctx: DrillContext) -> Iterator[PrivateRedis | None]:
    """A private Redis with a password, or None (then the Redis URL as given)."""
    try:
        server = PrivateRedis(ctx.workdir / "redis-secret",
                              password=f"redisSecret{secrets.token_hex(8)}").start()
    except DrillSkipped:
        yield None
        return
    try:
        yield server
    finally:
        server.kill()

