"""The named queries of ``queries.sql``, loaded once."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, bytes]:
    text = resources.files("memshift.sql").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    return {name: body.strip().encode("utf-8") for name, body in pairs}


def query(name: str) -> bytes:
    return queries()[name]
