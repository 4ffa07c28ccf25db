"""The MigratingStore router, sync and async (the sync one is generated from the async)."""

from memshift.stores._async.migrating import AsyncMigratingStore
from memshift.stores._sync.migrating import MigratingStore
from memshift.stores.routing import ReadReason, ReadResult, ReadSource, RouterStats

__all__ = ["AsyncMigratingStore", "MigratingStore", "ReadReason", "ReadResult", "ReadSource",
           "RouterStats"]
