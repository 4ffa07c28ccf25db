"""The lane reads a session's other parts (hash, tool runs, summary, checkpoint,
events) without pydantic only when the layout would read them to the same records."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson
from hypothesis import event, given, settings
from hypothesis import strategies as st

from memshift.errors import ValidationError
from memshift.migrate.bulk import COLUMNS, _other_parts, copy_text
from memshift.migrate.lane import lean_parts
from memshift.model import SessionState
from memshift.stores.layouts.reference import ReferenceLayout
from tests.unit.test_reference_decode_paths import (
    ISO,
    TOOL_RUN,
    encoded,
    json_values,
    records,
    stamps,
    texts,
)

SID = "s1"
LAYOUT = ReferenceLayout()



def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """``good`` eleven times in twelve: a record has many members, and each may be
    wrong, so that this still leaves many records (and whole sessions) right."""
    return st.one_of(*[good] * 11, other)


# Records mostly valid (so that many take the lane), or wrong in one way or another.
TOOL = {"name": mostly(st.just("web_search"), TOOL_RUN["name"]),
        "args": mostly(st.just({"q": "ü"}), json_values),
        "status": mostly(st.sampled_from(["running", "failed"]), TOOL_RUN["status"]),
        "attempts": mostly(st.integers(0, 3), TOOL_RUN["attempts"]),
        "last_error": mostly(st.none(), TOOL_RUN["last_error"]),
        "updated_at": mostly(st.just(ISO), stamps)}
SUMMARY = {"version": mostly(st.integers(1, 3), st.integers(-1, 0) | texts),
           "text": mostly(st.just("sum"), texts),
           "covers_through": mostly(st.integers(-1, 5), st.just(-2)),
           "updated_at": mostly(st.just(ISO), stamps)}
CHECKPOINT = {"checkpoint_id": mostly(st.just("ck1"), texts),
              "parent_id": mostly(st.none(), texts),
              "step": mostly(st.integers(0, 3), st.just(-1) | texts),
              "state": mostly(st.just({"a": [1]}), json_values),
              "created_at": mostly(st.just(ISO), stamps)}


@st.composite
def written(draw: st.DrawFn, members: dict[str, st.SearchStrategy[Any]]) -> bytes:
    """A record as memshift writes it (compact JSON, no ASCII escapes), or otherwise."""
    record = {name: draw(values) for name, values in members.items()}
    if draw(RARE):
        record = draw(records(members))  # members missing, unknown ones, metadata
    if not draw(RARE):
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")
    return draw(encoded(record))


def text_value(values: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return mostly(values.map(lambda v: v.encode("utf-8", "surrogatepass")),
                  st.sampled_from([b"\xff", b"a\x00"]))


HASH = st.fixed_dictionaries(
    {b"created_at": text_value(mostly(st.just(ISO), stamps.map(str))),
     b"updated_at": text_value(mostly(st.just(ISO), st.just("2026-05-19T12:00:00+02:00")))},
    optional={
        b"status": text_value(mostly(st.just("paused"), st.sampled_from(["active", "done"]))),
        b"version": text_value(mostly(st.just("7"), st.sampled_from(
            ["0", "-1", "x", str(2**62), str(2**62 + 1), "\u0663"]))),
        b"messages_trimmed": text_value(st.sampled_from(["0", "3"])),
        b"tenant_id": text_value(mostly(st.just("t1"), texts)),
        b"user_id": text_value(mostly(st.just("u1"), texts)),
        b"metadata": mostly(st.just(b'{"m":1}'), json_values.map(
            lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "surrogatepass"))),
        b"expires_at": text_value(st.just(ISO)), b"other": text_value(texts),
    },
)
EVENT = st.fixed_dictionaries(
    {b"at": text_value(mostly(st.just(ISO), stamps.map(str)))},
    optional={b"type": text_value(mostly(st.just("status"), st.just("") | texts)),
              b"from": text_value(st.sampled_from(["active", ""])),
              b"to": text_value(st.sampled_from(["paused"])),
              b"data": mostly(st.sampled_from([b"{}", b'{"why":"x"}']), st.sampled_from(
                  [b"[]", b'{"a":1,"a":2}', b'{"n":NaN}', b"{ }", b'{"a":1e16}'])),
              b"extra": text_value(texts)},
)
RARE = st.sampled_from([False] * 6 + [True])


_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def copy_values(text: str) -> list[list[str | None]]:
    """COPY text read back as PostgreSQL reads it: rows of fields, ``\\N`` as None,
    backslash escapes undone (the lane may send JSON's escapes, which COPY shares, as
    they are, where ``memshift.migrate.bulk`` escapes only what it must: the texts
    may differ, the values must not)."""
    rows: list[list[str | None]] = []
    for line in text.split("\n")[:-1]:
        fields: list[str | None] = []
        for field in line.split("\t"):
            if field == "\\N":
                fields.append(None)
                continue
            out, i = [], 0
            while i < len(field):
                char = field[i]
                if char == "\\":
                    follower = field[i + 1]
                    assert not follower.isdigit() and follower != "x", field  # never sent
                    out.append(_COPY_ESCAPES.get(follower, follower))
                    i += 2
                else:
                    out.append(char)
                    i += 1
            fields.append("".join(out))
        rows.append(fields)
    return rows


_JSON_COLUMNS = {"args", "metadata", "state", "data"}


def stored(table: str, text: str) -> list[list[Any]]:
    """The rows of COPY text as PostgreSQL stores them: times as instants, JSON as
    values (jsonb keeps no spelling)."""
    rows = []
    for fields in copy_values(text):
        row: list[Any] = []
        for name, value in zip(COLUMNS[table][: len(fields)], fields, strict=True):
            if value is not None and (name == "at" or name.endswith("_at")):
                row.append(datetime.fromisoformat(value))
            elif value is not None and name in _JSON_COLUMNS:
                row.append(json.loads(value))
            else:
                row.append(value)
        rows.append(row)
    return rows


def assert_same_rows(lean: Any, state: SessionState) -> None:
    """What the lane made is what encoding the layout's records makes."""
    session, parts, event_count = lean
    assert session == state.session
    assert event_count == len(state.events)
    expected = _other_parts(copy_text(state.session_id), state)
    for table, got, want in zip(COLUMNS_OTHER, parts, expected, strict=True):
        assert stored(table, got) == stored(table, want), table


