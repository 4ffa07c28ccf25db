"""Who may see the dashboard and change the Plan through it.

- **A token on every request** but the log-in page and static files: the log-in form
  trades it for a session cookie (random, kept in this process only; HttpOnly,
  SameSite=Strict), and scripts send ``Authorization: Bearer TOKEN``. Without either:
  401. Tokens are compared in constant time.
- **No cross-site writes**: a POST whose ``Sec-Fetch-Site`` is not ``same-origin`` or
  whose ``Origin`` is not this server's is refused (403) before it is read, and every
  form that changes the Plan carries a CSRF token bound to the log-in session.
- **Loopback by default**: unless remote access was allowed, a request must name a
  loopback host in ``Host`` (so a DNS-rebinding page cannot reach us by a name of its
  own).
- Every response carries a strict Content-Security-Policy (scripts and styles from
  this server only, nothing from the internet) and is not cached, nor framed.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from memshift.errors import ConfigError
from memshift.observe.metrics import is_loopback

TOKEN_ENV = "MEMSHIFT_DASHBOARD_TOKEN"
MIN_TOKEN_LENGTH = 16
COOKIE = "memshift_dashboard"
SESSION_SECONDS = 12 * 3600  # a log-in lasts this long
PUBLIC_PATHS = ("/login", "/static/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # session ids travel in URLs: not to other sites
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def check_listen(host: str, *, allow_remote: bool) -> bool:
    """Whether serving on ``host`` reaches beyond this machine; ConfigError if it would
    and that was not allowed."""
    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise ConfigError(
            f"--host {host!r} is not a loopback address: the dashboard would be reachable "
            "from the network; pass --allow-remote to mean it, or use 127.0.0.1"
        )
    return remote


def check_token(token: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the dashboard token is {len(token)} characters long; use at least "
            f"{MIN_TOKEN_LENGTH} (unset ${TOKEN_ENV} to have one generated)"
        )
    return token


@dataclass(frozen=True)
class Login:
    """A logged-in browser: its CSRF token and when the log-in ends."""

    csrf: str
    expires: float


class Logins:
    """The token, and the log-in sessions it opened (in memory: a restart logs out)."""

    def __init__(self, token: str, *, seconds: float = SESSION_SECONDS) -> None:
        self._token = check_token(token).encode()
        self._seconds = seconds
        self._open: dict[str, Login] = {}
        self._lock = threading.Lock()

    def token_ok(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self._token)

    def open(self) -> tuple[str, Login]:
        """A new log-in: (the cookie's value, the log-in)."""
        cookie = secrets.token_urlsafe(32)
        login = Login(secrets.token_urlsafe(32), time.monotonic() + self._seconds)
        with self._lock:
            now = time.monotonic()
            self._open = {k: v for k, v in self._open.items() if v.expires > now}
            self._open[cookie] = login
        return cookie, login

    def find(self, cookie: str | None) -> Login | None:
        if not cookie:
            return None
        with self._lock:
            login = self._open.get(cookie)
        return login if login is not None and login.expires > time.monotonic() else None

    def close(self, cookie: str | None) -> None:
        with self._lock:
            self._open.pop(cookie or "", None)

    @property
    def max_age(self) -> int:
        return int(self._seconds)


def bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def cross_site(request: Request) -> bool:
    """Whether a request comes from another site (or another origin of this one).

    Browsers send ``Sec-Fetch-Site`` and ``Origin`` on POSTs; clients that are not
    browsers send neither and are judged by their token alone.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    # Older browsers: the Origin header (a missing one is a client that is no browser).
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin is not None and origin != own


def csrf_ok(login: Login | None, given: object) -> bool:
    return (login is not None and isinstance(given, str)
            and secrets.compare_digest(given.encode(), login.csrf.encode()))


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """ASGI middleware: Host, cross-site and token checks, then the security headers.

    The login (or ``None`` for a bearer token) goes in ``request.state.login``.
    ``unauthorized`` renders the 401 (the log-in form for a browser).
    """

    def __init__(
        self, app: App, *, logins: Logins, allow_remote: bool,
        unauthorized: Callable[[Request], Response],
    ) -> None:
        self.app = app
        self.logins = logins
        self.allow_remote = allow_remote
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None:
            login = self.logins.find(request.cookies.get(COOKIE))
            public = request.url.path.startswith(PUBLIC_PATHS)
            if login is None and not public and not self.logins.token_ok(bearer(request)):
                refusal = self.unauthorized(request)
            scope.setdefault("state", {})["login"] = login
        static = request.url.path.startswith("/static/")

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)

    def _refusal(self, request: Request) -> Response | None:
        host = request.url.hostname or ""
        if not self.allow_remote and not is_loopback(host):
            return PlainTextResponse(
                f"this dashboard answers to loopback names only, not {host!r}", 421)
        if request.method not in SAFE_METHODS and cross_site(request):
            return PlainTextResponse("cross-site request refused", 403)
        return None
