"""Counting the Python bytecodes each variant executes per operation, instead of timing it.

A count does not move with the machine's load: on a shared, busy machine, where the
timed ratios of bench/dual_write.py and bench/read_overhead.py wander by more than
their goals' margins, it still shows what a change did to the interpreter's work on
the path (memshift's own cost, which the timed ratio adds to the I/O that both
variants share). It counts Python only: C code (psycopg's, hiredis's, a lock) and the
I/O itself count nothing, so its ratios are larger than the timed ones, and no goal
is set on them. Same interface as ``interleaved.time_variants``.
"""

from __future__ import annotations

import secrets
import sys
from types import FrameType
from typing import Any

from interleaved import Maker

_counted = [0]


def _count_opcodes(frame: FrameType, event: str, arg: Any) -> Any:
    """The global trace function: have every frame report its opcodes to the counter."""
    frame.f_trace_opcodes = True
    return _count_one


def _count_one(frame: FrameType, event: str, arg: Any) -> Any:
    if event == "opcode":
        _counted[0] += 1
    return _count_one


def count_variants(
    makers: dict[str, Maker], ops: int, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Bytecodes per operation of every variant, after a warm-up on a session of its own
    (repeated for each of ``rounds``, as time_variants gives one figure a round)."""
    tag = secrets.token_hex(3)
    counts: dict[str, list[float]] = {}
    for name, make in makers.items():
        warm = make(f"{tag}-{name}-warmup")
        for i in range(warmup):
            warm(i)
        op = make(f"{tag}-{name}")
        _counted[0] = 0
        sys.settrace(_count_opcodes)
        try:
            for i in range(ops):
                op(i)
        finally:
            sys.settrace(None)
        counts[name] = [_counted[0] / ops] * rounds
    return counts
