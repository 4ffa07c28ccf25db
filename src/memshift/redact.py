"""Hide secrets (DSN and URL passwords) before anything is printed or logged.

Passwords are often pasted unencoded, so they may hold ``@ : / ? # %``: a URL's userinfo
therefore runs to the LAST ``@`` of the URL (which ends at whitespace), and the password
is everything after the user's first ``:``. When a query also holds an ``@`` this hides
more than the password, never less.
"""

from __future__ import annotations

import re

# ``password=`` as a URL query parameter: the value ends at the next parameter.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#\s]*)", re.IGNORECASE)
# ``password=`` in libpq key=value form: a quoted value (quotes escaped by a backslash)
# or everything up to whitespace.
_KV_PASSWORD = re.compile(
    r"(?P<head>(?<![\w?&])password\s*=\s*)"
    r"(?P<pw>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|\S*)",
    re.IGNORECASE,
)
# scheme://user:password@host...: the userinfo is greedy, up to the last '@'. The scheme
# starts a word, so a long token is scanned from one place, not from each of its letters.
_URL_USERINFO = re.compile(
    r"(?<![a-zA-Z0-9+.-])(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:\s]*?):(?P<pw>\S*)@"
)


def redact(text: str) -> str:
    """``text`` with every password in a URL or ``password=`` pair replaced by ``***``."""
    text = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['head']}***", text)
    return _URL_USERINFO.sub(lambda m: f"{m['head']}{m['user']}:***@", text)
