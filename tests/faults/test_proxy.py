"""FaultProxy in front of the real PostgreSQL and Redis: each fault is what a client sees."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memshift.faults.proxy import FaultProxy

pytestmark = pytest.mark.faults


def _pg_target(dsn: str) -> tuple[str, int]:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "")
    if not host or host.startswith("/") or "," in host:
        pytest.skip(f"PostgreSQL is not reached over one TCP host here ({dsn!r}); no proxy")
    return host, int(str(params.get("port") or 5432))


def _redis_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        pytest.skip(f"Redis is not reached over TCP here ({url!r}); no proxy")
    return parts.hostname, parts.port or 6379


@pytest.fixture
def pg_proxy(pg_admin_dsn: str) -> Iterator[FaultProxy]:
    with FaultProxy(*_pg_target(pg_admin_dsn)) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(*_redis_target(redis_url)) as proxy:
        yield proxy


def _connect(proxy: FaultProxy, dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn_for(dsn), connect_timeout=3, autocommit=True)


def _redis(proxy: FaultProxy, url: str) -> redis.Redis:
    return redis.Redis.from_url(
        proxy.redis_url_for(url),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )


def test_psycopg_queries_postgres_through_the_proxy(
    pg_proxy: FaultProxy, pg_admin_dsn: str
) -> None:
    with _connect(pg_proxy, pg_admin_dsn) as conn:
        row = conn.execute("SELECT 40 + 2").fetchone()

    assert row == (42,)
    stats = pg_proxy.stats
    assert stats.accepted >= 1
    assert stats.bytes_to_server > 0 and stats.bytes_to_client > 0


def test_redis_pings_through_the_proxy(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = _redis(redis_proxy, redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()
    assert redis_proxy.stats.accepted == 1


def test_refuse_fails_new_connections_fast_and_spares_open_ones(
    pg_proxy: FaultProxy, pg_admin_dsn: str
) -> None:
    with _connect(pg_proxy, pg_admin_dsn) as open_conn:
        pg_proxy.refuse()

        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            _connect(pg_proxy, pg_admin_dsn)
        elapsed = time.monotonic() - started

        assert elapsed < 1.0
        assert pg_proxy.stats.refused >= 1
        assert open_conn.execute("SELECT 1").fetchone() == (1,)


def test_cut_fails_an_in_flight_query_at_once(pg_proxy: FaultProxy, pg_admin_dsn: str) -> None:
    with _connect(pg_proxy, pg_admin_dsn) as conn:
        timer = threading.Timer(0.3, pg_proxy.cut)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT pg_sleep(2)")
        finally:
            timer.join()
        elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert pg_proxy.stats.cut == 1
    with _connect(pg_proxy, pg_admin_dsn) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_hang_makes_redis_calls_time_out_until_healed(
    redis_proxy: FaultProxy, redis_url: str
) -> None:
    client = _redis(redis_proxy, redis_url)
    try:
        assert client.ping() is True
        redis_proxy.hang()

        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        elapsed = time.monotonic() - started
        newcomer = _redis(redis_proxy, redis_url)
        with pytest.raises(redis.TimeoutError):
            newcomer.ping()
        newcomer.close()

        redis_proxy.heal()
        assert client.ping() is True
    finally:
        client.close()
    assert 0.4 < elapsed < 1.5


def test_heal_after_refuse_restores_service(pg_proxy: FaultProxy, pg_admin_dsn: str) -> None:
    pg_proxy.refuse()
    with pytest.raises(psycopg.OperationalError):
        _connect(pg_proxy, pg_admin_dsn)

    pg_proxy.heal()

    with _connect(pg_proxy, pg_admin_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cut_after_breaks_a_large_reply_mid_way(pg_proxy: FaultProxy, pg_admin_dsn: str) -> None:
    pg_proxy.cut_after(100_000)
    with _connect(pg_proxy, pg_admin_dsn) as conn:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT repeat('x', 1000000)").fetchone()

    assert pg_proxy.stats.cut == 1
    assert pg_proxy.stats.bytes_to_client <= 100_000
    pg_proxy.heal()
    with _connect(pg_proxy, pg_admin_dsn) as conn:
        row = conn.execute("SELECT length(repeat('x', 1000000))").fetchone()
    assert row == (1_000_000,)


def test_close_stops_the_thread_and_the_listener(pg_admin_dsn: str) -> None:
    with FaultProxy(*_pg_target(pg_admin_dsn)) as proxy:
        conn = _connect(proxy, pg_admin_dsn)
        port = proxy.port

    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("FaultProxy")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_dsn_and_url_are_pointed_at_the_proxy() -> None:
    with FaultProxy("127.0.0.1", 5432) as proxy:
        dsn = proxy.dsn_for("postgresql://u:pw@localhost:5432/db?connect_timeout=5")
        url = proxy.redis_url_for("redis://:secret@localhost:6379/3")

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    assert (params["host"], params["port"]) == ("127.0.0.1", str(proxy.port))
    assert (params["user"], params["dbname"], params["connect_timeout"]) == ("u", "db", "5")
    assert url == f"redis://:secret@127.0.0.1:{proxy.port}/3"


def test_only_loopback_targets_are_accepted() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("192.0.2.1", 5432)
