-- Two audited ways out for an operator, each keeping who, when and why:
--
-- A quarantine entry may be dismissed (`memshift quarantine dismiss`): the operator
-- accepts that the session is not migrated, so it is missing from PostgreSQL. The
-- gates into cutover, pg_primary and retired wait only for open entries, and the
-- parity gate leaves dismissed sessions out.
--
-- A backfill run may be abandoned (`memshift backfill --abandon`), e.g. one started
-- against a wrong Redis URL: the backfill gate no longer waits for it. When is its
-- finished_at.

ALTER TABLE memshift.quarantine
    DROP CONSTRAINT quarantine_state_check,
    ADD CONSTRAINT quarantine_state_check
        CHECK (state IN ('open', 'resolved', 'dismissed')),
    ADD COLUMN dismissed_at     timestamptz,
    ADD COLUMN dismissed_by     text,
    ADD COLUMN dismissed_reason text,
    ADD CONSTRAINT quarantine_dismissal_audited
        CHECK (state <> 'dismissed' OR (dismissed_at IS NOT NULL AND dismissed_by IS NOT NULL
                                        AND btrim(dismissed_reason) <> ''));
-- The parity gate leaves dismissed sessions out (their loss was accepted).
CREATE INDEX quarantine_dismissed_idx ON memshift.quarantine (session_id)
    WHERE state = 'dismissed';

ALTER TABLE memshift.backfill_runs
    ADD COLUMN abandoned_by     text,
    ADD COLUMN abandoned_reason text,
    ADD CONSTRAINT backfill_runs_abandon_audited
        CHECK (abandoned_by IS NULL OR btrim(abandoned_reason) <> '');
