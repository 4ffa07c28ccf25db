"""Fault injection for drills and tests: a TCP fault proxy."""

from memshift.faults.proxy import FaultProxy

__all__ = ["FaultProxy"]
