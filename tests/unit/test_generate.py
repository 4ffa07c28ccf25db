"""The generator makes the sessions a migration must get right, the same for a seed."""

from __future__ import annotations

from memshift.generate import generate_sessions
from memshift.model import LEGAL_TRANSITIONS, Checkpoint, MemorySummary, ToolRun


def test_the_same_seed_gives_the_same_sessions() -> None:
    first = [(g.session_id, g.calls, g.keep_last) for g in generate_sessions(20, seed=7)]
    again = [(g.session_id, g.calls, g.keep_last) for g in generate_sessions(20, seed=7)]
    other = [(g.session_id, g.calls, g.keep_last) for g in generate_sessions(20, seed=8)]
    assert first == again
    assert [c for _, c, _ in first] != [c for _, c, _ in other]


def test_sessions_cover_the_hard_cases() -> None:
    sessions = list(generate_sessions(300, seed=1))
    mid_retry = 0
    multi_summary = 0
    for generated in sessions:
        runs: dict[str, ToolRun] = {}
        for call in generated.calls:
            if call.method == "upsert_tool_run":
                runs[call.args[1].tool_call_id] = call.args[1]
        mid_retry += any(not r.terminal and r.attempts > 1 for r in runs.values())
        versions = [c.args[1].version for c in generated.calls if c.method == "put_summary"]
        multi_summary += len(versions) > 1
    assert mid_retry > 5
    assert multi_summary > 20
    assert sum(g.keep_last is not None for g in sessions) > 20
    assert sum(g.ttl_seconds is not None for g in sessions) > 20


def test_status_moves_are_legal_and_checkpoints_form_a_chain() -> None:
    for generated in generate_sessions(100, seed=2):
        status = "active"
        parent = None
        last: MemorySummary | None = None
        for call in generated.calls:
            if call.method == "set_status":
                assert call.args[1] in LEGAL_TRANSITIONS[status], generated.session_id
                status = call.args[1]
            elif call.method == "put_checkpoint":
                checkpoint: Checkpoint = call.args[1]
                assert checkpoint.parent_id == parent
                parent = checkpoint.checkpoint_id
            elif call.method == "put_summary":
                summary: MemorySummary = call.args[1]
                assert last is None or summary.version == last.version + 1
                last = summary
