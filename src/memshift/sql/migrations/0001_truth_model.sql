-- The truth model of DESIGN §2. Every table is keyed so that writes are idempotent
-- upserts; the monotonic guards live in queries.sql.

CREATE TABLE memshift.sessions (
    session_id       text PRIMARY KEY CHECK (octet_length(session_id) BETWEEN 1 AND 512),
    tenant_id        text,
    user_id          text,
    status           text NOT NULL DEFAULT 'active'
                     CHECK (status IN ('active', 'waiting_tool', 'paused',
                                       'completed', 'failed', 'expired')),
    version          bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT '-infinity',
    messages_trimmed bigint NOT NULL DEFAULT 0 CHECK (messages_trimmed >= 0),
    metadata         jsonb NOT NULL DEFAULT '{}',
    expires_at       timestamptz,
    -- The next seq a PostgreSQL-primary append takes; never below max(seq) + 1.
    next_seq         bigint NOT NULL DEFAULT 0,
    next_event_seq   bigint NOT NULL DEFAULT 0,
    -- True while only parts of the session (e.g. a replicated message) have arrived
    -- and the session record itself has not: any real session write replaces it.
    placeholder      boolean NOT NULL DEFAULT false
);

CREATE INDEX sessions_tenant_idx ON memshift.sessions (tenant_id);
CREATE INDEX sessions_updated_idx ON memshift.sessions (updated_at);

CREATE TABLE memshift.messages (
    session_id   text NOT NULL,
    seq          bigint NOT NULL CHECK (seq >= 0),
    message_id   text NOT NULL,
    role         text NOT NULL,
    content      text NOT NULL,
    ts           timestamptz NOT NULL,
    tool_call_id text,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, message_id)
);

-- A same-seq (or same message id) write with other content: kept here, never applied.
CREATE TABLE memshift.message_conflicts (
    id          bigserial PRIMARY KEY,
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    existing    jsonb NOT NULL,
    incoming    jsonb NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_conflicts_session_idx ON memshift.message_conflicts (session_id);

CREATE TABLE memshift.tool_runs (
    session_id   text NOT NULL,
    tool_call_id text NOT NULL,
    name         text NOT NULL,
    args         jsonb NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('pending', 'running', 'retrying', 'succeeded', 'failed')),
    attempts     bigint NOT NULL CHECK (attempts >= 0),
    last_error   text,
    updated_at   timestamptz NOT NULL,
    -- Last tie-break between two writes with the same status and timestamp.
    content_hash text NOT NULL,
    PRIMARY KEY (session_id, tool_call_id)
);

CREATE TABLE memshift.summaries (
    session_id     text NOT NULL,
    version        bigint NOT NULL CHECK (version >= 1),
    text           text NOT NULL,
    covers_through bigint NOT NULL,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (session_id, version)
);

CREATE TABLE memshift.checkpoints (
    session_id    text NOT NULL,
    checkpoint_id text NOT NULL,
    parent_id     text,
    step          bigint NOT NULL CHECK (step >= 0),
    state         jsonb NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (session_id, checkpoint_id),
    CHECK (parent_id IS DISTINCT FROM checkpoint_id)
);
CREATE INDEX checkpoints_step_idx ON memshift.checkpoints (session_id, step DESC);

CREATE TABLE memshift.events (
    session_id  text NOT NULL,
    event_seq   bigint NOT NULL CHECK (event_seq >= 0),
    type        text NOT NULL,
    from_status text,
    to_status   text,
    at          timestamptz NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (session_id, event_seq)
);

-- True when a tool-run write (new_*) beats the stored one (old_*): a terminal status
-- first, then the newer timestamp, then the status rank, then the content hash. The
-- same order as memshift.model.ToolRun.merge_key, so every store converges.
CREATE FUNCTION memshift.tool_run_wins(
    new_status text, new_at timestamptz, new_hash text,
    old_status text, old_at timestamptz, old_hash text
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (new_status IN ('succeeded', 'failed'), new_at,
        CASE new_status WHEN 'pending' THEN 0 WHEN 'running' THEN 1
                        WHEN 'retrying' THEN 2 ELSE 3 END,
        new_hash COLLATE "C")
     > (old_status IN ('succeeded', 'failed'), old_at,
        CASE old_status WHEN 'pending' THEN 0 WHEN 'running' THEN 1
                        WHEN 'retrying' THEN 2 ELSE 3 END,
        old_hash COLLATE "C");
