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
- ``set_status`` (the primary's change): ``[applied, version, event_seq, from,
  session_fields, ttl_ms]`` with the session as it is afterwards, ``[missing]`` or
  ``[illegal, current]``.
- ``apply_status_change`` (a replicated change): ``[outcome]`` or
  ``[gap, next_event_seq]`` when the event would leave a gap (nothing written).
- any script: ``[invalid, key, field, what]`` when a stored value it must compare
  cannot be read; nothing was written.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from memshift.model import Message, Session, StatusChange, ToolRun
from memshift.stores.layouts import Layout, ScriptCall


@runtime_checkable
class ScriptedLayout(Layout, Protocol):
    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        """The session record from its stored fields (and TTL) as a reply carries them."""
        ...

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

    def apply_status_change(self, change: StatusChange, ttl_ms: int) -> ScriptCall:
        """Replicate a status change that the primary made (event and session snapshot)."""
        ...
