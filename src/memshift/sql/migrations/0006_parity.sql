-- Parity results: one row per session checked (batch `memshift parity` now, live
-- shadow compares later). The Plan's gates and the rollback rule read the latest
-- rows by checked_at. Diffs are stored redacted (lengths and hashes), never values.

CREATE TABLE memshift.parity_results (
    id          bigserial PRIMARY KEY,
    session_id  text NOT NULL,
    status      text NOT NULL CHECK (status IN ('pass', 'fail', 'pending', 'error')),
    checks      jsonb NOT NULL,
    diffs       jsonb NOT NULL,
    checked_at  timestamptz NOT NULL
);
-- "The last N results": the gate and the rollback rule read the newest rows first.
CREATE INDEX parity_results_checked_at_idx ON memshift.parity_results (checked_at);
CREATE INDEX parity_results_session_idx ON memshift.parity_results (session_id, checked_at);
