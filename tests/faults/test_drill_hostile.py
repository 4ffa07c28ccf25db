"""Hostile input: every record quarantined with a reason or migrated intact; no crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from memshift.config import Settings
from memshift.drills.hostile import RECORDS, Legacy, deep_checkpoint
from memshift.errors import ValidationError
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.model import MAX_JSON_DEPTH, Checkpoint, ToolRun, parse
from memshift.stores.postgres import PostgresStore
from tests.faults.test_drill_runner import run_quick

pytestmark = pytest.mark.faults


def test_every_hostile_record_is_quarantined_with_its_reason_or_migrated_intact(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("hostile-input", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("records") == len(RECORDS) >= 40
    assert result.figure("backfill exit code (0: no crash)") == 0
    assert result.figure("good sessions intact") == 20
    judged = {f.name: f for f in result.figures}
    for record in RECORDS:
        # ok: the outcome expected, and the quarantine reason holds the record's words.
        assert judged[record.name].ok, judged[record.name]
        assert judged[record.name].value.startswith(record.expect + ":")
    quarantined = [r for r in RECORDS if r.expect == "quarantined"]
    assert len(quarantined) >= 40 and all(r.words for r in quarantined)
    assert result.ok, result.failed()


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_too_deep_to_read_back_is_refused_on_the_way_in() -> None:
    ToolRun(tool_call_id="c", name="t", args=nested(MAX_JSON_DEPTH))

    with pytest.raises(ValidationError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        parse(ToolRun, {"tool_call_id": "c", "name": "t", "args": nested(MAX_JSON_DEPTH + 1)},
              session_id="s", where="tool run")


def test_a_value_nested_to_the_limit_round_trips_through_postgres(pg_dsn: str) -> None:
    deep = {"d": nested(MAX_JSON_DEPTH - 1)}  # the object itself is the first level
    with PostgresStore(pg_dsn) as store:
        store.save_session({"session_id": "deep", "tenant_id": "t"})
        store.put_checkpoint("deep", Checkpoint(checkpoint_id="c1", step=1, state=deep))
        state = store.load_session("deep")

    assert state is not None and state.checkpoints[0].state == deep


def test_json_nested_past_the_decoder_quarantines_the_session_not_the_run(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    legacy = Legacy(client, redis_prefix)
    legacy.child(b"deep", "checkpoint", deep_checkpoint(100_000))
    legacy.session(b"fine")
    client.close()

    summary = backfill(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
                       BackfillOptions(prefix=redis_prefix))

    assert (summary.state, summary.migrated, summary.quarantined) == ("completed", 1, 1)
