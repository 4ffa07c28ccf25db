"""The sessions a drill works on: generated, repeatable, and played as an app plays them.

Ids carry the drill's namespace, so a drill's sessions never meet anyone else's.
:func:`interleaved` is the calls of many sessions as a live application makes them,
a turn of one session, then a turn of another, which is what a crash or an outage
interrupts; :func:`play_legacy` is what a legacy app left in Redis before the
migration began.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from memshift.generate import Call, GeneratedSession, generate_sessions
from memshift.stores.base import Store


@dataclass(frozen=True)
class Step:
    """One call of the interleaved workload, with the session it belongs to."""

    index: int
    session_id: str
    call: Call

    def apply(self, store: Store) -> object:
        return getattr(store, self.call.method)(*self.call.args)


def sessions(count: int, *, seed: int, namespace: str) -> list[GeneratedSession]:
    return list(generate_sessions(count, seed=seed, namespace=namespace))


def interleaved(generated: list[GeneratedSession], *, seed: int) -> list[Step]:
    """Every call of every session, sessions taking turns at random, each in its order."""
    rng = random.Random(seed)
    cursors = {g.session_id: iter(g.calls) for g in generated}
    live = list(cursors)
    steps: list[Step] = []
    while live:
        sid = rng.choice(live)
        call = next(cursors[sid], None)
        if call is None:
            live.remove(sid)
            continue
        steps.append(Step(len(steps), sid, call))
    return steps


def play_legacy(store: Store, count: int, *, seed: int, namespace: str) -> list[str]:
    """Write ``count`` generated sessions straight into ``store``; their ids."""
    ids = []
    for generated in generate_sessions(count, seed=seed, namespace=namespace):
        generated.play(store)
        ids.append(generated.session_id)
    return ids


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for at in range(0, len(items), size):
        yield items[at : at + size]
