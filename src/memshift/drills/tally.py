"""Counting what the stores hold after a drill: messages lost, duplicated, and parity.

A message is lost when the store that acknowledged it (the primary, or Redis as
the legacy truth before a backfill) holds it and the other store does not;
duplicated when the other store holds a message id twice, or a message at a seq
the first holds nothing at (PostgreSQL keeps what Redis trimmed, so only seqs from
the first's first held one count). Parity is ``memshift parity`` over
exactly the drill's sessions, not recorded (a drill must not feed the Plan's gate).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from memshift.config import Settings
from memshift.drills.context import Figures
from memshift.migrate.parity import ParityOptions, ParityReport, ParityTotals, parity
from memshift.model import Message, SessionState
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

_CHUNK = 200


def message_key(message: Message) -> tuple[int | None, str, str, str, str | None]:
    """What makes two copies of a message the same message."""
    return (message.seq, message.message_id, message.role, message.content,
            message.tool_call_id)


@dataclass
class Tally:
    """Messages of a set of sessions: the store that acknowledged them against its copy."""

    sessions: int = 0
    missing_in_copy: int = 0  # sessions the truth holds and the copy does not
    truth_messages: int = 0
    copy_messages: int = 0
    lost: int = 0
    duplicated: int = 0
    lost_in: list[str] = field(default_factory=list)  # a few session ids, for the report

    def add(self, sid: str, truth: SessionState | None, copy: SessionState | None) -> None:
        self.sessions += 1
        held = [message_key(m) for m in truth.messages] if truth else []
        copied = [message_key(m) for m in copy.messages] if copy else []
        self.truth_messages += len(held)
        self.copy_messages += len(copied)
        if truth is not None and copy is None:
            self.missing_in_copy += 1
        lost = len(set(held) - set(copied))
        self.lost += lost
        if lost and len(self.lost_in) < 5:
            self.lost_in.append(sid)
        ids = Counter(key[1] for key in copied)
        self.duplicated += sum(n - 1 for n in ids.values())
        if truth is not None:
            # A copy may keep what the truth trimmed: only seqs from its first count.
            first = truth.messages[0].seq if truth.messages else truth.message_count
            seqs = {key[0] for key in held}
            self.duplicated += sum(1 for key in copied if key[0] is not None
                                   and key[0] >= (first or 0) and key[0] not in seqs)


def read_both(
    legacy: RedisStore, truth: PostgresStore, ids: Sequence[str]
) -> tuple[dict[str, SessionState | None], dict[str, SessionState | None]]:
    """Each session as Redis holds it and as PostgreSQL does, a batch at a time."""
    in_redis: dict[str, SessionState | None] = {}
    in_pg: dict[str, SessionState | None] = {}
    for at in range(0, len(ids), _CHUNK):
        chunk = list(ids[at : at + _CHUNK])
        in_redis.update((r.session_id, r.state) for r in legacy.read_sessions(chunk))
        in_pg.update(truth.load_sessions(chunk))
    return in_redis, in_pg


def tally(legacy: RedisStore, truth: PostgresStore, ids: Sequence[str], *,
          primary: str = "redis") -> Tally:
    """Compare the messages of ``ids``: what ``primary`` holds must be in the other store."""
    in_redis, in_pg = read_both(legacy, truth, ids)
    first, second = (in_redis, in_pg) if primary == "redis" else (in_pg, in_redis)
    counted = Tally()
    for sid in ids:
        counted.add(sid, first.get(sid), second.get(sid))
    return counted


def add_tally(figs: Figures, counted: Tally, *, label: str = "") -> None:
    """The tally's figures: messages on both sides, lost and duplicated (must be 0)."""
    figs.info(f"{label}messages acknowledged", counted.truth_messages)
    figs.expect(f"{label}messages copied", counted.copy_messages, counted.truth_messages)
    figs.expect(f"{label}messages lost", counted.lost, 0)
    figs.expect(f"{label}messages duplicated", counted.duplicated, 0)
    figs.expect(f"{label}sessions missing", counted.missing_in_copy, 0)


def parity_of(settings: Settings, ids: Sequence[str]) -> tuple[ParityTotals, list[ParityReport]]:
    """Parity of exactly these sessions (not recorded): the totals, and the reports that
    did not pass."""
    totals = ParityTotals()
    off = []
    for report in parity(settings, session_ids=list(ids), options=ParityOptions(record=False)):
        totals.add(report)
        if report.parity_status != "pass":
            off.append(report)
    return totals, off


def parity_figure(totals: ParityTotals) -> str:
    """``"300/300 pass"``, or the counts that are not zero."""
    counts = totals.counts
    if counts["pass"] == totals.checked:
        return f"{counts['pass']}/{totals.checked} pass"
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)


def redis_view(state: SessionState) -> dict[str, object]:
    """What Redis's reference layout can hold of a session: PostgreSQL must hold this.

    Redis keeps the latest summary and checkpoint only, and no expiry field.
    """
    summary, checkpoint = state.latest_summary, state.latest_checkpoint
    session = state.session.model_dump()
    session.pop("expires_at")
    return {
        "session": session,
        "messages": [m.model_dump() for m in state.messages],
        "tool_runs": sorted((t.model_dump() for t in state.tool_runs),
                            key=lambda t: str(t["tool_call_id"])),
        "summary": summary.model_dump() if summary else None,
        "checkpoint": checkpoint.model_dump() if checkpoint else None,
        "events": [e.model_dump() for e in state.events],
    }


def add_parity(figs: Figures, settings: Settings, ids: Sequence[str], *, label: str = "") -> None:
    """Parity of the drill's sessions after the drill: every one must pass."""
    totals, off = parity_of(settings, ids)
    figs.expect(f"{label}parity after", parity_figure(totals), f"{len(ids)}/{len(ids)} pass")
    if off:  # what differs, redacted as `memshift parity` shows it
        figs.info(f"{label}sessions not passing", [
            {"session_id": r.session_id, "status": r.parity_status,
             "diffs": [d.as_json() for d in r.diffs[:3]]} for r in off[:3]])