COLUMNS_OTHER = ("tool_runs", "summaries", "checkpoints", "events")


def outcome(replies: list[Any]) -> tuple[str, Any]:
    try:
        return "ok", LAYOUT.decode(SID, replies)
    except ValidationError as exc:
        return "error", str(exc)


@settings(max_examples=1000, deadline=None)
@given(fields=HASH, tools=st.dictionaries(mostly(st.sampled_from([b"c1", b"c2"]),
                                                 st.sampled_from([b"\xff", b"", b"c\x00"])),
                                          written(TOOL), max_size=2),
       summary=st.none() | written(SUMMARY), checkpoint=st.none() | written(CHECKPOINT),
       events=st.lists(st.tuples(st.sampled_from([b"1-0", b"2-0"]), EVENT), max_size=2))
def test_the_lane_reads_the_other_parts_as_the_layout_does_or_leaves_them_to_it(
    fields: dict[bytes, bytes], tools: dict[bytes, bytes], summary: bytes | None,
    checkpoint: bytes | None, events: list[tuple[bytes, dict[bytes, bytes]]],
) -> None:
    lean = lean_parts(SID, fields, tools, summary, checkpoint, events, -1)
    expected = outcome([fields, [], tools, summary, checkpoint, events, -1])

    event("lean" if lean is not None else f"layout ({expected[0]})")
    if lean is not None:
        assert expected[0] == "ok", expected
        assert_same_rows(lean, expected[1])


