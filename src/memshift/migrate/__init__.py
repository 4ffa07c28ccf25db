"""The migration's jobs: bulk merge, backfill (and, later, parity, repair, rehearsal)."""
