"""Realistic agent sessions, generated from a seed, as the calls an application makes.

Each generated session is a list of store calls in the order an agent makes them
(``save_session``, ``append_message``, ``upsert_tool_run``, ...), so the same session
can be written through any store. ``write_legacy`` plays them into Redis the way a
legacy application does, then trims long transcripts (LTRIM, counted in
``messages_trimmed``) and puts a TTL on some sessions. Tests, the demo and the
benchmarks use it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from memshift.model import Checkpoint, MemorySummary, Message, Session, ToolRun
from memshift.stores.base import Store

EPOCH = datetime(2026, 5, 19, 9, 0, tzinfo=UTC)
TOOLS = ("web_search", "read_file", "run_sql", "send_email", "calendar_lookup")
TOPICS = (
    "refund for order #{n}",
    "migrate the billing cron to k8s",
    "summarise the Q{n} incident review",
    "find a flight to Lisbon on the {n}th",
    "why is p99 latency up {n}%?",
    "draft a reply in Deutsch — Grüße",
    "compare plans 😀 and pick one",
)


@dataclass
class Call:
    """One store call: ``getattr(store, method)(*args)``."""

    method: str
    args: tuple[Any, ...]


@dataclass
class GeneratedSession:
    session_id: str
    calls: list[Call] = field(default_factory=list)
    keep_last: int | None = None  # legacy app trims the transcript to this many
    ttl_seconds: int | None = None  # legacy app lets the session expire

    def play(self, store: Store) -> None:
        for call in self.calls:
            getattr(store, call.method)(*call.args)


def generate_sessions(
    count: int, *, seed: int = 0, start: int = 0, namespace: str = "sess"
) -> Iterator[GeneratedSession]:
    """``count`` sessions, the same for the same seed (ids ``{namespace}_{seed}_{i}``)."""
    for index, sid in enumerate(session_ids(count, seed=seed, start=start, namespace=namespace),
                                start):
        yield _session(random.Random(f"{seed}:{index}"), sid)


def session_ids(
    count: int, *, seed: int = 0, start: int = 0, namespace: str = "sess"
) -> list[str]:
    """The ids ``generate_sessions`` gives its sessions, without generating them."""
    return [f"{namespace}_{seed}_{index:06d}" for index in range(start, start + count)]


def _session(rng: random.Random, sid: str) -> GeneratedSession:
    clock = EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 30))

    def tick() -> datetime:
        nonlocal clock
        clock += timedelta(seconds=rng.randrange(1, 90), microseconds=rng.randrange(10**6))
        return clock

    created = tick()
    generated = GeneratedSession(sid)
    calls = generated.calls
    session = Session(
        session_id=sid,
        tenant_id=f"tenant-{rng.randrange(8)}",
        user_id=f"user-{rng.randrange(1000)}",
        version=1,
        created_at=created,
        updated_at=created,
        metadata={"model": rng.choice(["gpt-4o", "claude-x", "llama-70b"]), "channel": "web"},
    )
    calls.append(Call("save_session", (session,)))

    status = "active"
    summary_version = 0
    step = 0
    parent: str | None = None
    msg_no = 0

    def say(role: str, content: str, tool_call_id: str | None = None) -> None:
        nonlocal msg_no
        message = Message(
            message_id=f"{sid}-m{msg_no}",
            role=role,
            content=content,
            ts=tick(),
            tool_call_id=tool_call_id,
        )
        msg_no += 1
        calls.append(Call("append_message", (sid, message)))

    def move(to: str) -> None:
        nonlocal status
        calls.append(Call("set_status", (sid, to)))
        status = to

    say("system", "You are a helpful agent. Use tools when needed.")
    for turn in range(rng.randrange(2, 14)):
        topic = rng.choice(TOPICS).format(n=rng.randrange(1, 30))
        say("user", f"Turn {turn}: {topic}")
        if rng.random() < 0.6:
            call_id = f"call_{sid}_{turn}"
            tool = rng.choice(TOOLS)
            args = {"query": topic, "limit": rng.randrange(1, 20)}
            say("assistant", f"Calling {tool}.", call_id)
            move("waiting_tool")
            attempts = 1
            run = ToolRun(
                tool_call_id=call_id, name=tool, args=args, status="running",
                attempts=attempts, updated_at=tick(),
            )
            calls.append(Call("upsert_tool_run", (sid, run)))
            while rng.random() < 0.35 and attempts < 5:
                attempts += 1
                run = run.model_copy(
                    update={"status": "retrying", "attempts": attempts,
                            "last_error": rng.choice(
                                ["timeout after 30s", "HTTP 429", "ECONNRESET"]
                            ),
                            "updated_at": tick()}
                )
                calls.append(Call("upsert_tool_run", (sid, run)))
            if rng.random() < 0.1:
                # Left mid-retry: the resume must see these attempts, not a reset counter.
                break
            final = rng.choice(["succeeded"] * 5 + ["failed"])
            run = run.model_copy(update={"status": final, "updated_at": tick()})
            calls.append(Call("upsert_tool_run", (sid, run)))
            say("tool", f'{{"result": "{tool} returned {rng.randrange(100)} rows"}}', call_id)
            move("active")
        say("assistant", f"Here is what I found about {topic}.")
        if msg_no > 6 and rng.random() < 0.4:
            summary_version += 1
            summary = MemorySummary(
                version=summary_version,
                text=f"Summary v{summary_version}: the user asked about {topic}.",
                covers_through=msg_no - 1,
                updated_at=tick(),
            )
            calls.append(Call("put_summary", (sid, summary)))
        step += 1
        checkpoint = Checkpoint(
            checkpoint_id=f"{sid}-cp{step}",
            parent_id=parent,
            step=step,
            state={"turn": turn, "topic": topic, "scratch": ["plan", "act", "observe"]},
            created_at=tick(),
        )
        parent = checkpoint.checkpoint_id
        calls.append(Call("put_checkpoint", (sid, checkpoint)))
    if status == "active":
        roll = rng.random()
        if roll < 0.3:
            move("completed")
        elif roll < 0.4:
            move("paused")
        elif roll < 0.45:
            move("failed")
    if msg_no > 12 and rng.random() < 0.5:
        generated.keep_last = rng.randrange(6, 12)
    if rng.random() < 0.3:
        generated.ttl_seconds = 7 * 24 * 3600
    return generated
