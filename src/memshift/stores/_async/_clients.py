"""The async clients, under the names the generated sync code swaps for sync ones.

Hand-written, with a hand-written sync twin in ``../_sync/_clients.py``: the few
places where the two clients differ by more than ``async``/``await`` live here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.commands.core import AsyncScript as ScriptHandle

T = TypeVar("T")
AsyncLock = asyncio.Lock  # guards one-time setup shared by concurrent callers

__all__ = ["Alarm", "AsyncLock", "AsyncRedis", "AsyncRedisCluster", "Background",
           "ScriptHandle", "close_client", "queue_command", "run_blocking"]


async def close_client(client: AsyncRedis | AsyncRedisCluster) -> None:
    await client.aclose()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)


async def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (a file write and fsync) off the event loop."""
    return await asyncio.to_thread(function, *args)


class Periodic:
    """Await ``job()`` every ``interval`` seconds in a task of the running loop.

    ``job`` must not raise (it logs its own errors). ``stop()`` waits for a run under
    way to finish, so nothing is left running after it returns.
    """

    def __init__(self, name: str, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        self._interval = interval
        self._job = job
        self._stopping = asyncio.Event()
        # Raises RuntimeError outside a running loop: the caller says what to do.
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
                return
            await self._job()

    async def stop(self) -> None:
        self._stopping.set()
        await self._task


class Background:
    """Run jobs off the caller's path: a bounded queue and one worker task.

    ``submit`` never waits: when the queue is full it drops the job and returns False
    (the caller counts drops). ``job`` must not raise (it logs its own errors). The
    worker starts with the first job, in the loop that submits it. ``drain()`` waits
    for every job submitted so far; ``stop()`` drops those queued and waits for the
    one under way.
    """

    def __init__(self, name: str, maxsize: int) -> None:
        self._name = name
        self._maxsize = maxsize
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        if self._queue is None:
            self._queue = asyncio.Queue(self._maxsize)
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return False
        return True

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                await job()
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        if self._queue is not None:
            await self._queue.join()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._queue = self._task = None


class Alarm:
    """Call ``ring()`` once, ``seconds`` from now, unless ``disarm()`` came first.

    A timer of the running loop, so ``ring`` runs in the loop's thread and never while
    the code that armed the alarm runs: once ``disarm()`` has returned, ``ring`` has
    either run (``rang``) or never will. (The sync twin: one watchdog thread for every
    alarm, with a lock for the same promise.) ``ring`` must not raise.
    """

    def __init__(self, seconds: float, ring: Callable[[], None]) -> None:
        self.rang = False
        self._ring = ring
        self._handle = asyncio.get_running_loop().call_later(seconds, self._go)

    def _go(self) -> None:
        self.rang = True
        self._ring()

    def disarm(self) -> None:
        self._handle.cancel()
