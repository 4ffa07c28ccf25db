"""The sync Redis clients; hand-written twin of ``../_async/_clients.py``."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script as ScriptHandle

__all__ = ["Redis", "RedisCluster", "ScriptHandle", "close_client", "queue_command"]


def close_client(client: Redis | RedisCluster) -> None:
    client.close()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
