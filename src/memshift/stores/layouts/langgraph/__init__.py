"""The langgraph layout: LangGraph's RedisSaver checkpointer keys, and in PostgreSQL
langgraph-checkpoint-postgres' PostgresSaver tables kept from the truth.

- :mod:`.layout`: the Redis side (checkpoint documents, latest pointers, pending
  writes and their registries), read only.
- :mod:`.documents`: RedisSaver's documents and memshift checkpoints and tool runs.
- :mod:`.projection`: the PostgreSQL side (``checkpoints``, ``checkpoint_blobs``,
  ``checkpoint_writes``).

After cutover the application gives its graph a ``PostgresSaver`` on the same
database, with the same thread ids.
"""

from memshift.stores.layouts.langgraph.layout import (
    DEFAULT_PREFIX,
    LangGraphLayout,
    NotInLayout,
)
from memshift.stores.layouts.langgraph.projection import (
    Projection,
    ProjectionError,
    install,
    installed,
    uninstall,
)

__all__ = [
    "DEFAULT_PREFIX",
    "LangGraphLayout",
    "NotInLayout",
    "Projection",
    "ProjectionError",
    "install",
    "installed",
    "uninstall",
]
