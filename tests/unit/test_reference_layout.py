"""The reference layout reads hand-built Redis replies, and refuses bad ones by key."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from memshift.errors import ValidationError
from memshift.model import TERMINAL_TOOL_STATUSES, TOOL_STATUS_RANK
from memshift.stores.layouts import LUA_LIBRARY, get_layout
from memshift.stores.layouts.reference import CHILDREN, ReferenceLayout
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp

T0 = datetime(2026, 5, 19, 10, 0, tzinfo=UTC)
ISO = "2026-05-19T10:00:00.000000Z"


def replies(
    hash_: dict[bytes, bytes] | None = None,
    messages: list[bytes] | None = None,
    tools: dict[bytes, bytes] | None = None,
    summary: bytes | None = None,
    checkpoint: bytes | None = None,
    events: list[Any] | None = None,
    ttl: int = -1,
) -> list[Any]:
    return [hash_ or {}, messages or [], tools or {}, summary, checkpoint, events or [], ttl]


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def full_session() -> list[Any]:
    return replies(
        hash_={
            b"tenant_id": b"t1",
            b"user_id": b"u1",
            b"status": b"waiting_tool",
            b"version": b"3",
            b"created_at": b"1779184800000",  # epoch ms of T0
            b"updated_at": ISO.encode(),
            b"messages_trimmed": b"2",
            b"metadata": b'{"plan": "pro"}',
        },
        messages=[
            js({"id": "m3", "role": "user", "content": "hi", "ts": ISO}),
            js(
                {
                    "id": "m4",
                    "role": "tool",
                    "content": "42",
                    "ts": 1779184801000,
                    "tool_call_id": "c1",
                }
            ),
        ],
        tools={
            b"c1": js(
                {
                    "name": "calc",
                    "args": {"x": 1},
                    "status": "retrying",
                    "attempts": 2,
                    "last_error": "timeout",
                    "updated_at": ISO,
                }
            ),
        },
        summary=js({"version": 4, "text": "so far", "covers_through": 3, "updated_at": ISO}),
        checkpoint=js(
            {
                "checkpoint_id": "k2",
                "parent_id": "k1",
                "step": 2,
                "state": {"a": 1},
                "created_at": ISO,
            }
        ),
        events=[
            (
                b"1-0",
                {
                    b"type": b"status",
                    b"from": b"active",
                    b"to": b"waiting_tool",
                    b"at": ISO.encode(),
                    b"data": b"{}",
                },
            ),
        ],
    )


def test_reads_every_part_of_a_session() -> None:
    state = ReferenceLayout().decode("s1", full_session())

    assert state is not None
    assert state.session.status == "waiting_tool"
    assert state.session.version == 3
    assert state.session.created_at == T0
    assert state.session.metadata == {"plan": "pro"}
    assert [(m.seq, m.message_id) for m in state.messages] == [(2, "m3"), (3, "m4")]
    assert state.messages[1].tool_call_id == "c1"
    assert state.messages[1].ts == datetime(2026, 5, 19, 10, 0, 1, tzinfo=UTC)
    assert state.tool_runs[0].attempts == 2 and state.tool_runs[0].last_error == "timeout"
    assert state.latest_summary is not None and state.latest_summary.version == 4
    assert state.latest_checkpoint is not None and state.latest_checkpoint.parent_id == "k1"
    assert [(e.event_seq, e.from_status, e.to_status) for e in state.events] == [
        (0, "active", "waiting_tool")
    ]
    assert state.message_count == 4


def test_reads_unparsed_flat_replies_too() -> None:
    flat_hash = [b"status", b"paused", b"version", b"1", b"updated_at", ISO.encode()]
    events = [[b"1-0", [b"type", b"status", b"to", b"paused", b"at", ISO.encode()]]]
    state = ReferenceLayout().decode("s1", [flat_hash, [], [], None, None, events, -1])

    assert state is not None
    assert state.session.status == "paused"
    assert state.events[0].to_status == "paused"


def test_no_key_means_no_session() -> None:
    assert ReferenceLayout().decode("s1", replies()) is None


def test_children_without_hash_read_as_a_placeholder_as_old_as_its_oldest_part() -> None:
    state = ReferenceLayout().decode(
        "s1", replies(messages=[js({"id": "m", "role": "user", "content": "x", "ts": ISO})])
    )

    assert state is not None
    assert (state.session.status, state.session.version) == ("active", 0)
    assert state.session.created_at == state.session.updated_at == T0


def test_positive_ttl_becomes_expires_at() -> None:
    state = ReferenceLayout().decode("s1", replies(hash_={b"status": b"active"}, ttl=60_000))

    assert state is not None and state.session.expires_at is not None
    assert 50 < (state.session.expires_at - datetime.now(UTC)).total_seconds() <= 60


@pytest.mark.parametrize(
    ("part", "value", "where", "what"),
    [
        ("hash", {b"tenant_id": b"t\xff1"}, "field 'tenant_id'", "not valid UTF-8"),
        ("hash", {b"metadata": b'{"a": '}, "field 'metadata'", "not valid JSON"),
        ("hash", {b"metadata": b"[1]"}, "field 'metadata'", "expected an object"),
        ("hash", {b"version": b"-1"}, "field 'version'", "not a non-negative integer"),
        ("hash", {b"status": b"sleeping"}, "status", "Input should be"),
        ("hash", {b"updated_at": b"yesterday"}, "field 'updated_at'", "neither ISO 8601"),
        ("hash", {b"colour": b"r\xe9d"}, "field 'colour'", "not valid UTF-8"),
        ("hash", {b"col\xffour": b"red"}, "field b'col\\xffour'", "not valid UTF-8"),
        (
            "messages",
            [b'{"id": "m", "role": "user", "content": "x", "ts": "' + ISO.encode()
             + b'", "extra": 1, "extra": 2}'],
            "index 0",
            "appears twice",
        ),
        (
            "messages",
            [js({"id": "m", "role": "user", "content": "x", "ts": ISO, "extra": "\udcff"})],
            "index 0",
            "UTF-8",
        ),
        ("events", [(b"1-0", {b"at": ISO.encode(), b"who": b"\xff"})], "entry 0", "UTF-8"),
        ("messages", [b'{"id": "m", "role": "user"'], "index 0", "not valid JSON"),
        (
            "messages",
            [js({"id": "m", "role": "user", "content": 5, "ts": ISO})],
            "index 0",
            "content",
        ),
        ("messages", [js({"id": "m", "role": "user", "content": "x"})], "index 0", "no 'ts'"),
        (
            "tools",
            {b"c1": js({"name": "f", "attempts": "2x", "updated_at": ISO})},
            "field 'c1'",
            "attempts",
        ),
        ("tools", {b"c1": b"\xc3("}, "field 'c1'", "not valid UTF-8"),
        ("summary", js({"version": 0, "text": "x", "updated_at": ISO}), "", "version"),
        ("checkpoint", b"null", "value", "expected an object"),
        ("events", [(b"1-0", {b"type": b"status", b"at": b"later"})], "entry 0", "neither ISO"),
    ],
)
def test_bad_records_raise_validation_error_naming_the_key(
    part: str, value: Any, where: str, what: str
) -> None:
    args = {"hash": "hash_"}.get(part, part)
    keys = {
        "hash": "agent:session:s1",
        "messages": "agent:session:s1:messages",
        "tools": "agent:session:s1:tools",
        "summary": "agent:session:s1:summary",
        "checkpoint": "agent:session:s1:checkpoint",
        "events": "agent:session:s1:events",
    }

    with pytest.raises(ValidationError) as caught:
        ReferenceLayout().decode("s1", replies(**{args: value}))

    message = str(caught.value)
    assert repr(keys[part]) in message
    assert where in message
    assert what in message


def test_unknown_hash_fields_are_kept_in_the_session_metadata() -> None:
    hash_ = {b"status": b"active", b"colour": b"red", b"metadata": b'{"plan": "pro"}'}
    state = ReferenceLayout().decode("s1", replies(hash_=hash_))

    assert state is not None
    assert state.session.metadata == {"plan": "pro", "redis_fields": {"colour": "red"}}


def test_unknown_event_fields_are_kept_in_the_event_data() -> None:
    entry = {b"type": b"status", b"at": ISO.encode(), b"data": b'{"a": 1}', b"who": b"ops"}
    state = ReferenceLayout().decode("s1", replies(events=[(b"1-0", entry)]))

    assert state is not None
    assert state.events[0].data == {"a": 1, "redis_fields": {"who": "ops"}}


def test_unknown_members_of_records_are_kept_in_their_metadata() -> None:
    record = {"id": "m1", "role": "user", "content": "x", "ts": ISO, "name": "bob", "seq": 7}
    tool = {"name": "f", "status": "running", "updated_at": ISO, "tool_call_id": "other"}
    summary = {"version": 1, "text": "t", "updated_at": ISO, "model": "small"}
    checkpoint = {"checkpoint_id": "k", "step": 1, "created_at": ISO, "thread": "t9"}
    state = ReferenceLayout().decode(
        "s1",
        replies(
            messages=[js(record)],
            tools={b"c1": js(tool)},
            summary=js(summary),
            checkpoint=js(checkpoint),
        ),
    )

    assert state is not None
    assert (state.messages[0].seq, state.messages[0].message_id) == (0, "m1")
    assert state.messages[0].metadata == {"name": "bob", "seq": 7}
    assert state.tool_runs[0].tool_call_id == "c1"
    assert state.tool_runs[0].metadata == {"tool_call_id": "other"}
    assert state.summaries[0].metadata == {"model": "small"}
    assert state.checkpoints[0].metadata == {"thread": "t9"}


def test_an_unknown_member_named_like_a_metadata_key_goes_under_extra() -> None:
    record = {
        "id": "m1", "role": "user", "content": "x", "ts": ISO,
        "metadata": {"name": "al", "_extra": "taken"}, "name": "bob", "usage": 3,
    }
    odd = {"id": "m2", "role": "user", "content": "y", "ts": ISO, "metadata": "not an object"}
    state = ReferenceLayout().decode("s1", replies(messages=[js(record), js(odd)]))

    assert state is not None
    assert state.messages[0].metadata == {
        "name": "al", "_extra": "taken", "usage": 3, "_extra_1": {"name": "bob"}
    }
    assert state.messages[1].metadata == {"metadata": "not an object"}


def test_metadata_written_by_the_layout_reads_back_as_the_same_model() -> None:
    legacy = full_session()
    legacy[0][b"colour"] = b"red"
    legacy[1][0] = js(
        {"id": "m3", "role": "user", "content": "hi", "ts": ISO, "usage": {"tokens": 3},
         "metadata": {"name": "bob"}}
    )
    layout = ReferenceLayout()
    first = layout.decode("s1", legacy)
    assert first is not None
    message = first.messages[0]
    assert message.metadata == {"name": "bob", "usage": {"tokens": 3}}
    run = first.tool_runs[0].model_copy(update={"metadata": {"latency": 4}})
    summary = first.summaries[0].model_copy(update={"metadata": {"model": "m"}})
    checkpoint = first.checkpoints[0].model_copy(update={"metadata": {"x": [1]}})

    # save_session's args: ttl, version, updated_at, created_at, trimmed, n, n pairs, ...
    args = layout.save_session(first.session, 0).args
    pairs = args[6 : 6 + 2 * args[5]]
    written = {"messages_trimmed": args[4], **dict(zip(pairs[::2], pairs[1::2], strict=True))}
    head, tail = layout.upsert_tool_run("s1", run, 0).args[2:4]
    again = layout.decode(
        "s1",
        replies(
            hash_={k.encode(): v.encode() for k, v in written.items()},
            messages=[layout.append_message("s1", message, 0).args[1].encode()],
            tools={b"c1": f"{head}{run.attempts}{tail}".encode()},
            summary=layout.put_summary("s1", summary, 0).args[1].encode(),
            checkpoint=layout.put_checkpoint("s1", checkpoint, 0).args[1].encode(),
        ),
    )

    assert written["colour"] == "red" and "redis_fields" not in written["metadata"]
    assert again is not None
    assert again.session.metadata == first.session.metadata
    # The hash as written holds messages_trimmed, so the seq is the same as before.
    assert again.messages[0] == message
    assert again.tool_runs == (run,)
    assert again.summaries == (summary,)
    assert again.checkpoints == (checkpoint,)


def test_unprintable_key_is_escaped_in_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        ReferenceLayout(prefix="a\tb").decode("s\n1", replies(hash_={b"version": b"x"}))

    assert "'a\\tb:session:s\\n1'" in str(caught.value)


def test_scan_pattern_escapes_glob_characters_of_the_prefix() -> None:
    assert ReferenceLayout(prefix="a*b?[c]\\").scan_pattern() == "a\\*b\\?\\[c\\]\\\\:session:*"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"agent:session:s1", "s1"),
        (b"agent:session:a:b", "a:b"),
        (b"agent:session:s1:messages", None),
        (b"agent:session:s1:tools", None),
        (b"agent:session:s1:events", None),
        (b"other:session:s1", None),
        (b"agent:session:", None),
    ],
)
def test_session_id_from_key_names_only_session_hashes(key: bytes, expected: str | None) -> None:
    assert ReferenceLayout().session_id_from_key(key) == expected


def test_key_with_invalid_utf8_keeps_its_bytes_for_quarantine() -> None:
    sid = ReferenceLayout().session_id_from_key(b"agent:session:s\xff")

    assert sid is not None and sid.encode("utf-8", "surrogateescape") == b"s\xff"


def test_get_layout_builds_the_reference_layout_with_its_prefix() -> None:
    layout = get_layout("reference", prefix="p")

    assert layout.session_keys("s")[0] == "p:session:s"
    assert len(layout.session_keys("s")) == 6


def test_hash_tag_layout_puts_the_session_id_in_braces_on_every_key() -> None:
    layout = get_layout("reference-hashtag", prefix="p")

    assert layout.name == "reference-hashtag"
    assert layout.session_keys("s") == [
        "p:session:{s}",
        *(f"p:session:{{s}}:{child}" for child in CHILDREN),
    ]
    assert layout.scan_pattern() == "p:session:{*}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"agent:session:{s1}", "s1"),
        (b"agent:session:{a:b}", "a:b"),
        (b"agent:session:{s1:messages}", "s1:messages"),  # braces end the ambiguity
        (b"agent:session:{s1}:messages", None),
        (b"agent:session:{s1}:tools", None),
        (b"agent:session:s1", None),
        (b"agent:session:{}", None),
        (b"other:session:{s1}", None),
    ],
)
def test_hash_tag_layout_names_only_its_session_hashes(key: bytes, expected: str | None) -> None:
    assert ReferenceLayout(hash_tag=True).session_id_from_key(key) == expected


def test_written_timestamps_are_fixed_width_and_read_back() -> None:
    early = datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=UTC)

    assert format_timestamp(T0) == ISO
    assert format_timestamp(early) == "0005-01-02T03:04:05.000006Z"
    assert parse_timestamp(format_timestamp(early)) == early
    assert parse_timestamp("1779184800000.5") == T0.replace(microsecond=500)
    assert parse_timestamp(1779184800000) == T0
    assert parse_timestamp("2026-05-19T12:00:00+02:00") == T0
    assert parse_timestamp("2026-05-19T10:00:00") == T0  # no offset: UTC


def test_lua_status_tables_match_the_model() -> None:
    common = LUA_LIBRARY.read_text()
    rank = re.search(r"TOOL_STATUS_RANK = \{(.*?)\}", common)
    terminal = re.search(r"TERMINAL = \{(.*?)\}", common)
    assert rank is not None and terminal is not None

    lua_rank = {k: int(v) for k, v in re.findall(r"(\w+) = (\d+)", rank.group(1))}
    lua_terminal = set(re.findall(r"(\w+) = true", terminal.group(1)))
    assert lua_rank == TOOL_STATUS_RANK
    assert lua_terminal == TERMINAL_TOOL_STATUSES
