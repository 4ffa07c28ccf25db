"""The dual-writing application of the crash drill, run as a child process.

``python -m memshift.drills.writer --stage dual_write --sessions N --seed S
--namespace NS --start I [--stop-before-secondary-append K]`` plays the drill's interleaved
workload (:func:`memshift.drills.workload.interleaved`) from step ``I`` on through a
``MigratingStore`` at that stage, on the stores named by ``MEMSHIFT_*``.

With ``--stop-before-secondary-append K`` it stops itself with SIGSTOP just before
its K-th message append to the secondary store, after the primary acknowledged
the message and before the secondary heard of it, having printed
``{"stopped_at": step}``. The drill then SIGKILLs it there: exactly between the
two writes of one call, which no timing could hit reliably, so that each kill
leaves one acknowledged message missing from the secondary. The hook wraps the
secondary store's ``append_message`` in this process only; the router's code is
the product's, unchanged.
At the end it prints ``{"done": steps_played}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memshift.config import load_settings
from memshift.drills.workload import interleaved, sessions
from memshift.migrate.plan import Plan, Stage, StaticPlan
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore


def plan_at(stage: Stage) -> Plan:
    return Plan(version=1, stage=stage, changed_at=datetime.now(UTC), changed_by="drill")


class StopBeforeSecondary:
    """Counts message appends to the secondary; stops this process just before the K-th."""

    def __init__(self, stop_at: int | None) -> None:
        self.stop_at = stop_at
        self.seen = 0
        self.step = -1

    def wrap(self, store: Any) -> None:
        store.append_message = self._armed(store.append_message)

    def _armed(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.seen += 1
            if self.seen == self.stop_at:
                print(json.dumps({"stopped_at": self.step}), flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            return write(*args, **kwargs)
        return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="memshift.drills.writer")
    parser.add_argument("--stage", required=True, choices=[s.value for s in Stage])
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop-before-secondary-append", type=int, default=None)
    args = parser.parse_args(argv)
    settings = load_settings({})
    assert settings.redis_url and settings.postgres_dsn, "set MEMSHIFT_REDIS_URL and _DSN"
    stage = Stage(args.stage)
    legacy = RedisStore(settings.redis_url, prefix=settings.prefix)
    truth = PostgresStore(settings.postgres_dsn, max_size=2)
    hook = StopBeforeSecondary(args.stop_before_secondary_append)
    secondary = plan_at(stage).writes()[1]
    if secondary is not None:
        hook.wrap(legacy if secondary == "redis" else truth)
    router = MigratingStore(legacy, truth, StaticPlan(plan_at(stage)),
                            spool_path=Path(settings.data_dir) / "repair.spool")
    steps = interleaved(sessions(args.sessions, seed=args.seed, namespace=args.namespace),
                        seed=args.seed)
    played = 0
    try:
        for step in steps[args.start :]:
            hook.step = step.index
            step.apply(router)
            played += 1
    finally:
        router.close()
    print(json.dumps({"done": played}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
