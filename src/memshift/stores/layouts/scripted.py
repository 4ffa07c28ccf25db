"""What a Redis store needs from a layout beyond :class:`Layout`: reading script replies.

Every guarded write of a layout is one Lua script (loaded once, called by SHA) that
replies with a list whose first element says what happened. The store interprets
the reply; the layout decodes the records a reply carries, because only the layout
knows how it encodes them. Replies, by script:

- ``save_session``, ``put_summary``, ``put_checkpoint``: ``[outcome]`` with outcome
  ``applied``, ``unchanged`` or ``stale``.
- ``append_message``: ``[appended, seq]``, ``[duplicate, seq, stored]``,
  ``[trimmed, seq]`` (below the trimmed part, cannot be checked: taken as a
  duplicate), ``[conflict, seq, stored, reason]`` (reason ``content`` or ``id``) or
  ``[gap, next_seq]``.
- ``upsert_tool_run``: ``[applied | unchanged, merged]`` or ``[compare, stored]`` when
  the script cannot order the two records itself; the store then merges in Python
  and writes the result only if the stored record is still ``stored``
  (:meth:`ScriptedLayout.replace_tool_run`), looping while it keeps changing.
- ``set_status``: ``[applied | stale, version, event_seq, from]``, ``[missing]``,
  ``[illegal, current]`` or ``[gap, next_event_seq]``.
- any script: ``[invalid, key, field, what]`` when a stored value it must compare
  cannot be read; nothing was written.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from memshift.model import Message, ToolRun
from memshift.stores.layouts import Layout, ScriptCall


@runtime_checkable
class ScriptedLayout(Layout, Protocol):
    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        """The stored message a reply carries (raise ValidationError naming the key)."""
        ...

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        """The stored tool run a reply carries (raise ValidationError naming the key)."""
        ...

    def replace_tool_run(
        self, session_id: str, run: ToolRun, expected: bytes, merged: ToolRun, ttl_ms: int
    ) -> ScriptCall:
        """``upsert_tool_run`` that writes ``merged`` if the stored record is ``expected``."""
        ...
