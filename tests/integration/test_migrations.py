"""Schema migrations: applied once, in order, safely from several processes at once."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from memshift.errors import SchemaError
from memshift.sql.migrations import latest_version, migrations, status, upgrade
from memshift.stores.postgres import PostgresStore

EXPECTED = Path(__file__).with_name("expected_schema.txt")

# Every column, constraint and index of schema memshift, one per line, so a change in
# what the migrations build shows up as a readable diff.
DESCRIBE = """
SELECT format('column %s.%s %s%s%s', c.table_name, c.column_name, c.data_type,
              CASE WHEN c.is_nullable = 'NO' THEN ' not null' ELSE '' END,
              coalesce(' default ' || c.column_default, ''))
  FROM information_schema.columns c WHERE c.table_schema = 'memshift'
UNION ALL
SELECT format('constraint %s %s', conrelid::regclass, pg_get_constraintdef(oid))
  FROM pg_constraint WHERE connamespace = 'memshift'::regnamespace
UNION ALL
SELECT format('index %s', pg_get_indexdef(indexrelid))
  FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class
                                    WHERE relnamespace = 'memshift'::regnamespace)
UNION ALL
SELECT format('function %s', p.oid::regprocedure)
  FROM pg_proc p WHERE p.pronamespace = 'memshift'::regnamespace
ORDER BY 1
"""


def describe(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(DESCRIBE).fetchall()
    return "\n".join(r[0] for r in rows if "schema_version" not in r[0]) + "\n"


def test_migrations_build_exactly_the_schema_the_code_expects(empty_pg_dsn: str) -> None:
    upgrade(empty_pg_dsn)
    # To accept a deliberate schema change: python tools/schema_snapshot.py
    assert describe(empty_pg_dsn) == EXPECTED.read_text()


def test_upgrade_applies_every_migration_once(empty_pg_dsn: str) -> None:
    first = upgrade(empty_pg_dsn)
    second = upgrade(empty_pg_dsn)
    state = status(empty_pg_dsn)

    assert [m.version for m in first] == [m.version for m in migrations()]
    assert second == []
    assert state.up_to_date and state.current == latest_version()


def test_upgrades_started_at_once_apply_each_migration_once(empty_pg_dsn: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(len(upgrade(empty_pg_dsn)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(results) == [0, 0, 0, len(migrations())]


def test_a_store_on_a_database_without_the_schema_says_to_upgrade(empty_pg_dsn: str) -> None:
    store = PostgresStore(empty_pg_dsn)
    with pytest.raises(SchemaError, match="memshift db upgrade"):
        store.load_session("s1")
    store.close()


def test_a_changed_migration_is_refused(empty_pg_dsn: str) -> None:
    upgrade(empty_pg_dsn)
    with psycopg.connect(empty_pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE memshift.schema_version SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(SchemaError, match="changed after they were applied"):
        upgrade(empty_pg_dsn)
