"""The backfill's transcript lane: plain transcripts go straight into COPY text, and
that changes nothing — the same sessions, the same rows, the same quarantine reasons."""

from __future__ import annotations

import json
from typing import Any

import orjson
import psycopg
import redis
from hypothesis import event, given, settings
from hypothesis import strategies as st

from memshift.config import Settings
from memshift.errors import ValidationError
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.bulk import EncodedState, TranscribedState, copy_text
from memshift.migrate.lane import BackfillLayout, plain_message
from memshift.model import Message, SessionState
from memshift.stores.layouts.reference import ReferenceLayout
from memshift.stores.layouts.timestamps import format_timestamp
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_backfill import as_redis_holds
from tests.unit.test_lane_parts import assert_same_rows, copy_values
from tests.unit.test_reference_decode_paths import ISO, MESSAGE, encoded, records, stamps, texts

SID = "s1"
REFERENCE = ReferenceLayout()
LANE = BackfillLayout()
HASH = {b"status": b"active", b"version": b"3", b"created_at": ISO.encode(),
        b"updated_at": ISO.encode()}


def outcome(layout: ReferenceLayout, replies: list[Any]) -> tuple[str, Any]:
    try:
        return "ok", layout.decode(SID, replies)
    except ValidationError as exc:
        return "error", str(exc)


def copy_lines(sid: str, messages: tuple[Message, ...]) -> str:
    """The COPY text of messages, field by field, as the binary COPY would store them."""
    return "".join(
        "\t".join([
            copy_text(sid), str(m.seq), copy_text(m.message_id), copy_text(m.role),
            copy_text(m.content), format_timestamp(m.ts),
            "\\N" if m.tool_call_id is None else copy_text(m.tool_call_id),
            json.dumps(m.metadata),
        ]) + "\n"
        for m in messages
    )


def without_messages(state: SessionState) -> dict[str, Any]:
    return state.model_dump(exclude={"messages", "transcript"})


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    return st.one_of(good, good, good, other)


# Messages with every member the layout needs, written as the lane's encoders write
# them (or broken by ``encoded``), so that many take the lane.
AWKWARD = st.sampled_from(['say "hi"\\', "\b\f\n\r\t\x01\x7f", "a\\\"b\\\\", "\\u00e9/é"])
LIKELY = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "tool"]),
     "content": st.one_of(st.just("hi\\n"), AWKWARD, texts),
     "ts": mostly(st.just(ISO), stamps)},
    optional={"tool_call_id": mostly(st.none(), texts)},
)


@st.composite
def likely(draw: st.DrawFn, index: int) -> bytes:
    record = {"id": draw(mostly(st.sampled_from([f"m{index}", f"ü\t{index}"]), texts)),
              **draw(LIKELY)}
    if draw(st.sampled_from([False, False, False, True])):
        return draw(encoded(record))
    compact = draw(st.booleans())  # json.dumps compact without ASCII escapes, or as is
    text = json.dumps(record, ensure_ascii=not compact,
                      separators=(",", ":") if compact else (", ", ": "))
    return text.encode("utf-8", "surrogatepass")


def same_reading(raws: list[bytes], trimmed: bytes, tools: dict[bytes, bytes]) -> bool:
    """The lane and the layout read these replies alike; True if the lane took them."""
    replies = [{**HASH, b"messages_trimmed": trimmed}, raws, tools, None, None, [], -1]

    expected, got = outcome(REFERENCE, replies), outcome(LANE, replies)

    assert got[0] == expected[0]
    if expected[0] == "error":
        assert got[1] == expected[1]
        return False
    reference, lane = expected[1], got[1]
    if isinstance(lane, EncodedState):  # the other parts read by the lane too
        assert_same_rows((lane.session, lane.parts, lane.event_count), reference)
    else:
        assert without_messages(lane) == without_messages(reference)
    plain = [plain_message(raw) for raw in raws]
    ids = {message[0] for message in plain if message is not None}
    assert isinstance(lane, TranscribedState) == (None not in plain and len(ids) == len(raws)
                                                   and int(trimmed) + len(raws) <= 2**62)
    if not isinstance(lane, TranscribedState):
        assert lane == reference
        return False
    assert reference.problems() == lane.problems() == []
    assert copy_values(lane.transcript.text) == copy_values(copy_lines(SID, reference.messages))
    assert lane.transcript.count == len(reference.messages)
    assert lane.transcript.next_seq == reference.message_count
    return True


@settings(max_examples=400, deadline=None)
@given(data=st.data(), count=st.integers(1, 4),
       trimmed=st.sampled_from([b"0", b"7", b"x", str(2**62 - 2).encode()]),
       tools=st.sampled_from([{}, {b"c1": b"{"}]))  # an error after the messages
