"""Security drill: no password shown, the dashboard locked, SQL parameterised, ids contained."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from memshift.drills.security import hostile_ids, leaked, string_built_sql
from memshift.errors import ValidationError
from memshift.model import Message, Session, ToolRun
from memshift.redact import redact
from memshift.stores.redis import RedisStore
from tests.faults.test_drill_runner import run_quick

pytestmark = pytest.mark.faults


def test_the_security_drill_finds_no_leak_no_string_sql_and_no_crossed_session(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("security", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("SQL calls checked in the source") > 50
    assert result.figure("SQL built from strings at run time") == []
    assert result.figure("CLI runs with a password in the DSN and the URL") >= 25
    assert result.figure("outputs showing *** where a password was") >= 1
    assert result.figure("outputs showing a password") == []
    assert result.figure("files left showing a password") == []
    assert result.figure("router log records showing a password") == 0
    for path in ("RedisStore (reference)", "RedisStore (reference-hashtag)",
                 "MigratingStore (dual_write)", "MigratingStore (pg_primary)",
                 "MigratingStore (retired)"):
        assert result.figure(f"{path}: reads of another session's data") == 0
        assert result.figure(f"{path}: writes into another session") == 0
        assert result.figure(f"{path}: crashes") == []
    dashboard = result.figure("dashboard without a token")
    if isinstance(dashboard, dict):
        assert set(dashboard.values()) == {401}
        assert result.figure("dashboard with the token") == 200
    else:
        assert dashboard.startswith("skipped: ")
    assert result.ok, result.failed()


def test_the_leak_check_sees_a_password_and_not_its_redaction() -> None:
    dsn = "postgresql://app:s3cretDrill@localhost:5432/app"
    assert leaked(f"error: cannot connect to {dsn}", ["s3cretDrill"])
    assert not leaked(f"error: cannot connect to {redact(dsn)}", ["s3cretDrill"])


def test_the_sql_check_finds_sql_built_from_strings(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "bad.py").write_text(
        "def f(conn, table, sid):\n"
        "    conn.execute(f\"SELECT * FROM {table} WHERE id = '{sid}'\")\n"
        "    conn.execute('DELETE FROM t WHERE id = %s' % sid)\n"
        "    q = f'UPDATE {table} SET x = 1'\n"
        "    conn.execute('SELECT 1 WHERE %(a)s', {'a': sid})\n")

    checked, found = string_built_sql(package)

    assert checked == 3
    assert sorted(found) == ["pkg/bad.py:2: an f-string holding SQL",
                             "pkg/bad.py:2: execute() of a string built at run time",
                             "pkg/bad.py:3: execute() of a string built at run time",
                             "pkg/bad.py:4: an f-string holding SQL"]


@pytest.mark.parametrize("child", ["messages", "tools", "summary", "checkpoint", "events"])
def test_an_id_naming_another_sessions_key_is_refused_and_reads_nothing_of_it(
    child: str, redis_url: str, redis_prefix: str
) -> None:
    """Regression: ``victim:tools`` read the victim's tool runs (as its own hash) and
    wrote into the victim's keys, breaking its reads (WRONGTYPE)."""
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        store.save_session(Session(session_id="victim", tenant_id="t"))
        store.append_message("victim", Message(message_id="m0", role="user", content="hi"))
        store.upsert_tool_run("victim", ToolRun(tool_call_id="c1", name="t", attempts=2))
        before = store.load_session("victim")

        with pytest.raises(ValidationError, match=f"ends with ':{child}'"):
            store.save_session({"session_id": f"victim:{child}", "tenant_id": "evil"})
        with pytest.raises(ValidationError, match="session 'victim'"):
            store.load_session(f"victim:{child}")
        (read,) = store.read_sessions([f"victim:{child}"])
        after = store.load_session("victim")

    assert read.state is None and read.error is not None and "refused" in read.error
    assert after == before
    client = redis.Redis.from_url(redis_url)
    types = {k.decode(): client.type(k).decode()
             for k in client.scan_iter(match=f"{redis_prefix}:session:victim*")}
    client.close()
    assert types == {f"{redis_prefix}:session:victim": "hash",
                     f"{redis_prefix}:session:victim:messages": "list",
                     f"{redis_prefix}:session:victim:tools": "hash"}


def test_hostile_ids_cover_globs_separators_newlines_and_prefixes() -> None:
    ids = hostile_ids("victim")
    assert {"victim*", "victim?", "victim[", "victim:", "victim{", "victim\n", "victim:x",
            "victim:messages", "vic*"} <= set(ids)
    assert len(ids) == len(set(ids)) >= 30

