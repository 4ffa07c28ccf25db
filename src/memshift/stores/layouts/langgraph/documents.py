"""RedisSaver's JSON documents and memshift's checkpoints and tool runs, one into the other.

A **checkpoint document** (``checkpoint:{thread}:{ns}:{id}``) becomes a
:class:`~memshift.model.Checkpoint`:

=================  ==============================================================
Checkpoint field   from the document
=================  ==============================================================
``checkpoint_id``  ``checkpoint_id``
``parent_id``      ``parent_checkpoint_id`` (none when empty)
``step``           the timestamp inside the checkpoint id, a UUID version 6
                   (100-ns ticks since 1582), so that memshift's latest (the
                   highest step, then id) is LangGraph's latest (the highest id),
                   after a fork (``update_state`` from an older checkpoint) too.
                   LangGraph's own step stays in the metadata.
``state``          ``checkpoint``: LangGraph's checkpoint as RedisSaver stored it,
                   channel values inline, as JSON
``created_at``     ``checkpoint.ts``
``metadata``       ``{"langgraph": {"thread_id", "checkpoint_ns", "metadata"}}``:
                   the thread and namespace as LangGraph knows them (``""``, not
                   ``__empty__``), and LangGraph's checkpoint metadata
=================  ==============================================================

A **write document** (``checkpoint_write:{thread}:{ns}:{id}:{task}:{idx}``), one
pending write of a checkpoint, becomes a :class:`~memshift.model.ToolRun`, since it
is what LangGraph resumes a failed or interrupted superstep from (a task's result
that need not run again, an error, an interrupt), and parity's
``tool_retry_state_matches`` then compares it:

=================  ==============================================================
ToolRun field      from the document
=================  ==============================================================
``tool_call_id``   ``{checkpoint_id}:{task_id}:{idx}``
``name``           ``channel``
``args``           ``{"type", "blob"}``: the serialised value as RedisSaver stored
                   it (``blob`` is base64)
``status``         ``failed`` for the ``__error__`` channel, else ``succeeded``
``updated_at``     the checkpoint's ``ts`` (a write carries no time of its own)
``metadata``       ``{"langgraph": {"thread_id", "checkpoint_ns", "checkpoint_id",
                   "task_id", "task_path", "idx"}}``
=================  ==============================================================

Values that PostgresSaver could not read back from JSON (RedisSaver's markers for
bytes, ``{"__bytes__": ...}``, and for a DeltaChannel snapshot,
``{"__delta_snapshot__": true}``) are refused with a reason, so that the thread is
quarantined rather than migrated wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from memshift.model import Checkpoint, ToolRun, parse
from memshift.stores.layouts.timestamps import parse_timestamp

__all__ = ["EMPTY_ID", "EMPTY_NS", "DocumentError", "checkpoint_from_document",
           "session_of", "uuid6_ticks", "write_from_document"]

EMPTY_NS = "__empty__"  # langgraph.checkpoint.redis.util.EMPTY_STRING_SENTINEL
EMPTY_ID = "00000000-0000-0000-0000-000000000000"  # EMPTY_ID_SENTINEL
ERROR_CHANNEL = "__error__"  # langgraph.checkpoint.base.ERROR
_UNREADABLE = {"__bytes__": "bytes", "__delta_snapshot__": "a DeltaChannel snapshot"}


class DocumentError(ValueError):
    """What is wrong with a document (the layout adds the session and key)."""


def uuid6_ticks(checkpoint_id: str) -> int:
    """The timestamp of a UUID version 6, in 100-ns ticks since 1582-10-15."""
    try:
        value = uuid.UUID(checkpoint_id)
    except ValueError:
        value = None
    if value is None or value.version != 6:
        raise DocumentError(
            f"checkpoint id {checkpoint_id!r} is not a UUID version 6 (what LangGraph makes "
            "its checkpoint ids of); memshift orders checkpoints by its timestamp"
        )
    number = value.int
    return ((number >> 80) << 12) | ((number >> 64) & 0x0FFF)


def session_of(thread_id: str, checkpoint_ns: str) -> str:
    """The memshift session id of a thread's namespace (storage-safe forms, as in keys)."""
    return thread_id if checkpoint_ns == EMPTY_NS else f"{thread_id}:{checkpoint_ns}"


def _text(doc: dict[str, Any], member: str, *, empty: bool = True) -> str:
    value = doc.get(member)
    if not isinstance(value, str) or (not empty and not value):
        raise DocumentError(f"member {member!r} is {value!r}, expected "
                            f"{'text' if empty else 'non-empty text'}")
    return value


