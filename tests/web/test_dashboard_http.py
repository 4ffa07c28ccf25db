"""The dashboard over plain HTTP: the token on every page, log-in cookies, cross-site
refusals, confirmations bound to the Plan version, loopback names, the CLI."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from memshift.inspect import inspect_session
from memshift.migrate.plan import load_plan, set_slice
from tests.web.conftest import Dashboard
from tests.web.seed import LEAKED

PAGES = ["/", "/parity", "/backfill", "/repair", "/quarantine", "/audit", "/session?id=x",
         "/api/overview", "/api/parity", "/api/parity/trend", "/api/session?id=x",
         "/actions/rollback", "/metrics"]


def plan_stage(dashboard: Dashboard) -> tuple[int, str]:
    assert dashboard.seeded.settings.postgres_dsn
    with psycopg.connect(dashboard.seeded.settings.postgres_dsn) as conn:
        plan = load_plan(conn)
    return plan.version, str(plan.stage)


@contextlib.contextmanager
def logged_in(dashboard: Dashboard) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        answer = client.post("/login", data={"token": dashboard.token, "next": "/"})
        assert answer.status_code == 303, answer.text
        yield client


def confirmation(client: httpx.Client) -> dict[str, str]:
    """The hidden fields of the rollback confirmation page, as a browser would post them."""
    page = client.get("/actions/rollback").text
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
    return fields | {"reason": "drift on the resume path"}


def test_every_page_api_and_metrics_answer_401_without_the_token(
    dashboard: Dashboard,
) -> None:
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        anonymous = {path: client.get(path).status_code for path in PAGES}
        wrong = {path: client.get(path, headers={"Authorization": "Bearer not-the-token-at-all"})
                 .status_code for path in PAGES}
        post = client.post("/actions/rollback", data={"reason": "x", "confirm": "yes"})

    assert set(anonymous.values()) == {401}, anonymous
    assert set(wrong.values()) == {401}, wrong
    assert post.status_code == 401
    assert plan_stage(dashboard)[1] == "cutover"


def test_the_token_opens_the_json_api_and_metrics(dashboard: Dashboard) -> None:
    auth = {"Authorization": f"Bearer {dashboard.token}"}
    with httpx.Client(base_url=dashboard.url, timeout=30, headers=auth) as client:
        overview = client.get("/api/overview")
        metrics = client.get("/metrics")
        failing = client.get("/api/parity").json()["failing"]

    assert overview.status_code == 200
    assert overview.json()["plan"]["stage"] == "cutover"
    assert overview.json()["plan"]["read_paths"][0]["percent"] == 50
    assert metrics.status_code == 200 and "memshift_plan_version" in metrics.text
    assert [r["session_id"] for r in failing] == [dashboard.seeded.failing]


def test_the_session_api_is_what_inspect_reports(dashboard: Dashboard) -> None:
    sid = dashboard.seeded.failing
    with httpx.Client(base_url=dashboard.url, timeout=30,
                      headers={"Authorization": f"Bearer {dashboard.token}"}) as client:
        shown = client.get("/api/session", params={"id": sid}).json()
        missing = client.get("/api/session", params={"id": "nobody"})

    expected = inspect_session(dashboard.seeded.settings, sid).as_json()
    assert shown["comparison"]["diffs"] == expected["comparison"]["diffs"]
    assert shown["stores"] == expected["stores"]
    assert shown["read_paths"] == expected["read_paths"]
    assert missing.status_code == 404 and "neither Redis" in missing.json()["error"]


def test_the_unreadable_records_text_shows_only_when_values_are_asked_for(
    dashboard: Dashboard,
) -> None:
    broken = f"id={dashboard.seeded.quarantined}"
    pages = ["/quarantine", "/api/quarantine", f"/session?{broken}", f"/api/session?{broken}"]
    with logged_in(dashboard) as client:
        hidden = {page: client.get(page) for page in pages}
        shown = {page: client.get(page + ("&" if "?" in page else "?") + "show_values=1")
                 for page in pages}

    for page in pages:
        assert hidden[page].status_code == 200 and shown[page].status_code == 200, page
        assert "is not valid JSON" in hidden[page].text, page
        assert LEAKED not in hidden[page].text, page
        assert LEAKED in shown[page].text, page


def test_logging_in_sets_an_httponly_samesite_strict_cookie(dashboard: Dashboard) -> None:
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        refused = client.post("/login", data={"token": "wrong-token-wrong-token"})
        accepted = client.post("/login", data={"token": dashboard.token, "next": "/parity"})
        page = client.get("/parity")

    assert refused.status_code == 401 and "not the right one" in refused.text
    assert accepted.status_code == 303 and accepted.headers["location"] == "/parity"
    cookie = accepted.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and dashboard.token not in cookie
    assert page.status_code == 200 and "Sessions failing now" in page.text


def test_a_cross_site_post_is_refused_and_changes_nothing(dashboard: Dashboard) -> None:
    before = plan_stage(dashboard)
    with logged_in(dashboard) as client:
        fields = confirmation(client)
        cross_site = client.post("/actions/rollback", data=fields, headers={
            "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
        same_site = client.post("/actions/rollback", data=fields, headers={
            "Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"})
        old_browser = client.post("/actions/rollback", data=fields,
                                  headers={"Origin": "http://evil.example"})
        no_csrf = client.post("/actions/rollback", data=fields | {"csrf": "guessed"},
                              headers={"Sec-Fetch-Site": "same-origin"})
        assert plan_stage(dashboard) == before
        honest = client.post("/actions/rollback", data=fields,
                             headers={"Sec-Fetch-Site": "same-origin", "Origin": dashboard.url})

    assert [r.status_code for r in (cross_site, same_site, old_browser, no_csrf)] == [403] * 4
    assert honest.status_code == 303
    assert plan_stage(dashboard) == (before[0] + 1, "shadow")


def test_a_confirmation_for_an_older_plan_changes_nothing(dashboard: Dashboard) -> None:
    with logged_in(dashboard) as client:
        fields = confirmation(client)
        assert dashboard.seeded.settings.postgres_dsn
        with psycopg.connect(dashboard.seeded.settings.postgres_dsn, autocommit=True) as conn:
            set_slice(conn, "resume", 60, "someone else, meanwhile")
        stale = client.post("/actions/rollback", data=fields)

    assert stale.status_code == 409 and "changed since you confirmed" in stale.text
    assert plan_stage(dashboard)[1] == "cutover"


def test_a_name_that_is_not_loopback_is_refused(dashboard: Dashboard) -> None:
    port = dashboard.url.rsplit(":", 1)[1]
    answer = httpx.get(f"{dashboard.url}/api/overview", timeout=30, headers={
        "Host": f"rebound.example:{port}", "Authorization": f"Bearer {dashboard.token}"})
    assert answer.status_code == 421


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_memshift_dashboard_prints_a_token_once_and_serves_with_it(pg_dsn: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    command = [sys.executable, "-m", "memshift", "--postgres-dsn", pg_dsn, "dashboard",
               "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env | {"COLUMNS": "200"}) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline(), process.stdout.readline()]
            token = lines[1].rsplit(" ", 1)[1].strip()
            deadline = time.monotonic() + 30
            while True:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/api/overview", timeout=5,
                                       headers={"Authorization": f"Bearer {token}"})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "memshift dashboard did not listen"
                    time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=10)

    assert f"http://127.0.0.1:{port}/" in lines[0] and "shown once" in lines[1]
    assert len(token) >= 16
    assert answer.status_code == 200 and answer.json()["plan"]["stage"] == "redis_only"


def test_a_host_beyond_loopback_needs_allow_remote(pg_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    done = subprocess.run(
        [sys.executable, "-m", "memshift", "--postgres-dsn", pg_dsn, "dashboard",
         "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60,
        check=False)
    assert done.returncode == 2 and "--allow-remote" in done.stderr
    assert "token" not in done.stdout


@pytest.mark.parametrize("token", ["short"])
def test_a_short_token_is_refused(pg_dsn: str, token: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    done = subprocess.run(
        [sys.executable, "-m", "memshift", "--postgres-dsn", pg_dsn, "dashboard"],
        capture_output=True, text=True, env=env | {"MEMSHIFT_DASHBOARD_TOKEN": token},
        timeout=60, check=False)
    assert done.returncode == 2 and "at least 16" in done.stderr


@pytest.mark.parametrize("command", ["dashboard", "inspect"])
def test_the_commands_explain_themselves(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "memshift", command, "--help"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=os.environ | {"COLUMNS": "120"})
    assert done.returncode == 0 and "Usage" in done.stdout
    assert ("--allow-remote" if command == "dashboard" else "--show-values") in done.stdout


def test_an_unreachable_postgres_is_a_503_that_hides_the_password(redis_url: str) -> None:
    from starlette.testclient import TestClient

    from memshift.config import Settings
    from memshift.web import create_app

    settings = Settings(postgres_dsn="postgresql://app:s3cr3t-pw@127.0.0.1:1/none",
                        redis_url=redis_url)
    token = "a-token-of-some-length"
    with TestClient(create_app(settings, token), base_url="http://127.0.0.1") as client:
        page = client.get("/", headers={"Authorization": f"Bearer {token}"})
        api = client.get("/api/overview", headers={"Authorization": f"Bearer {token}"})

    assert page.status_code == api.status_code == 503
    assert "cannot be reached" in api.json()["error"] and "127.0.0.1" in page.text
    assert "s3cr3t-pw" not in page.text + api.text