def test_what_memshift_writes_takes_the_lane() -> None:
    tool = {"name": "web_search", "args": {"q": "ü", "n": [1, 2.5, None]}, "status": "failed",
            "attempts": 3, "last_error": "boom\n", "updated_at": ISO}
    fields = {b"tenant_id": b"t1", b"user_id": b"u\xc3\xbc", b"status": b"paused",
              b"version": b"9", b"created_at": ISO.encode(), b"updated_at": ISO.encode(),
              b"messages_trimmed": b"2", b"metadata": orjson.dumps({"model": "x", "d": {}})}
    summary = orjson.dumps({"version": 2, "text": "sum", "covers_through": 5, "updated_at": ISO})
    checkpoint = orjson.dumps({"checkpoint_id": "ck2", "parent_id": "ck1", "step": 2,
                               "state": {"plan": ["a"]}, "created_at": ISO})
    events = [(b"1-0", {b"type": b"status", b"from": b"active", b"to": b"paused",
                        b"at": ISO.encode(), b"data": b"{}"})]
    replies = [fields, [], {b"c2": orjson.dumps(tool), b"c1": orjson.dumps(tool)}, summary,
               checkpoint, events, 60_000]

    lean = lean_parts(SID, *[r for i, r in enumerate(replies) if i != 1])
    expected = LAYOUT.decode(SID, replies)

    assert lean is not None and expected is not None
    lean_expiry, expiry = lean[0].expires_at, expected.session.expires_at
    assert lean_expiry is not None and expiry is not None
    assert abs((lean_expiry - expiry).total_seconds()) < 5
    fixed = expected.model_copy(
        update={"session": expected.session.model_copy(update={"expires_at": lean_expiry})})
    assert_same_rows(lean, fixed)
    assert [row[1] for row in stored("tool_runs", lean[1][0])] == ["c1", "c2"]


def test_json_that_jsonb_cannot_store_is_left_to_the_layout() -> None:
    """orjson reads a NUL in a string, and nesting past the model's limit, without a
    word: the lane leaves those records to the layout, which refuses them by name."""
    from memshift.model import MAX_JSON_DEPTH

    deep: Any = {}
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"d": deep}
    nul = {"x": "a\x00b"}
    tool = {"name": "t", "args": nul, "status": "running", "attempts": 1, "last_error": None,
            "updated_at": ISO}
    base = {b"created_at": ISO.encode(), b"updated_at": ISO.encode()}
    cases = {
        "metadata": ({**base, b"metadata": orjson.dumps(nul)}, {}, None, None, []),
        "args": (base, {b"c1": orjson.dumps(tool)}, None, None, []),
        "state": (base, {}, None, orjson.dumps({"checkpoint_id": "c", "step": 1, "state": deep,
                                                "created_at": ISO}), []),
        "data": (base, {}, None, None, [(b"1-0", {b"at": ISO.encode(),
                                                   b"data": orjson.dumps(nul)})]),
    }
    for name, (fields, tools, summary, checkpoint, events) in cases.items():
        assert lean_parts(SID, fields, tools, summary, checkpoint, events, -1) is None, name
        kind, _ = outcome([fields, [], tools, summary, checkpoint, events, -1])
        assert kind == "error", name


def test_members_left_out_take_the_models_defaults() -> None:
    base = {b"created_at": ISO.encode(), b"updated_at": ISO.encode()}
    tools = {b"c1": orjson.dumps({"name": "t", "updated_at": ISO})}
    summary = orjson.dumps({"version": 1, "text": "s", "updated_at": ISO})
    checkpoint = orjson.dumps({"checkpoint_id": "k", "step": 0, "created_at": ISO})
    events = [(b"1-0", {b"at": ISO.encode()})]

    lean = lean_parts(SID, base, tools, summary, checkpoint, events, -1)
    kind, state = outcome([base, [], tools, summary, checkpoint, events, -1])

    assert lean is not None and kind == "ok"
    assert_same_rows(lean, state)
    assert state.summaries[0].covers_through == -1 and state.events[0].type == "status"


def test_a_checkpoint_that_is_its_own_parent_is_left_to_the_layout() -> None:
    """The model refuses a checkpoint that names itself as its parent (a rule of the
    record as a whole, not of one member): the lane leaves it to the layout, which
    says so, and the backfill quarantines the session with that reason."""
    from memshift.migrate.lane import BackfillLayout

    base = {b"created_at": ISO.encode(), b"updated_at": ISO.encode()}
    checkpoint = orjson.dumps({"checkpoint_id": "k", "parent_id": "k", "step": 1,
                               "created_at": ISO})
    message = orjson.dumps({"id": "m0", "role": "user", "content": "hi", "ts": ISO})

    assert lean_parts(SID, base, {}, None, checkpoint, [], -1) is None
    try:
        BackfillLayout().decode(SID, [base, [message], {}, None, checkpoint, [], -1])
    except ValidationError as exc:
        assert "names itself as its parent" in str(exc)
    else:
        raise AssertionError("a self-parented checkpoint was read")
