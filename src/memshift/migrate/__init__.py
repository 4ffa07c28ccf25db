"""The migration's jobs: bulk merge, backfill, follow, parity, repair, rehearsal, and the Plan."""

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter), read lazily: a scan of
    millions of ids never sits in memory at once."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
