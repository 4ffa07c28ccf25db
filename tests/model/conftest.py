"""Fixtures of the continuity model: its services, its clock, and an optional mutant.

Importing ``profiles`` registers the hypothesis profiles (``continuity-ci``, ``deep``)
early enough for ``pytest tests/model --hypothesis-profile=deep``.
``MEMSHIFT_CONTINUITY_MUTANT=NAME`` switches one mechanism off for the run (see
``mutants.py``), to see the model catch its absence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import memshift.stores._sync.migrating as sync_router
from tests.model import mutants
from tests.model import profiles as profiles  # registers the hypothesis profiles
from tests.model.world import ModelClock, Services


@pytest.fixture
def continuity_services(pg_dsn: str, redis_url: str, redis_prefix: str) -> Iterator[Services]:
    services = Services(pg_dsn, redis_url, redis_prefix)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def model_clock(monkeypatch: pytest.MonkeyPatch) -> ModelClock:
    """The router's clock, moved by the model only (see ``world.ModelClock``)."""
    clock = ModelClock()
    monkeypatch.setattr(sync_router, "time", clock.as_time_module())
    mutant = os.environ.get("MEMSHIFT_CONTINUITY_MUTANT")
    if mutant:
        mutants.apply(mutant, monkeypatch)
    return clock
