"""Every contract test runs against every store (and, for Redis, every layout)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from memshift.stores.base import AsyncStore, Store
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore

STORES = ["postgres", "redis-reference", "redis-reference-hashtag"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    kind: str = request.param
    made: Store
    if kind == "postgres":
        made = PostgresStore(request.getfixturevalue("pg_dsn"), max_size=4)
    else:
        made = RedisStore(
            request.getfixturevalue("redis_url"),
            layout=kind.split("-", 1)[1],
            prefix=request.getfixturevalue("redis_prefix"),
        )
    yield made
    made.close()


@pytest.fixture(params=STORES)
async def async_store(request: pytest.FixtureRequest) -> AsyncIterator[AsyncStore]:
    kind: str = request.param
    made: AsyncStore
    if kind == "postgres":
        made = AsyncPostgresStore(request.getfixturevalue("pg_dsn"), max_size=4)
    else:
        made = AsyncRedisStore(
            request.getfixturevalue("redis_url"),
            layout=kind.split("-", 1)[1],
            prefix=request.getfixturevalue("redis_prefix"),
        )
    yield made
    await made.close()