def test_any_transcript_reads_in_the_lane_as_the_layout_reads_it(
    data: st.DataObject, count: int, trimmed: bytes, tools: dict[bytes, bytes]
) -> None:
    raws = [data.draw(records(MESSAGE).flatmap(encoded)) for _ in range(count)]
    if data.draw(st.booleans()):  # a repeated message id
        raws.append(raws[0])
    same_reading(raws, trimmed, tools)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), count=st.integers(1, 4))
def test_a_plain_looking_transcript_reads_in_the_lane_as_the_layout_reads_it(
    data: st.DataObject, count: int
) -> None:
    raws = [data.draw(likely(i)) for i in range(count)]
    event("took the lane" if same_reading(raws, b"0", {}) else "read by the layout")


def test_the_lane_takes_the_plain_transcripts_and_only_those() -> None:
    plain = [
        {"id": "m0", "role": "user", "content": "tab\tand\\slash\nnewline ü 𝄞", "ts": ISO},
        {"id": "m1", "role": "tool", "content": "", "ts": 1779184800123, "tool_call_id": "c1"},
        {"id": "m2", "role": "assistant", "content": "x", "ts": ISO, "tool_call_id": None},
    ]
    encodings = [orjson.dumps, lambda v: json.dumps(v).encode()]
    for encode in encodings:
        state = LANE.decode(SID, [HASH, [encode(m) for m in plain], {}, None, None, [], -1])
        assert isinstance(state, TranscribedState) and state.transcript.count == 3

    not_plain = [
        b'{"id":"m0","role":"user","content":"a","ts":"' + ISO.encode() + b'","id":"m0"}',
        b'{"id":"m0","role":"user","content":"a\\u0000","ts":"' + ISO.encode() + b'"}',
        b'{"id":"m0","role":"user","content":"a","ts":"' + ISO.encode() + b'","x":1}',
        b'{"id":"m0", "role":"user","content":"a","ts":"' + ISO.encode() + b'"}',
        b'{"id":"m0","role":"user","content":"a","ts":"2026-13-45T10:00:00.000000Z"}',
        b'{"id":"","role":"user","content":"a","ts":"' + ISO.encode() + b'"}',
    ]
    for raw in not_plain:
        kind, state = outcome(LANE, [HASH, [raw], {}, None, None, [], -1])
        assert kind == "error" or not isinstance(state, TranscribedState), raw
    no_times = {b"status": b"active"}  # the placeholder times come from the messages
    state = LANE.decode(SID, [no_times, [orjson.dumps(plain[0])], {}, None, None, [], -1])
    assert state is not None and not isinstance(state, TranscribedState)


def test_lane_transcripts_arrive_in_postgresql_as_the_layout_reads_them(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """Fresh sessions (COPYed straight in) and sessions PostgreSQL already holds part
    of (the staging merge) alike; legacy encodings and awkward text alike."""
    client = redis.Redis.from_url(redis_url)
    awkward = ["plain", "tab\there", "back\\slash", "new\nline\r\n", "ü 𝄞 \u2028", '"quoted"']
    encoders = [orjson.dumps, lambda v: json.dumps(v).encode(),
                lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()]
    ids = []
    for n in range(12):
        sid = f"lane-{n}\t{n}" if n % 4 == 0 else f"lane-{n}"
        base = f"{redis_prefix}:session:{sid}"
        messages = [
            encoders[(n + i) % 3]({
                "id": f"m{i}", "role": ("user", "assistant")[i % 2],
                "content": awkward[(n + i) % len(awkward)],
                "ts": ISO if i % 3 else 1779184800000 + i,
                **({"tool_call_id": f"c\\{i}"} if i == 2 else {}),
            })
            for i in range(5)
        ]
        client.rpush(f"{base}:messages", *messages)
        client.hset(base, mapping={"status": "active", "version": "5", "created_at": ISO,
                                   "updated_at": ISO, "messages_trimmed": str(n % 3)})
        ids.append(sid)
    with RedisStore(redis_url, prefix=redis_prefix) as legacy, PostgresStore(pg_dsn) as truth:
        first = legacy.load_session(ids[0])
        assert first is not None
        truth.append_message(ids[0], first.messages[0])  # this one takes the staging merge

        summary = backfill(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
                           BackfillOptions(prefix=redis_prefix, batch_size=5))

        assert (summary.migrated, summary.quarantined, summary.messages) == (12, 0, 60)
        for sid in ids:
            redis_state, pg_state = legacy.load_session(sid), truth.load_session(sid)
            assert redis_state is not None and pg_state is not None
            assert as_redis_holds(pg_state) == as_redis_holds(redis_state), sid
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT count(*), min(next_seq) FROM memshift.sessions").fetchone()
        assert rows == (12, 5)
