"""Hide secrets (DSN and URL passwords) before anything is printed or logged."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)(?P<pw>[^@\s]*)@")
_KV_PASSWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE
)


def redact(text: str) -> str:
    """``text`` with every password in a URL or ``password=`` pair replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}***", text)
