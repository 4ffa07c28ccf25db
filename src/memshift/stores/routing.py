"""What the MigratingStore reports: which store served a read and why, and its counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from memshift.model import SessionState

if TYPE_CHECKING:
    from memshift.migrate.parity import ParityReport

# Why a read went where it did:
#   stage                  the stage sends every read of this path there
#   slice                  a cutover slice covers this read path, session and tenant
#   stale_plan             the Plan could not be refreshed in time: before pg_primary,
#                          Redis serves (the old store); in retired, PostgreSQL without
#                          the cache (the Plan may have missed a cache epoch bump)
#   repair_pending         the chosen store missed writes still queued for repair
#   secondary_unavailable  the chosen store (not the primary) could not be reached
ReadReason = Literal["stage", "slice", "stale_plan", "repair_pending", "secondary_unavailable"]
# What served a read: a store, or (in the retired stage) the cache in Redis in front of
# PostgreSQL.
ReadSource = Literal["redis", "postgres", "cache"]


class Compare(Protocol):
    """How the live shadow compare judges a session: ``parity.check_session`` (tests
    pass a double, e.g. a slow one, to see that readers do not wait for it)."""

    def __call__(
        self, redis_state: SessionState | None, pg_state: SessionState | None, *,
        checked_at: datetime,
    ) -> ParityReport: ...


@dataclass(frozen=True)
class ReadResult:
    state: SessionState | None
    source: ReadSource
    reason: ReadReason


@dataclass
class RouterStats:
    """Per-router counters (Prometheus metrics are built on these elsewhere)."""

    reads: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # source, path, reason
    # store, result: ok | error (primary), ok | failed | skipped (secondary)
    writes: Counter[tuple[str, str]] = field(default_factory=Counter)
    repairs_enqueued: int = 0
    spool_writes: int = 0
    stale_plan_reads: int = 0
    # The retired stage's cache: hit, miss, fill, fill_refused (a write came between),
    # bypassed (its invalidation failed), unavailable, invalidation_failed.
    cache: Counter[str] = field(default_factory=Counter)
    # The background repair: runs, sessions repaired, runs that failed.
    background_repair: Counter[str] = field(default_factory=Counter)
    # The live shadow compare: reads sampled, dropped (its queue was full), reports by
    # status (pass, fail, pending, error) once recorded, and compares that failed.
    shadow: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reads": {"/".join(key): n for key, n in self.reads.items()},
            "writes": {"/".join(key): n for key, n in self.writes.items()},
            "repairs_enqueued": self.repairs_enqueued,
            "spool_writes": self.spool_writes,
            "stale_plan_reads": self.stale_plan_reads,
            "cache": dict(self.cache),
            "background_repair": dict(self.background_repair),
            "shadow": dict(self.shadow),
        }
