"""The dashboard served for real (uvicorn on a free loopback port, in a thread) over a
seeded migration, and the browser that drives it."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from memshift.web import create_app
from tests.web.seed import Seeded, seed_cutover

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `playwright install` cannot download here
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@dataclass(frozen=True)
class Dashboard:
    url: str  # http://127.0.0.1:PORT
    token: str
    seeded: Seeded


@pytest.fixture
def seeded(pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> Seeded:
    return seed_cutover(pg_dsn, redis_url, redis_prefix, tmp_path / "repair.spool")


@pytest.fixture
def dashboard(seeded: Seeded) -> Iterator[Dashboard]:
    token = secrets.token_urlsafe(24)
    config = uvicorn.Config(create_app(seeded.settings, token), host="127.0.0.1", port=0,
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the dashboard stopped while starting"
        assert time.monotonic() < deadline, "the dashboard did not start in 20 s"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Dashboard(f"http://127.0.0.1:{port}", token, seeded)
    server.should_exit = True
    thread.join(timeout=10)