def _document(text: Any) -> dict[str, Any]:
    try:
        raw = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DocumentError(f"is not valid UTF-8 at byte {exc.start}") from None
    except ValueError as exc:
        raise DocumentError(f"is not valid JSON ({exc})") from None
    if type(doc) is not dict:
        raise DocumentError(f"is JSON {type(doc).__name__}, expected an object")
    return doc


def _check_readable(value: Any, where: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            for marker, what in _UNREADABLE.items():
                if marker in item:
                    raise DocumentError(
                        f"{where} holds {what} (RedisSaver's {marker!r} marker), which "
                        "PostgresSaver cannot read back from JSON; memshift does not "
                        "convert it"
                    )
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


def checkpoint_from_document(session_id: str, text: Any, where: str) -> Checkpoint:
    """The checkpoint a document holds; DocumentError saying what is wrong if none."""
    doc = _document(text)
    thread, ns = _text(doc, "thread_id", empty=False), _text(doc, "checkpoint_ns", empty=False)
    if session_of(thread, ns) != session_id:
        raise DocumentError(
            f"belongs to thread {thread!r} namespace {ns!r}, not to session {session_id!r}"
        )
    checkpoint_id = _text(doc, "checkpoint_id", empty=False)
    parent = _text(doc, "parent_checkpoint_id")
    state = doc.get("checkpoint")
    if type(state) is not dict or type(state.get("channel_values")) is not dict:
        raise DocumentError("member 'checkpoint' is not an object with 'channel_values'")
    _check_readable(state["channel_values"], "checkpoint.channel_values")
    try:
        created = parse_timestamp(state.get("ts"))
    except ValueError as exc:
        raise DocumentError(f"member 'checkpoint.ts': {exc}") from None
    try:
        metadata = json.loads(_text(doc, "metadata"))
    except ValueError as exc:
        raise DocumentError(f"member 'metadata' is not JSON text ({exc})") from None
    if type(metadata) is not dict:
        raise DocumentError("member 'metadata' is not the JSON text of an object")
    record: Checkpoint = parse(Checkpoint, {
        "checkpoint_id": checkpoint_id,
        "parent_id": parent if parent and parent != EMPTY_ID else None,
        "step": uuid6_ticks(checkpoint_id),
        "state": state,
        "created_at": created,
        "metadata": {"langgraph": {
            "thread_id": "" if thread == EMPTY_ID else thread,
            "checkpoint_ns": "" if ns == EMPTY_NS else ns,
            "metadata": metadata,
        }},
    }, session_id=session_id, where=where)
    return record


def write_from_document(
    session_id: str, text: Any, checkpoint: Checkpoint, where: str
) -> ToolRun:
    """The pending write a document holds, for ``checkpoint``; DocumentError if none."""
    doc = _document(text)
    if doc.get("checkpoint_id") != checkpoint.checkpoint_id:
        raise DocumentError(f"names checkpoint {doc.get('checkpoint_id')!r}, but it is "
                            f"registered under {checkpoint.checkpoint_id!r}")
    task_id, channel = _text(doc, "task_id", empty=False), _text(doc, "channel", empty=False)
    kind, blob = _text(doc, "type", empty=False), _text(doc, "blob")
    idx = doc.get("idx")
    if type(idx) is not int:
        raise DocumentError(f"member 'idx' is {idx!r}, expected a whole number")
    task_path = doc.get("task_path", "")
    if not isinstance(task_path, str):
        raise DocumentError(f"member 'task_path' is {task_path!r}, expected text")
    _check_blob(kind, blob)
    lg = checkpoint.metadata["langgraph"]
    run: ToolRun = parse(ToolRun, {
        "tool_call_id": f"{checkpoint.checkpoint_id}:{task_id}:{idx}",
        "name": channel,
        "args": {"type": kind, "blob": blob},
        "status": "failed" if channel == ERROR_CHANNEL else "succeeded",
        "updated_at": checkpoint.created_at,
        "metadata": {"langgraph": {
            "thread_id": lg["thread_id"], "checkpoint_ns": lg["checkpoint_ns"],
            "checkpoint_id": checkpoint.checkpoint_id, "task_id": task_id,
            "task_path": task_path, "idx": idx,
        }},
    }, session_id=session_id, where=where)
    return run


def _check_blob(kind: str, blob: str) -> None:
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError("member 'blob' is not base64 (RedisSaver encodes every value "
                            "so)") from None
    if kind == "json":
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise DocumentError(f"member 'blob' of type json is not JSON ({exc})") from None
        _check_readable(value, "the write's value")

