"""The llamaindex layout: LlamaIndex's RedisChatStore keys, and in PostgreSQL
llama-index-storage-chat-store-postgres' PostgresChatStore table kept from the truth.

- :mod:`.layout`: the Redis side (one LIST per chat key, oldest first).
- :mod:`.messages`: LlamaIndex's ChatMessage JSON and memshift messages, each into
  the other.
- :mod:`.projection`: the PostgreSQL side (the chat store table and the key mapping).

After cutover the application gives ``PostgresChatStore`` the same keys it gave
``RedisChatStore``.
"""

from memshift.stores.layouts.llamaindex.layout import LlamaIndexLayout, NotInLayout
from memshift.stores.layouts.llamaindex.projection import (
    DEFAULT_TABLE,
    Projection,
    ProjectionError,
    install,
    installed,
    uninstall,
)

__all__ = [
    "DEFAULT_TABLE",
    "LlamaIndexLayout",
    "NotInLayout",
    "Projection",
    "ProjectionError",
    "install",
    "installed",
    "uninstall",
]
