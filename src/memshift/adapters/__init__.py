"""Drop-in adapters: a framework's own interface over the MigratingStore.

Each module needs its framework installed (``pip install 'memshift[langchain]'``):

- :mod:`memshift.adapters.langchain`: ``MigratingChatMessageHistory``, in place of
  LangChain's ``RedisChatMessageHistory``; over the sync router, or over the async
  one for LangChain's async methods (``ainvoke``, ``aget_messages``, ...).
- :mod:`memshift.adapters.openai_agents`: ``MigratingSession``, in place of the
  OpenAI Agents SDK's ``RedisSession``; async, as the SDK's ``Session`` protocol is.
"""
