-- Follow mode: `memshift follow` keeps PostgreSQL in step with writes that reach Redis
-- without memshift. One row per follower (a Redis source, layout and prefix) with its
-- position, counters and sweeps; and, per session it applied, a digest of what Redis
-- held, so that a sweep re-applies only the sessions that changed since.

CREATE TABLE memshift.followers (
    follower_id   bigserial PRIMARY KEY,
    source        text NOT NULL,          -- the Redis URL, password removed
    layout        text NOT NULL,
    prefix        text NOT NULL,
    -- running: a process follows (or died following: its heartbeat stops);
    -- stopped: it was stopped on purpose, and the Plan's gates no longer wait for it.
    state         text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'stopped')),
    worker        text,                   -- host:pid of the process that follows
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- The position: every change Redis made before this moment is in PostgreSQL. It
    -- stops where a dead follower left it; a restarted one moves it on only once its
    -- catch-up sweep is done. Lag is now() minus this.
    applied_through timestamptz NOT NULL DEFAULT now(),
    events           bigint NOT NULL DEFAULT 0,   -- keyspace notifications received
    sessions_applied bigint NOT NULL DEFAULT 0,   -- session re-reads merged (changed)
    sessions_expired bigint NOT NULL DEFAULT 0,   -- sessions recorded as expired
    quarantined      bigint NOT NULL DEFAULT 0,
    events_per_second   double precision NOT NULL DEFAULT 0,
    sessions_per_second double precision NOT NULL DEFAULT 0,
    sweeps                 bigint NOT NULL DEFAULT 0,
    last_sweep_started_at  timestamptz,
    last_sweep_finished_at timestamptz,
    last_sweep_scanned     bigint,        -- sessions the last finished sweep read
    last_sweep_applied     bigint,        -- of those, how many had changed
    UNIQUE (source, layout, prefix)
);

CREATE TABLE memshift.follow_sessions (
    follower_id bigint NOT NULL REFERENCES memshift.followers ON DELETE CASCADE,
    session_key bytea NOT NULL,           -- the session id as Redis holds it
    digest      bytea,                    -- of the Redis replies last applied; NULL once gone
    applied_at  timestamptz NOT NULL DEFAULT now(),
    gone_at     timestamptz,              -- seen deleted or expired in Redis
    PRIMARY KEY (follower_id, session_key)
);
