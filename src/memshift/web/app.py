"""The dashboard's web application: pages, their JSON twins, Plan actions, /metrics.

Every page reads the control plane through :mod:`memshift.web.views` on a connection
of its own (as a CLI command would), renders a Jinja template, and refreshes itself
every few seconds in the browser. ``/api/<page>`` returns the same data as JSON.
A Plan change (rollback, a stage move) is two steps: a confirmation page that shows
the Plan before and after (the change made in a transaction that is rolled back,
so the preview runs the very code the change will), then a POST carrying the CSRF
token, the reason, and the Plan version that was confirmed; if the Plan moved in
between, the change is refused and shown again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from memshift.config import Settings
from memshift.errors import (
    ConfigError,
    MemshiftError,
    SchemaError,
    SessionNotFound,
    StoreUnavailable,
    ValidationError,
)
from memshift.inspect import display, inspect_session
from memshift.migrate.plan import (
    GateRefused,
    IllegalMove,
    Plan,
    Stage,
    check_gates,
    load_plan,
    operator,
    rollback,
    set_stage,
)
from memshift.observe.control_plane import open_control_plane
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.web import views
from memshift.web.auth import COOKIE, Guard, Logins, csrf_ok

REFRESH_SECONDS = 5  # pages re-read the control plane this often
ACTION_PARAMS = ("path", "to")  # what a confirmation page carries on to its POST


class PlanChanged(MemshiftError):
    """The Plan moved between the confirmation and the change: nothing was changed."""

    exit_code = 10


class UnknownAction(MemshiftError):
    """A Plan action the dashboard does not offer."""


_STATUS = (
    (SessionNotFound, 404),
    (UnknownAction, 404),
    (ValidationError, 400),
    (GateRefused, 409),
    (IllegalMove, 409),
    (PlanChanged, 409),
    (StoreUnavailable, 503),
    (SchemaError, 503),
    (ConfigError, 500),
)


def _status_of(exc: MemshiftError) -> int:
    return next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)


def _templates() -> Jinja2Templates:
    env = Environment(loader=PackageLoader("memshift.web", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, pct=_pct, value=display, qs=quote)
    return Jinja2Templates(env=env)


def _parse(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")) if iso else None


def _when(iso: str | None) -> str:
    at = _parse(iso)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else "—"


def _ago(iso: str | None) -> str:
    at = _parse(iso)
    if at is None:
        return "—"
    seconds = max(0, int((datetime.now(UTC) - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f} %".replace(".0 %", " %") if digits else f"{value:.0f} %"


def _safe_next(target: object) -> str:
    """Where to go after logging in: a path of this site only."""
    if isinstance(target, str) and target.startswith("/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return "/"


class Dashboard:
    """The routes, bound to the settings, the templates and the log-ins."""

    def __init__(self, settings: Settings, logins: Logins) -> None:
        if not settings.postgres_dsn:
            raise ConfigError("the dashboard needs PostgreSQL: set --postgres-dsn / "
                              "MEMSHIFT_POSTGRES_DSN")
        self.settings = settings
        self.dsn = settings.postgres_dsn
        self.logins = logins
        self.templates = _templates()

    @contextlib.contextmanager
    def connect(self) -> Iterator[psycopg.Connection[Any]]:
        with open_control_plane(self.dsn) as conn:
            yield conn

    # -- rendering --------------------------------------------------------------------

    def render(self, request: Request, name: str, data: dict[str, Any], *,
               status: int = 200, nav: str = "", refresh: int = REFRESH_SECONDS) -> Response:
        login = getattr(request.state, "login", None)
        context = {"data": data, "nav": nav, "refresh": refresh,
                   "csrf": login.csrf if login else "", "logged_in": login is not None,
                   "now": datetime.now(UTC).strftime("%H:%M:%S UTC"),
                   "query": dict(request.query_params)}
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def unauthorized(self, request: Request) -> Response:
        if request.url.path.startswith(("/api/", "/metrics")) \
                or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse(
                {"error": "a token is required: log in, or send 'Authorization: Bearer TOKEN'"},
                401, headers={"www-authenticate": 'Bearer realm="memshift"'})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return self.render(request, "login.html", {"next": target, "error": None},
                           status=401, refresh=0)

    async def failed(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MemshiftError)
        status, message = _status_of(exc), redact(str(exc))
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message, "kind": type(exc).__name__}, status)
        title = {404: "Not found", 409: "Nothing was changed", 400: "That request is not valid",
                 503: "A store cannot be reached"}.get(status, "Something stopped this page")
        return self.render(request, "error.html", {"message": message, "title": title,
                                                   "kind": type(exc).__name__},
                           status=status, refresh=0)

    # -- pages and their JSON ---------------------------------------------------------

    def page(self, name: str, build: Callable[[psycopg.Connection[Any], Request],
                                               dict[str, Any]]) -> list[Route]:
        def html(request: Request) -> Response:
            with self.connect() as conn:
                data = build(conn, request)
            return self.render(request, f"{name}.html", data, nav=name)

        def api(request: Request) -> Response:
            with self.connect() as conn:
                return _json(build(conn, request))

        path = "/" if name == "overview" else f"/{name}"
        return [Route(path, html, name=name), Route(f"/api/{name}", api, name=f"api_{name}")]

    def session_data(self, request: Request) -> dict[str, Any] | None:
        sid = request.query_params.get("id", "").strip()
        if not sid:
            return None
        show = request.query_params.get("show_values") == "1"
        return views.session(inspect_session(self.settings, sid), show_values=show)

    def session_page(self, request: Request) -> Response:
        data = self.session_data(request)
        if data is None:
            with self.connect() as conn:
                plan = views.plan_json(load_plan(conn))
            return self.render(request, "session_find.html", {"plan": plan}, nav="session",
                               refresh=0)
        return self.render(request, "session.html", data, nav="session")

    def session_api(self, request: Request) -> Response:
        data = self.session_data(request)
        if data is None:
            return JSONResponse({"error": "give the session id: /api/session?id=..."}, 400)
        return _json(data)

    def trend_api(self, request: Request) -> Response:
        with self.connect() as conn:
            return _json(views.parity(conn)["trend"])

    # -- log-in -----------------------------------------------------------------------

    def login_page(self, request: Request) -> Response:
        target = _safe_next(request.query_params.get("next"))
        return self.render(request, "login.html", {"next": target, "error": None}, refresh=0)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        target = _safe_next(form.get("next"))
        token = form.get("token")
        if not self.logins.token_ok(token if isinstance(token, str) else None):
            return self.render(request, "login.html",
                               {"next": target, "error": "That token is not the right one."},
                               status=401, refresh=0)
        cookie, _ = self.logins.open()
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, cookie, max_age=self.logins.max_age, path="/",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_ok(request.state.login, form.get("csrf")):
            return Response("missing or wrong CSRF token", 403)
        self.logins.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- Plan actions -----------------------------------------------------------------

    def confirm_page(self, request: Request) -> Response:
        action = request.path_params["action"]
        change, what = self._action(action, request.query_params)
        with self.connect() as conn:
            before = load_plan(conn)
            problem, after = None, None
            try:
                after = _preview(conn, lambda: change(conn, "preview"))
            except (GateRefused, IllegalMove, ValidationError) as exc:
                problem = str(exc)
            gates = []
            if action == "stage":
                target = Stage(request.query_params.get("to", ""))
                if target.order > before.stage.order:
                    gates = [vars(g) for g in check_gates(conn, target)]
        params = {k: v for k, v in request.query_params.items() if k in ACTION_PARAMS}
        data = {"action": action, "what": what, "params": params,
                "plan": views.plan_json(before), "before": views.plan_json(before),
                "after": views.plan_json(after) if after else None,
                "problem": problem, "gates": gates, "error": None}
        return self.render(request, "confirm.html", data, nav="overview", refresh=0)

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        form = await request.form()
        if not csrf_ok(request.state.login, form.get("csrf")):
            return Response("missing or wrong CSRF token: reload the page and confirm again",
                            403)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if fields.get("confirm") != "yes":
            return Response("the change was not confirmed", 400)
        change, _ = self._action(action, fields)
        reason = fields.get("reason", "").strip()
        if not reason:
            raise ValidationError("a Plan change needs a reason: it goes in the audit log")
        try:
            confirmed = int(fields.get("version", ""))
        except ValueError:
            raise ValidationError("the confirmed Plan version is missing") from None
        plan = await run_in_threadpool(self._apply, change, reason, confirmed)
        return RedirectResponse("/?" + urlencode({"changed": plan.version, "action": action}),
                                303)

    def _apply(self, change: Callable[[psycopg.Connection[Any], str], Plan], reason: str,
               confirmed: int) -> Plan:
        with self.connect() as conn, conn.transaction():
            conn.execute(query("plan_lock"))  # nobody changes it between the check and ours
            current = load_plan(conn)
            if current.version != confirmed:
                raise PlanChanged(
                    f"the Plan changed since you confirmed (version {confirmed}, now "
                    f"{current.version}, stage {current.stage}); nothing was changed: look "
                    "at it again and confirm anew")
            return change(conn, reason)

    def _action(self, action: str, params: Any
                ) -> tuple[Callable[[psycopg.Connection[Any], str], Plan], str]:
        who = f"dashboard ({operator()})"
        if action == "rollback":
            path = (params.get("path") or "").strip() or None

            def undo(conn: psycopg.Connection[Any], why: str) -> Plan:
                return rollback(conn, why, read_path=path, who=who)

            return undo, (f"roll read path {path!r} back to Redis" if path
                          else "roll every read back to Redis")
        if action == "stage":
            target = (params.get("to") or "").strip()
            try:
                Stage(target)
            except ValueError:
                raise ValidationError(f"unknown stage {target!r}; stages, in order: "
                                      f"{', '.join(Stage)}") from None

            def move(conn: psycopg.Connection[Any], why: str) -> Plan:
                return set_stage(conn, target, why, who=who)

            return move, f"move the migration to stage {target}"
        raise UnknownAction(f"no action {action!r}: the dashboard offers rollback and stage")


def _preview(conn: psycopg.Connection[Any],
             change: Callable[[], Plan]) -> Plan:
    """The Plan a change would make: made in a transaction that is then rolled back
    (nothing is written, audited or announced)."""
    after: Plan | None = None
    with conn.transaction() as tx:
        after = change()
        raise psycopg.Rollback(tx)
    assert after is not None
    return after


def _json(data: dict[str, Any]) -> Response:
    return JSONResponse(data)


def create_app(settings: Settings, token: str, *, allow_remote: bool = False) -> Starlette:
    """The dashboard as an ASGI app (``serve_dashboard`` runs it with uvicorn)."""
    logins = Logins(token)
    board = Dashboard(settings, logins)
    routes = [
        *board.page("overview", lambda conn, r: views.overview(conn)),
        *board.page("parity", lambda conn, r: views.parity(conn)),
        *board.page("backfill", lambda conn, r: views.backfill(conn)),
        *board.page("repair", lambda conn, r: views.repair(conn)),
        *board.page("quarantine", lambda conn, r: views.quarantine(
            conn, show_all=r.query_params.get("all") == "1",
            show_values=r.query_params.get("show_values") == "1")),
        *board.page("audit", lambda conn, r: views.audit(conn)),
        Route("/session", board.session_page, name="session"),
        Route("/api/session", board.session_api, name="api_session"),
        Route("/api/parity/trend", board.trend_api, name="api_trend"),
        Route("/login", board.login_page, methods=["GET"], name="login_page"),
        Route("/login", board.login, methods=["POST"], name="login"),
        Route("/logout", board.logout, methods=["POST"], name="logout"),
        Route("/actions/{action}", board.confirm_page, methods=["GET"], name="confirm"),
        Route("/actions/{action}", board.act, methods=["POST"], name="act"),
        Mount("/static", StaticFiles(packages=[("memshift.web", "static")]), name="static"),
        _metrics(settings),
    ]
    middleware = [Middleware(Guard, logins=logins, allow_remote=allow_remote,
                             unauthorized=board.unauthorized)]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={MemshiftError: board.failed})


class _Asgi:
    """An ASGI app as a route's endpoint: exactly /metrics, no redirect to /metrics/
    (a scraper may drop its Authorization header on one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _metrics(settings: Settings) -> Route:
    """/metrics: the Prometheus registry, with the control plane's state collector."""
    from memshift.observe.metrics import asgi_app, install_state_collector

    assert settings.postgres_dsn is not None
    install_state_collector(settings.postgres_dsn)
    return Route("/metrics", _Asgi(asgi_app()), name="metrics")
