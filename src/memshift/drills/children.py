"""Child processes of the drills: ``memshift`` commands and the dual-writing app.

A drill kills these with SIGKILL, so each runs in a process group of its own
(``start_new_session``) and is killed whole, never by name. Their settings come
from ``MEMSHIFT_*`` variables naming the drill's stores (the caller's own
``MEMSHIFT_*`` variables are dropped, so nothing leaks in from the shell).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from memshift.drills.context import DrillContext


def child_env(ctx: DrillContext, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    env.update(MEMSHIFT_POSTGRES_DSN=ctx.postgres_dsn, MEMSHIFT_REDIS_URL=ctx.redis_url,
               MEMSHIFT_PREFIX=ctx.prefix, MEMSHIFT_LAYOUT=ctx.settings.layout,
               MEMSHIFT_DATA_DIR=str(ctx.workdir), **extra)
    return env


def memshift_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "memshift", *args]


def run_memshift(ctx: DrillContext, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``memshift ARGS`` on the drill's stores to the end (or the drill's deadline)."""
    return subprocess.run(memshift_command(*args), env=child_env(ctx), capture_output=True,
                          text=True, timeout=ctx.left(), check=False)


def start(ctx: DrillContext, command: list[str], *,
          stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start ``command`` in a process group of its own, on the drill's stores."""
    return subprocess.Popen(command, env=child_env(ctx), stdout=stdout,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def kill(child: subprocess.Popen[str]) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended by itself meanwhile
    child.wait()


def last_json(stdout: str) -> dict[str, Any]:
    """The last line of a ``--json`` command's output, parsed ({} when there is none)."""
    try:
        parsed = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
