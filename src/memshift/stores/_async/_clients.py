"""The async Redis client, under the names the generated sync code swaps for sync ones.

Hand-written, with a hand-written sync twin in ``../_sync/_clients.py``: the few
places where the two clients differ by more than ``async``/``await`` live here.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript as ScriptHandle

__all__ = ["AsyncRedis", "ScriptHandle", "close_client", "queue_command"]


async def close_client(client: AsyncRedis) -> None:
    await client.aclose()


def queue_command(pipe: Pipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)
