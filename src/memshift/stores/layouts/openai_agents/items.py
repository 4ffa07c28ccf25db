"""OpenAI Agents SDK session items and memshift messages, each into the other.

The SDK stores each item (a ``TResponseInputItem``: ``{"role": "user", "content":
...}``, ``{"type": "function_call", "call_id", "name", "arguments"}``,
``{"type": "function_call_output", "call_id", "output"}``, reasoning items, ...) as
its JSON. memshift keeps it as a :class:`~memshift.model.Message`:

================  ===============================================================
Message field     from the item
================  ===============================================================
``role``          ``role`` when the item has one, else ``type``
``content``       the item's text: ``content``, else ``output``, else
                  ``arguments`` (the first it has); a value that is not text as
                  canonical JSON text; ``""`` when it has none of them
``tool_call_id``  ``call_id`` when it is non-empty text
``metadata``      ``{"openai_agents": {"item": the item without its text member,
                  "text": which member the text came from, "text_json"?: true}}``
``message_id``    ``oa-{seq}``: items are sent to the model as they are, so
                  memshift cannot keep an id of its own in them; the place is the id
``ts``            the Unix epoch (1970-01-01T00:00:00Z): items carry no time
================  ===============================================================

So the item comes back exactly (:func:`to_item`), and PostgreSQL builds the same
item from the same fields in ``projection.sql`` (``memshift.openai_agents_item``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from memshift.model import Message

__all__ = ["EPOCH", "KEPT", "TEXT_MEMBERS", "fields_from_item", "item_id", "to_item"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEPT = "openai_agents"  # the metadata member that keeps the rest of the item
# Where an item keeps its text, in the order they are looked for.
TEXT_MEMBERS = ("content", "output", "arguments")
_MAX_ROLE = 64


def item_id(seq: int) -> str:
    """The message id of the item at ``seq``."""
    return f"oa-{seq}"


def canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def fields_from_item(item: Any, seq: int) -> dict[str, Any]:
    """The Message fields of one stored item; ValueError saying what is wrong if not one."""
    if type(item) is not dict:
        raise ValueError(f"is JSON {type(item).__name__}, expected an item object")
    role = item.get("role") if isinstance(item.get("role"), str) else item.get("type")
    if not isinstance(role, str) or not 0 < len(role) <= _MAX_ROLE:
        raise ValueError("has neither a 'role' nor a 'type' of text (at most 64 characters)")
    member = next((name for name in TEXT_MEMBERS if name in item), None)
    kept: dict[str, Any] = {"item": {k: v for k, v in item.items() if k != member}}
    text = ""
    if member is not None:
        kept["text"] = member
        value = item[member]
        if isinstance(value, str):
            text = value
        else:
            text = canonical(value)
            kept["text_json"] = True
    call = item.get("call_id")
    return {
        "seq": seq,
        "message_id": item_id(seq),
        "role": role,
        "content": text,
        "ts": EPOCH,
        "tool_call_id": call if isinstance(call, str) and call else None,
        "metadata": {KEPT: kept},
    }


def to_item(message: Message) -> dict[str, Any]:
    """The item the SDK stored for ``message`` (a message from elsewhere as role+content)."""
    kept = message.metadata.get(KEPT)
    if type(kept) is not dict or type(kept.get("item")) is not dict:
        return {"role": message.role, "content": message.content}
    item: dict[str, Any] = dict(kept["item"])
    member = kept.get("text")
    if isinstance(member, str):
        item[member] = json.loads(message.content) if kept.get("text_json") is True \
            else message.content
    return item


def to_json(message: Message) -> str:
    """The Redis list entry for ``message``, as the SDK's RedisSession writes one."""
    return json.dumps(to_item(message))
