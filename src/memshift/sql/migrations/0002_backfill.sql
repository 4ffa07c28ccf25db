-- The backfill's control tables: a versioned run record, the batches that workers
-- claim, the sessions discovery has seen, and the quarantine.

CREATE TABLE memshift.backfill_runs (
    run_id        bigserial PRIMARY KEY,
    -- The shape of this record; a memshift that does not know it refuses to resume.
    format        integer NOT NULL DEFAULT 1,
    source        text NOT NULL,          -- the Redis URL, password removed
    layout        text NOT NULL,
    prefix        text NOT NULL,
    batch_size    integer NOT NULL CHECK (batch_size > 0),
    state         text NOT NULL DEFAULT 'discovering'
                  CHECK (state IN ('discovering', 'copying', 'completed', 'abandoned')),
    -- Where discovery resumes: the SCAN cursor of each node, by node name.
    scan_cursors  jsonb NOT NULL DEFAULT '{}',
    sessions_seen bigint NOT NULL DEFAULT 0,
    -- Sessions quarantined by discovery itself (ids PostgreSQL cannot hold as text).
    quarantined   bigint NOT NULL DEFAULT 0,
    batches_total integer NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
-- At most one unfinished run per source: a second `memshift backfill` joins it.
CREATE UNIQUE INDEX backfill_runs_one_open_idx ON memshift.backfill_runs (source, layout, prefix)
    WHERE state IN ('discovering', 'copying');

CREATE TABLE memshift.backfill_seen (
    run_id     bigint NOT NULL REFERENCES memshift.backfill_runs ON DELETE CASCADE,
    session_id text NOT NULL,
    PRIMARY KEY (run_id, session_id)
);

CREATE TABLE memshift.backfill_batches (
    run_id      bigint NOT NULL REFERENCES memshift.backfill_runs ON DELETE CASCADE,
    batch_no    integer NOT NULL,
    session_ids text[] NOT NULL,
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    claimed_by  text,
    lease_until timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    migrated    integer NOT NULL DEFAULT 0,
    unchanged   integer NOT NULL DEFAULT 0,
    quarantined integer NOT NULL DEFAULT 0,
    vanished    integer NOT NULL DEFAULT 0,   -- expired or deleted in Redis meanwhile
    messages    bigint NOT NULL DEFAULT 0,
    done_at     timestamptz,
    PRIMARY KEY (run_id, batch_no)
);
CREATE INDEX backfill_batches_pending_idx ON memshift.backfill_batches (run_id, batch_no)
    WHERE state = 'pending';

CREATE TABLE memshift.quarantine (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,            -- layout and prefix, e.g. reference:agent
    session_key bytea NOT NULL,           -- the session id as Redis holds it
    session_id  text NOT NULL,            -- the same, printable (escaped where not)
    reason      text NOT NULL,
    raw         jsonb NOT NULL,           -- every key of the session, values as base64
    run_id      bigint,
    state       text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    seen        integer NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    UNIQUE (source, session_key)
);
CREATE INDEX quarantine_open_idx ON memshift.quarantine (last_seen) WHERE state = 'open';

-- A conflict seen again (a retried write, a second backfill) is recorded once.
CREATE UNIQUE INDEX message_conflicts_once_idx
    ON memshift.message_conflicts (session_id, seq, md5(incoming::text));
