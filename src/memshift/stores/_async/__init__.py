"""Stores written once, async; ``../_sync`` is generated from here by tools/gen_sync.py."""
