"""The langchain layout: LangChain's RedisChatMessageHistory keys, and in PostgreSQL
langchain-postgres' PostgresChatMessageHistory table kept from the truth.

- :mod:`.layout`: the Redis side (one LIST per session, newest first).
- :mod:`.messages`: LangChain's message dicts and memshift messages, each into the other.
- :mod:`.projection`: the PostgreSQL side (the chat history table and the session
  UUID mapping).

The application needs :func:`session_uuid` when it switches to
``PostgresChatMessageHistory``, whose session ids must be UUIDs.
"""

from memshift.stores.layouts.langchain.layout import DEFAULT_PREFIX, LangChainLayout, NotInLayout
from memshift.stores.layouts.langchain.projection import (
    DEFAULT_TABLE,
    Projection,
    ProjectionError,
    install,
    installed,
    session_uuid,
    uninstall,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TABLE",
    "LangChainLayout",
    "NotInLayout",
    "Projection",
    "ProjectionError",
    "install",
    "installed",
    "session_uuid",
    "uninstall",
]
