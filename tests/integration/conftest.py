"""Fixtures that several integration test modules share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest


@pytest.fixture
def pg(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database (a module may define its own)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn
