"""The async Redis clients, under the names the generated sync code swaps for sync ones.

Hand-written, with a hand-written sync twin in ``../_sync/_clients.py``: the few
places where the two clients differ by more than ``async``/``await`` live here.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.commands.core import AsyncScript as ScriptHandle

__all__ = ["AsyncRedis", "AsyncRedisCluster", "ScriptHandle", "close_client", "queue_command"]


async def close_client(client: AsyncRedis | AsyncRedisCluster) -> None:
    await client.aclose()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)
