"""memshift: move an agent's session memory from Redis to PostgreSQL while it runs."""

__version__ = "0.1.0"
