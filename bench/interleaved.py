"""Timing variants of one operation against each other, in interleaved rounds.

Every variant is given a fresh session id per round (set up untimed) and runs
``ops`` operations; within a round the variants take turns every few operations,
in reverse order every other turn, so a slow patch of the machine hits all of them.
Ratios are medians of the per-round ratios. Shared by bench/dual_write.py and
bench/read_overhead.py (bench/store_ops.py has its own, for its three fixed variants).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import secrets
import statistics
import time
from collections.abc import Callable, Sequence

from store_ops import Op, _time_us

Maker = Callable[[str], Op]  # given a fresh session id, set up untimed and return the op


def time_variants(
    makers: dict[str, Maker], ops: int, rounds: int, warmup: int, chunk: int = 10
) -> dict[str, list[float]]:
    """µs/op of every variant in every round.

    Within a round the variants take turns every ``chunk`` operations (in reverse
    order every other turn), so even a slow patch of a few milliseconds hits all of
    them alike.
    """
    tag = secrets.token_hex(3)
    names = list(makers)
    for name in names:
        _time_us(makers[name](f"{tag}-{name}-warmup"), warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        round_ops = {name: makers[name](f"{tag}-{name}-r{r}") for name in names}
        spent = dict.fromkeys(names, 0)
        gc.collect()
        for turn, start in enumerate(range(0, ops, chunk)):
            for name in names if (r + turn) % 2 == 0 else names[::-1]:
                op = round_ops[name]
                began = time.perf_counter_ns()
                for i in range(start, min(start + chunk, ops)):
                    op(i)
                spent[name] += time.perf_counter_ns() - began
        for name in names:
            times[name].append(spent[name] / ops / 1000)
    return times


def ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """The median over rounds of variant time / baseline time."""
    return statistics.median(v / b for v, b in zip(times[variant], times[baseline], strict=True))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p % at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "MEMSHIFT_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="server to make the scratch database on (default: $MEMSHIFT_POSTGRES_DSN "
        "or postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("MEMSHIFT_REDIS_URL", "redis://127.0.0.1:6379/15"),
        help="Redis to use under a scratch key prefix (default: $MEMSHIFT_REDIS_URL "
        "or redis://127.0.0.1:6379/15)",
    )
