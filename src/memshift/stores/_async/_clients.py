"""The async clients, under the names the generated sync code swaps for sync ones.

Hand-written, with a hand-written sync twin in ``../_sync/_clients.py``: the few
places where the two clients differ by more than ``async``/``await`` live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.commands.core import AsyncScript as ScriptHandle

T = TypeVar("T")

__all__ = ["AsyncRedis", "AsyncRedisCluster", "ScriptHandle", "close_client", "queue_command",
           "run_blocking"]


async def close_client(client: AsyncRedis | AsyncRedisCluster) -> None:
    await client.aclose()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)


async def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (a file write and fsync) off the event loop."""
    return await asyncio.to_thread(function, *args)
