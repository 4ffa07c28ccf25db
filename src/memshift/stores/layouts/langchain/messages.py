"""LangChain's stored message dicts and memshift messages, each into the other.

LangChain stores a message as ``message_to_dict(message)``: ``{"type": T, "data": D}``
where ``D`` is the message's fields (``content``, ``additional_kwargs``,
``tool_calls``, ``tool_call_id``, ``id``, ...). memshift keeps it as a
:class:`~memshift.model.Message`:

=================  ==============================================================
Message field      from the dict
=================  ==============================================================
``role``           ``T`` (``human``, ``ai``, ``system``, ``tool``, ...)
``content``        ``D["content"]`` when it is text; a list of content blocks as
                   canonical JSON text (and ``content_json`` below)
``tool_call_id``   ``D["tool_call_id"]`` when it is non-empty text (tool messages)
``metadata``       ``{"langchain": {"data": D without content, "content_json"?: true,
                   "members"?: {other top-level members}}}``
``message_id``     memshift's own id, kept beside the dict as ``"memshift": {"id",
                   "ts"}`` when memshift wrote the message; for a message that
                   LangChain wrote, ``lc-{seq}``: LangChain's own ``id`` is often
                   null and may repeat, so it stays in ``data`` and is not used
``ts``             ``memshift.ts``; LangChain records no time, so a message it wrote
                   has the Unix epoch (1970-01-01T00:00:00Z), meaning "unknown"
=================  ==============================================================

So the dict comes back exactly (:func:`to_dict`), and PostgreSQL builds the same
dict from the same fields in ``projection.sql`` (``memshift.langchain_message``);
a test checks that the two agree.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from memshift.model import Message
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp

__all__ = ["EPOCH", "LANGCHAIN_TYPES", "fields_from_dict", "legacy_id", "to_dict", "to_json"]

# The types langchain_core.messages.messages_from_dict reads.
LANGCHAIN_TYPES = frozenset({
    "human", "ai", "system", "chat", "function", "tool", "remove", "AIMessageChunk",
    "HumanMessageChunk", "FunctionMessageChunk", "ToolMessageChunk", "SystemMessageChunk",
    "ChatMessageChunk",
})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OWN = "memshift"  # the member memshift adds beside "type" and "data"
_MAX_ROLE = 64


def legacy_id(seq: int) -> str:
    """The id of a message that LangChain (not memshift) wrote at ``seq``."""
    return f"lc-{seq}"


def canonical(value: Any) -> str:
    """JSON text that two equal values always share (content blocks as text)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def fields_from_dict(entry: Any, seq: int) -> dict[str, Any]:
    """The Message fields of one stored dict; ValueError saying what is wrong if not one."""
    if type(entry) is not dict:
        raise ValueError(
            f"is JSON {type(entry).__name__}, expected an object with 'type' and 'data'"
        )
    kind, data = entry.get("type"), entry.get("data")
    if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_ROLE:
        raise ValueError(f"member 'type' is {kind!r}, expected a message type such as 'human'")
    if type(data) is not dict:
        raise ValueError(f"member 'data' is {type(data).__name__}, expected an object")
    if "content" not in data:
        raise ValueError("member 'data' has no 'content'")
    content = data["content"]
    kept: dict[str, Any] = {"data": {k: v for k, v in data.items() if k != "content"}}
    if isinstance(content, list):
        text = canonical(content)
        kept["content_json"] = True
    elif isinstance(content, str):
        text = content
    else:
        raise ValueError(
            f"member 'data.content' is {type(content).__name__}, expected text or a list "
            "of content blocks"
        )
    members = {k: v for k, v in entry.items() if k not in ("type", "data", OWN)}
    if members:
        kept["members"] = members
    message_id, ts = _own(entry.get(OWN), seq)
    call = data.get("tool_call_id")
    return {
        "seq": seq,
        "message_id": message_id,
        "role": kind,
        "content": text,
        "ts": ts,
        "tool_call_id": call if isinstance(call, str) and call else None,
        "metadata": {"langchain": kept},
    }


def _own(own: Any, seq: int) -> tuple[str, datetime]:
    if own is None:
        return legacy_id(seq), EPOCH
    if type(own) is not dict or not isinstance(own.get("id"), str) or "ts" not in own:
        raise ValueError(f"member {OWN!r} is {own!r}, expected an object with 'id' and 'ts'")
    try:
        return own["id"], parse_timestamp(own["ts"])
    except ValueError as exc:
        raise ValueError(f"member '{OWN}.ts': {exc}") from None


def to_dict(message: Message) -> dict[str, Any]:
    """The dict LangChain stores for ``message`` (what ``message_to_dict`` gave)."""
    kept = message.metadata.get("langchain")
    if type(kept) is dict and type(kept.get("data")) is dict:
        rest: dict[str, Any] = kept["data"]
        content: Any = message.content
        if kept.get("content_json") is True:
            content = json.loads(message.content)
        found = kept.get("members")
        members: dict[str, Any] = found if type(found) is dict else {}
    else:
        # A message memshift received through its own API, not from LangChain.
        rest = {"type": message.role}
        if message.tool_call_id is not None:
            rest = {**rest, "tool_call_id": message.tool_call_id}
        content, members = message.content, {}
    return {**members, "type": message.role, "data": {"content": content, **rest}}


def to_json(message: Message) -> str:
    """The Redis list entry for ``message``: LangChain's JSON, plus memshift's id and time.

    Written as LangChain writes it (``json.dumps`` defaults), so RedisChatMessageHistory
    reads it as ever. A message that LangChain itself wrote goes back without the
    ``memshift`` member: its id and time follow from its place, as they did.
    """
    entry = to_dict(message)
    if message.seq is None or (message.message_id, message.ts) != (legacy_id(message.seq), EPOCH):
        entry[OWN] = {"id": message.message_id, "ts": format_timestamp(message.ts)}
    return json.dumps(entry)
