"""The sync Redis client; hand-written twin of ``../_async/_clients.py``."""

from __future__ import annotations

from redis import Redis
from redis.commands.core import Script as ScriptHandle

__all__ = ["Redis", "ScriptHandle", "close_client"]


def close_client(client: Redis) -> None:
    client.close()
