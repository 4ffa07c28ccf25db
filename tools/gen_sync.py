"""Generate the sync stores from the async ones, as psycopg does.

Every module in ``src/memshift/stores/_async/`` except ``__init__.py`` and
``_clients.py`` (hand-written twins) is rewritten token by token with ``unasync``
into ``src/memshift/stores/_sync/``: ``async``/``await`` removed and the names below
swapped. Usage::

    python tools/gen_sync.py          # write the sync modules
    python tools/gen_sync.py --check  # exit 1 if any on disk differs (CI)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
ASYNC_DIR = ROOT / "src" / "memshift" / "stores" / "_async"
SYNC_DIR = ROOT / "src" / "memshift" / "stores" / "_sync"
HAND_WRITTEN = {"__init__.py", "_clients.py"}
REPLACEMENTS = {
    "AsyncRedis": "Redis",
    "AsyncRedisCluster": "RedisCluster",
    "AsyncRedisStore": "RedisStore",
    "AsyncStore": "Store",
    "AsyncPostgresStore": "PostgresStore",
    "AsyncMigratingStore": "MigratingStore",
    "AsyncSessionCache": "SessionCache",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnection": "Connection",
    "AsyncIterator": "Iterator",
    "AsyncLock": "Lock",
}
HEADER = "# Generated from ../_async/{name} by tools/gen_sync.py: do not edit.\n"


def generate() -> dict[str, str]:
    """The text of every generated sync module, by file name."""
    sources = sorted(p for p in ASYNC_DIR.glob("*.py") if p.name not in HAND_WRITTEN)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "_async"
        work.mkdir()
        copies = [str(shutil.copy(p, work / p.name)) for p in sources]
        rule = unasync.Rule("/_async/", "/_sync/", additional_replacements=REPLACEMENTS)
        unasync.unasync_files(copies, rules=[rule])
        out = Path(tmp) / "_sync"
        return {
            p.name: HEADER.format(name=p.name) + (out / p.name).read_text(encoding="utf-8")
            for p in sources
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the files on disk are not up to date"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        target = SYNC_DIR / name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            target.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(
            f"out of date in {SYNC_DIR.relative_to(ROOT)}: {', '.join(stale)}; "
            "run python tools/gen_sync.py",
            file=sys.stderr,
        )
        return 1
    for name in stale:
        print(f"wrote {SYNC_DIR.relative_to(ROOT) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
