"""LlamaIndex's stored ChatMessage JSON and memshift messages, each into the other.

``RedisChatStore`` stores a message as ``ChatMessage.model_dump_json()``:
``{"role": R, "additional_kwargs": {...}, "blocks": [{"block_type": "text", "text":
T}, ...]}``; llama-index-core before 0.12 wrote ``"content": T`` instead of
``blocks``, and ``ChatMessage`` still reads both. memshift keeps it as a
:class:`~memshift.model.Message`:

=================  ==============================================================
Message field      from the JSON object
=================  ==============================================================
``role``           ``R`` (``user``, ``assistant``, ``system``, ``tool``, ...)
``content``        the text of a single text block; ``""`` for no blocks; the
                   blocks as canonical JSON text when there are several, or other
                   kinds (images, tool calls); ``content`` of the older form
``tool_call_id``   ``additional_kwargs["tool_call_id"]`` when it is non-empty text
``metadata``       ``{"llamaindex": {"data": the object without role, blocks,
                   content, "content": how content maps back (below)}}``
``message_id``     memshift's own id, kept beside the object as ``"memshift":
                   {"id", "ts"}`` when memshift wrote the message; for a message
                   LlamaIndex wrote, ``li-{seq}`` (LlamaIndex keeps no id)
``ts``             ``memshift.ts``; LlamaIndex records no time, so a message it
                   wrote has the Unix epoch (1970-01-01T00:00:00Z), meaning "unknown"
=================  ==============================================================

How ``content`` maps back (``metadata.llamaindex.content``): ``text`` (one text
block), ``none`` (no blocks), ``blocks`` (``content`` is the blocks' JSON),
``legacy`` (the older ``"content": T``) or ``legacy-null`` (``"content": null``).

So the object comes back exactly (:func:`to_dict`), and PostgreSQL builds the same
object from the same fields in ``projection.sql`` (``memshift.llamaindex_message``);
a test checks that the two agree.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from memshift.model import Message
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp

__all__ = ["EPOCH", "ROLES", "fields_from_dict", "legacy_id", "to_dict", "to_json"]

# llama_index.core.base.llms.types.MessageRole: what ChatMessage accepts as a role.
ROLES = frozenset({
    "system", "developer", "user", "assistant", "function", "tool", "chatbot", "model",
})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OWN = "memshift"  # the member memshift adds beside LlamaIndex's own
_SHAPES = frozenset({"text", "none", "blocks", "legacy", "legacy-null"})


def legacy_id(seq: int) -> str:
    """The id of a message that LlamaIndex (not memshift) wrote at ``seq``."""
    return f"li-{seq}"


def canonical(value: Any) -> str:
    """JSON text that two equal values always share."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def fields_from_dict(entry: Any, seq: int) -> dict[str, Any]:
    """The Message fields of one stored object; ValueError saying what is wrong if not one."""
    if type(entry) is not dict:
        raise ValueError(f"is JSON {type(entry).__name__}, expected a ChatMessage object")
    role = entry.get("role")
    if role not in ROLES:
        raise ValueError(
            f"member 'role' is {role!r}, expected one of {', '.join(sorted(ROLES))}"
        )
    extra = entry.get("additional_kwargs", {})
    if type(extra) is not dict:
        raise ValueError(f"member 'additional_kwargs' is {type(extra).__name__}, "
                         "expected an object")
    text, shape = _content(entry)
    data = {k: v for k, v in entry.items() if k not in ("role", "blocks", "content", OWN)}
    message_id, ts = _own(entry.get(OWN), seq)
    call = extra.get("tool_call_id")
    return {
        "seq": seq,
        "message_id": message_id,
        "role": role,
        "content": text,
        "ts": ts,
        "tool_call_id": call if isinstance(call, str) and call else None,
        "metadata": {"llamaindex": {"data": data, "content": shape}},
    }


def _content(entry: dict[str, Any]) -> tuple[str, str]:
    if "blocks" not in entry:
        content = entry.get("content")
        if content is None:
            return "", "legacy-null"
        if not isinstance(content, str):
            raise ValueError(f"member 'content' is {type(content).__name__}, expected text")
        return content, "legacy"
    blocks = entry["blocks"]
    if type(blocks) is not list:
        raise ValueError(f"member 'blocks' is {type(blocks).__name__}, expected a list")
    if not blocks:
        return "", "none"
    first = blocks[0]
    if (len(blocks) == 1 and type(first) is dict and first.keys() == {"block_type", "text"}
            and first["block_type"] == "text" and isinstance(first["text"], str)):
        return first["text"], "text"
    return canonical(blocks), "blocks"


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
    """The object LlamaIndex stores for ``message`` (what ``model_dump_json`` gave)."""
    kept = message.metadata.get("llamaindex")
    if type(kept) is dict and type(kept.get("data")) is dict and kept.get("content") in _SHAPES:
        data: dict[str, Any] = kept["data"]
        shape: str = kept["content"]
    else:
        # A message memshift received through its own API, not from LlamaIndex.
        extra = {} if message.tool_call_id is None else {"tool_call_id": message.tool_call_id}
        data, shape = {"additional_kwargs": extra}, "text"
    body: dict[str, Any]
    if shape == "text":
        body = {"blocks": [{"block_type": "text", "text": message.content}]}
    elif shape == "none":
        body = {"blocks": []}
    elif shape == "blocks":
        body = {"blocks": json.loads(message.content)}
    elif shape == "legacy":
        body = {"content": message.content}
    else:
        body = {"content": None}
    return {"role": message.role, **data, **body}


def to_json(message: Message) -> str:
    """The Redis list entry for ``message``: LlamaIndex's JSON, plus memshift's id and time.

    Written compact, as pydantic's ``model_dump_json`` writes it, so RedisChatStore
    reads it as ever. A message that LlamaIndex itself wrote goes back without the
    ``memshift`` member: its id and time follow from its place, as they did.
    """
    entry = to_dict(message)
    if message.seq is None or (message.message_id, message.ts) != (legacy_id(message.seq), EPOCH):
        entry[OWN] = {"id": message.message_id, "ts": format_timestamp(message.ts)}
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
