"""The sync clients; hand-written twin of ``../_async/_clients.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script as ScriptHandle

T = TypeVar("T")

__all__ = ["Redis", "RedisCluster", "ScriptHandle", "close_client", "queue_command",
           "run_blocking"]


def close_client(client: Redis | RedisCluster) -> None:
    client.close()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)  # type: ignore[no-untyped-call]


def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (the async twin runs it in a thread)."""
    return function(*args)
