"""What a session is known to hold, and whether a read shows less (DESIGN §4, Continuity).

``Known`` is the join of every acknowledged write and every read of one session so
far: the message at each seq, the latest summary version, the latest checkpoint step,
each tool run's attempts and whether it ended, the status events and the session
version. Continuity says that no read ever shows less than that; ``behind`` lists,
in words, where a read does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memshift.model import Message, SessionState, StatusChange, ToolRun


@dataclass
class ToolKnown:
    attempts: int = 0
    ended_as: str | None = None  # the terminal status, once one was seen


@dataclass
class Known:
    exists: bool = False
    messages: dict[int, str] = field(default_factory=dict)  # seq -> message id
    summary: int = 0  # latest summary version (0: none)
    step: int = -1  # latest checkpoint step (-1: none)
    tools: dict[str, ToolKnown] = field(default_factory=dict)
    events: set[int] = field(default_factory=set)  # event_seqs
    version: int = 0  # session version
    status: str = "active"  # the status at ``version``

    # -- acknowledged writes -------------------------------------------------------

    def created(self, version: int) -> None:
        self.exists = True
        self.version = max(self.version, version)

    def appended(self, message: Message) -> None:
        assert message.seq is not None, "the router returns the seq the primary assigned"
        self.messages[message.seq] = message.message_id

    def tool(self, run: ToolRun) -> None:
        known = self.tools.setdefault(run.tool_call_id, ToolKnown())
        known.attempts = max(known.attempts, run.attempts)
        if run.terminal and known.ended_as is None:
            known.ended_as = run.status

    def summarised(self, version: int) -> None:
        self.summary = max(self.summary, version)

    def checkpointed(self, step: int) -> None:
        self.step = max(self.step, step)

    def status_changed(self, change: StatusChange) -> None:
        assert change.event.event_seq is not None
        self.events.add(change.event.event_seq)
        if change.session.version >= self.version:
            self.version, self.status = change.session.version, change.session.status

    # -- reads -----------------------------------------------------------------------

    def absorb(self, state: SessionState | None) -> None:
        """Raise what is known to what a read showed (a later read must show it too)."""
        if state is None:
            return
        self.exists = True
        for message in state.messages:
            if message.seq is not None:
                self.messages.setdefault(message.seq, message.message_id)
        summary = state.latest_summary
        self.summary = max(self.summary, summary.version if summary else 0)
        checkpoint = state.latest_checkpoint
        self.step = max(self.step, checkpoint.step if checkpoint else -1)
        for run in state.tool_runs:
            self.tool(run)
        self.events |= {e.event_seq for e in state.events if e.event_seq is not None}
        if state.session.version > self.version:
            self.version, self.status = state.session.version, state.session.status


def behind(state: SessionState | None, known: Known) -> list[str]:
    """Where ``state`` shows less than is known: empty when the read is continuous."""
    if state is None:
        return ["the session is missing"] if known.exists else []
    found: list[str] = []
    held = {m.seq: m.message_id for m in state.messages if m.seq is not None}
    for seq, message_id in sorted(known.messages.items()):
        if seq not in held:
            found.append(f"message {message_id!r} at seq {seq} is missing")
        elif held[seq] != message_id:
            found.append(f"seq {seq} holds {held[seq]!r}, not {message_id!r}")
    count = max(known.messages, default=-1) + 1
    if state.message_count < count:
        found.append(f"message count {state.message_count} < {count}")
    summary = state.latest_summary
    if (summary.version if summary else 0) < known.summary:
        found.append(f"summary version {summary.version if summary else 0} < {known.summary}")
    checkpoint = state.latest_checkpoint
    if (checkpoint.step if checkpoint else -1) < known.step:
        found.append(f"checkpoint step {checkpoint.step if checkpoint else -1} < {known.step}")
    for tool_call_id, tool in sorted(known.tools.items()):
        run = state.tool_run(tool_call_id)
        if run is None:
            found.append(f"tool run {tool_call_id!r} is missing")
            continue
        if run.attempts < tool.attempts:
            found.append(f"tool run {tool_call_id!r} attempts {run.attempts} < {tool.attempts}")
        if tool.ended_as is not None and not run.terminal:
            found.append(f"tool run {tool_call_id!r} is {run.status} after it {tool.ended_as}")
    missing_events = sorted(known.events - {e.event_seq for e in state.events})
    if missing_events:
        found.append(f"status events {missing_events} are missing")
    if state.session.version < known.version:
        found.append(f"session version {state.session.version} < {known.version}")
    return found
