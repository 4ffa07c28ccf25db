"""The openai-agents layout: the OpenAI Agents SDK's RedisSession keys, and in PostgreSQL
its SQLAlchemySession tables kept from the truth.

- :mod:`.layout`: the Redis side (a hash and an item list per session).
- :mod:`.items`: SDK items and memshift messages, each into the other.
- :mod:`.projection`: the PostgreSQL side (``agent_sessions``, ``agent_messages``).
"""

from memshift.stores.layouts.openai_agents.layout import DEFAULT_KEY_PREFIX, OpenAIAgentsLayout
from memshift.stores.layouts.openai_agents.projection import (
    DEFAULT_TABLES,
    Tables,
    install,
    installed,
    uninstall,
)

__all__ = ["DEFAULT_KEY_PREFIX", "DEFAULT_TABLES", "OpenAIAgentsLayout", "Tables", "install",
           "installed", "uninstall"]
