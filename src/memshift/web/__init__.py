"""The web dashboard (``memshift dashboard``): the migration's state in a browser.

Worked example::

    from memshift.config import load_settings
    from memshift.web import serve_dashboard

    serve_dashboard(load_settings({}), "127.0.0.1", 8765, token)   # blocks

See docs/dashboard.md for the pages and how log-in, confirmation and cross-site
protection work.
"""

from __future__ import annotations

from memshift.config import Settings
from memshift.web.app import create_app
from memshift.web.auth import TOKEN_ENV, check_listen, check_token

__all__ = ["TOKEN_ENV", "check_listen", "check_token", "create_app", "serve_dashboard"]


def serve_dashboard(
    settings: Settings, host: str, port: int, token: str, *, allow_remote: bool = False
) -> None:
    """Serve the dashboard on ``host:port`` until interrupted (blocks).

    ``token`` (at least 16 characters) is required on every page and on /metrics.
    A ``host`` that is not loopback raises ConfigError unless ``allow_remote``.
    """
    import uvicorn

    check_listen(host, allow_remote=allow_remote)
    check_token(token)
    app = create_app(settings, token, allow_remote=allow_remote)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                server_header=False, proxy_headers=False)
