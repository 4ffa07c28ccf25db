-- The repair queue: secondary writes that failed. Each row names the session and the
-- store that missed the write (target); the repair worker copies the session whole
-- from the other store into the target, then deletes the rows it claimed.

CREATE TABLE memshift.repair_queue (
    id              bigserial PRIMARY KEY,
    session_id      text NOT NULL,
    target          text NOT NULL CHECK (target IN ('redis', 'postgres')),
    operation       text NOT NULL,         -- the write that failed, e.g. append_message
    error           text NOT NULL,         -- why it failed
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    -- Set for rows moved in from a local spool file, so a line moved twice is one row.
    spool_id        text UNIQUE,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz
);
-- Reads ask "does this session have repairs pending for the store I am about to read".
CREATE INDEX repair_queue_session_idx ON memshift.repair_queue (session_id, target);
