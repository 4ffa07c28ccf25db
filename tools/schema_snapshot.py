"""Rewrite tests/integration/expected_schema.txt from a freshly migrated database.

Run after adding a migration, then read the diff: it must show exactly the change
the migration meant to make.

    python tools/schema_snapshot.py [ADMIN_DSN]
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memshift.sql.migrations import upgrade  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.integration.test_migrations import EXPECTED, describe  # noqa: E402


def main() -> None:
    admin = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"memshift_snapshot_{uuid.uuid4().hex[:8]}"
    dsn = create_database(admin, name)
    try:
        upgrade(dsn)
        EXPECTED.write_text(describe(dsn))
    finally:
        drop_database(admin, name)
    print(f"wrote {EXPECTED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
