"""The reference layout reads a key's records in one tight loop when they are plain, and
record by record otherwise: both ways give the same records, or the same error."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from memshift.errors import ValidationError
from memshift.model import Event
from memshift.stores.layouts.reference import ReferenceLayout

SID = "s1"
ISO = "2026-05-19T10:00:00.000000Z"
LAYOUT = ReferenceLayout()

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "a:b", 'quote " and \\ slash', "nul \x00", "lone \udcff", "ü ✓ 𝄞"]),
)
stamps = st.one_of(
    st.just(ISO),
    st.just(ISO),
    st.just(ISO),
    st.sampled_from(["2026-05-19T10:00:00Z", "2026-05-19T12:00:00+02:00", "2026-05-19 10:00",
                     "1779184800000", "yesterday", "2026-13-45T10:00:00.000000Z"]),
    st.integers(min_value=0, max_value=2**53),
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


often = st.sampled_from([True] * 7 + [False])  # uniform, unlike small integers
rarely = st.sampled_from([False] * 5 + [True])


@st.composite
def records(draw: st.DrawFn, members: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A record's JSON object: its members (each maybe missing), maybe unknown ones."""
    record = {name: draw(values) for name, values in members.items() if draw(often)}
    if draw(rarely):
        record.update(draw(st.dictionaries(texts, json_values, max_size=2)))
    if draw(rarely):
        record["metadata"] = draw(json_values)
    return record


@st.composite
def encoded(draw: st.DrawFn, record: dict[str, Any]) -> bytes:
    """The record as a legacy app may have written it, or broken on the way."""
    text = json.dumps(
        record,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    how = draw(st.sampled_from(range(12)))
    if how == 0 and record:  # a member twice, with the same value
        name = draw(st.sampled_from(sorted(record)))
        text = text[:-1] + f",{json.dumps(name)}:{json.dumps(record[name])}}}"
    elif how == 1:
        text = draw(st.sampled_from([" ", "\n"])) + text
    elif how == 2:
        text = text[: draw(st.integers(0, len(text)))]
    raw = text.encode("utf-8", "surrogatepass")
    if how == 3:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\x00"])) + raw[at:]
    return raw


MESSAGE = {
    "id": texts, "role": st.sampled_from(["user", "assistant", "", "x" * 70]) | texts,
    "content": texts, "ts": stamps, "tool_call_id": st.none() | texts | st.integers(),
}
TOOL_RUN = {
    "name": texts, "args": json_values,
    "status": st.sampled_from(["pending", "running", "retrying", "succeeded", "failed", "x"]),
    "attempts": st.integers(min_value=-2, max_value=2**63) | texts,
    "last_error": st.none() | texts, "updated_at": stamps,
}


def outcome(read: Any) -> tuple[str, Any]:
    try:
        return "ok", read()
    except ValidationError as exc:
        return "error", str(exc)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), count=st.integers(1, 4))
def test_a_transcript_reads_as_its_messages_read_one_by_one(
    data: st.DataObject, count: int
) -> None:
    raws = [data.draw(records(MESSAGE).flatmap(encoded)) for _ in range(count)]

    whole = outcome(lambda: LAYOUT.decode(SID, [{}, raws, {}, None, None, [], -1]))

    singles = [outcome(lambda i=i, raw=raw: LAYOUT.message_from_reply(SID, i, raw))
               for i, raw in enumerate(raws)]
    bad = next((i for i, (kind, _) in enumerate(singles) if kind == "error"), None)
    if bad is None:
        assert whole[0] == "ok" and whole[1] is not None
        assert list(whole[1].messages) == [message for _, message in singles]
    else:  # the same error, for the same record (found by index rather than seq)
        assert whole[0] == "error"
        assert whole[1] == singles[bad][1].replace(f"seq {bad}", f"index {bad}", 1)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), count=st.integers(1, 2))
def test_tool_runs_read_as_they_read_one_by_one(data: st.DataObject, count: int) -> None:
    names = data.draw(st.lists(st.sampled_from([b"c1", b"c2", b"status", b"\xffc", b"c\x00"]),
                               min_size=count, max_size=count, unique=True))
    pairs = {name: data.draw(records(TOOL_RUN).flatmap(encoded)) for name in names}

    whole = outcome(lambda: LAYOUT.decode(SID, [{}, [], pairs, None, None, [], -1]))

    singles: dict[bytes, tuple[str, Any]] = {}
    for name, raw in pairs.items():
        try:
            call = name.decode("utf-8")
        except UnicodeDecodeError:
            singles[name] = ("error", None)
            continue
        singles[name] = outcome(
            lambda call=call, raw=raw: LAYOUT.tool_run_from_reply(SID, call, raw)
        )
    if all(kind == "ok" for kind, _ in singles.values()):
        assert whole[0] == "ok" and whole[1] is not None
        assert list(whole[1].tool_runs) == sorted(
            (run for _, run in singles.values()), key=lambda run: run.tool_call_id
        )
    else:
        assert whole[0] == "error"


def test_plain_events_read_as_their_fields_say() -> None:
    entries = [
        (b"1-0", {b"type": b"status", b"from": b"active", b"to": b"paused", b"at": ISO.encode(),
                  b"data": b'{"why": "lunch"}'}),
        (b"2-0", {b"type": b"status", b"from": b"paused", b"to": b"active",
                  b"at": b"1779184801000"}),
    ]

    state = LAYOUT.decode(SID, [{}, [], {}, None, None, entries, -1])

    assert state is not None
    assert [e.model_dump(mode="json") for e in state.events] == [
        Event(event_seq=0, type="status", from_status="active", to_status="paused",
              at=ISO, data={"why": "lunch"}).model_dump(mode="json"),
        Event(event_seq=1, type="status", from_status="paused", to_status="active",
              at="2026-05-19T10:00:01Z").model_dump(mode="json"),
    ]


def test_an_event_that_is_not_plain_is_read_the_general_way() -> None:
    entries = [
        (b"1-0", {b"type": b"status", b"at": ISO.encode(), b"who": b"ops"}),
        (b"2-0", {b"type": b"status", b"at": ISO.encode(), b"data": b" [1] "}),
    ]

    try:
        LAYOUT.decode(SID, [{}, [], {}, None, None, entries, -1])
    except ValidationError as exc:
        assert "entry 1" in str(exc) and "data" in str(exc)
    else:
        raise AssertionError("event data that is not an object was accepted")


def test_a_plain_looking_record_with_a_member_twice_is_refused() -> None:
    run = (b'{"name":"search","args":{},"status":"running","attempts":1,"last_error":null,'
           b'"updated_at":"' + ISO.encode() + b'","status":"running"}')
    message = b'{"id":"m0","role":"user","content":"hi","ts":"' + ISO.encode() + b'","id":"m0"}'

    cases: list[list[Any]] = [[{}, [], {b"c1": run}, None, None, [], -1],
                              [{}, [message], {}, None, None, [], -1]]
    for replies in cases:
        try:
            LAYOUT.decode(SID, replies)
        except ValidationError as exc:
            assert "appears twice" in str(exc)
        else:
            raise AssertionError("a record with a member twice was accepted")
