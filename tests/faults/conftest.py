"""Outage tests through ``memshift.faults.proxy.FaultProxy``."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: outage tests that cut, refuse or stall connections via FaultProxy"
    )
