"""Drop-in adapters: a framework's own interface over the MigratingStore.

Each module needs its framework installed (``pip install 'memshift[langchain]'``):

- :mod:`memshift.adapters.langchain`: ``MigratingChatMessageHistory``, in place of
  LangChain's ``RedisChatMessageHistory``.
"""
