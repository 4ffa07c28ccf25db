"""The PostgreSQL store, sync and async (the sync one is generated from the async)."""

from memshift.stores._async.postgres import AsyncPostgresStore
from memshift.stores._sync.postgres import PostgresStore

__all__ = ["AsyncPostgresStore", "PostgresStore"]
