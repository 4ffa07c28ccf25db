"""Stores behind one protocol: PostgreSQL (the new truth) and Redis (via a layout)."""

from memshift.stores.base import AsyncStore, Outcome, Store

__all__ = ["AsyncStore", "Outcome", "Store"]
