"""The Redis store, sync and async (the sync one is generated from the async)."""

from memshift.stores._async.redis import AsyncRedisStore
from memshift.stores._sync.redis import RedisStore
from memshift.stores.layouts import RawSession

__all__ = ["AsyncRedisStore", "RawSession", "RedisStore"]
