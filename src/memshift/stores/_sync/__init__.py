"""Sync stores, generated from ``../_async`` by tools/gen_sync.py (except ``_clients``)."""
