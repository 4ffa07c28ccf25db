"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): log in
with the token, see the stage and the failing session, follow it to its page, roll
back with confirmation and see the stage change. Every page is saved as a screenshot
in tests/web/artifacts/, and no request may leave 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from memshift.migrate.plan import history, load_plan, set_slice
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, Dashboard

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package "
                "(apt-get install -y chromium; .ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_an_operator_finds_the_failing_session_and_rolls_back(
    dashboard: Dashboard, browser: object
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    dsn = dashboard.seeded.settings.postgres_dsn
    assert dsn is not None
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    requests: list[str] = []
    page_errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: page_errors.append(str(error)))

    def shot(name: str) -> None:
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    first = page.goto(dashboard.url + "/")
    assert first is not None and first.status == 401
    shot("01-login")
    page.fill("#token", dashboard.token)
    page.click("button[type=submit]")
    sync_api.expect(page.get_by_test_id("overview-stage")).to_have_text("cutover")
    shot("02-overview")
    with psycopg.connect(dsn, autocommit=True) as conn:  # another operator, meanwhile
        set_slice(conn, "resume", 60, "a little more", who="bob@ops")
    sync_api.expect(page.locator("#slices")).to_contain_text("60 %", timeout=15_000)

    page.click("nav >> text=Parity")
    failing = page.get_by_test_id("failing-row")
    sync_api.expect(failing).to_have_count(1)
    sync_api.expect(failing).to_contain_text(dashboard.seeded.failing)
    sync_api.expect(page.locator("#parity-chart canvas")).to_have_count(1)  # uPlot drew it
    shot("03-parity")

    failing.get_by_role("link", name=dashboard.seeded.failing).click()
    sync_api.expect(page.get_by_test_id("session-id")).to_have_text(dashboard.seeded.failing)
    sync_api.expect(page.get_by_test_id("diff-row")).to_contain_text("message_order_matches")
    sync_api.expect(page.get_by_test_id("differs")).to_have_count(1)
    shot("04-session")

    seen = {"Backfill": "completed", "Repair queue": dashboard.seeded.conflicted,
            "Quarantine": dashboard.seeded.quarantined, "Audit log": "bob@ops"}
    for name, expected in seen.items():
        page.click(f"nav >> text={name}")
        sync_api.expect(page.locator("nav a[aria-current=page]")).to_have_text(name)
        sync_api.expect(page.locator("main")).to_contain_text(expected)
        shot(f"05-{name.lower().replace(' ', '-')}")

    page.click("nav >> text=Overview")
    page.get_by_test_id("rollback-all").click()
    sync_api.expect(page.get_by_test_id("after-stage")).to_have_text("shadow")
    shot("06-confirm-rollback")
    page.fill("#reason", "checkpoint drift seen on the session page")
    page.get_by_test_id("confirm").click()
    sync_api.expect(page.get_by_test_id("overview-stage")).to_have_text("shadow")
    sync_api.expect(page.get_by_test_id("stage")).to_have_text("shadow")
    shot("07-after-rollback")

    with psycopg.connect(dsn) as conn:
        plan, (last, *_) = load_plan(conn), history(conn, 1)
    assert str(plan.stage) == "shadow" and plan.slices["resume"].percent == 0
    assert last.action == "rollback" and last.who.startswith("dashboard")
    assert last.why == "checkpoint drift seen on the session page"
    assert page_errors == []
    elsewhere = [url for url in requests
                 if urlsplit(url).scheme not in ("data", "blob")
                 and (urlsplit(url).hostname, urlsplit(url).port)
                 != (urlsplit(dashboard.url).hostname, urlsplit(dashboard.url).port)]
    assert requests and elsewhere == []
