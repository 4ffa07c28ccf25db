"""What the framework layouts' tests share: settings for a layout, a long text, and
concurrent writers (the ``pg`` fixture is in conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from memshift.config import Settings

LONG = "Lorem ipsum dolor sit amet, ünïcödé ✓ " * 6000  # ~230 kB


def layout_settings(layout: str, pg_dsn: str, redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=layout, prefix=prefix)


def run_in_threads(work: Callable[[list[Any]], Any], items: list[Any], threads: int) -> None:
    """``work`` on ``threads`` interleaved parts of ``items``, each in its own thread."""
    workers = [threading.Thread(target=work, args=(items[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
