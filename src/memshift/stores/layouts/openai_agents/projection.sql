-- The PostgreSQL side of the openai-agents layout: memshift's messages projected into
-- the OpenAI Agents SDK's SQLAlchemySession tables, in the transaction that writes
-- them. Names in braces ({sessions}, {messages}, {index}) are filled in with
-- psycopg.sql.Identifier; values are parameters. See projection.py.

-- name: create_projection_record
-- Which tables the projection writes (one pair per database), and since when.
CREATE TABLE IF NOT EXISTS memshift.openai_agents_projection (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    table_schema   text NOT NULL,
    sessions_table text NOT NULL,
    messages_table text NOT NULL,
    installed_at   timestamptz NOT NULL DEFAULT now()
);

-- name: create_sessions
-- Per session: the first seq not projected yet (it only grows), and the created_at
-- of its last projected row (the SDK reads ORDER BY created_at, id).
CREATE TABLE IF NOT EXISTS memshift.openai_agents_sessions (
    session_id      text PRIMARY KEY,
    projected_next  bigint NOT NULL DEFAULT 0,
    last_created_at timestamp,
    projected_at    timestamptz
);

-- name: installed
SELECT table_schema, sessions_table, messages_table FROM memshift.openai_agents_projection;

-- name: database_zone
-- The time zone sessions of this database start in (a SET in this one does not count).
SELECT reset_val FROM pg_settings WHERE name = 'TimeZone';

-- name: create_sessions_table
-- Exactly what SQLAlchemySession's create_all makes on PostgreSQL.
CREATE TABLE IF NOT EXISTS {sessions} (
    session_id VARCHAR NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL,
    updated_at TIMESTAMP WITHOUT TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL,
    PRIMARY KEY (session_id)
);

-- name: create_messages_table
CREATE TABLE IF NOT EXISTS {messages} (
    id SERIAL NOT NULL,
    session_id VARCHAR NOT NULL,
    message_data TEXT NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES {sessions} (session_id) ON DELETE CASCADE
);

-- name: create_messages_index
CREATE INDEX IF NOT EXISTS {index} ON {messages} (session_id, created_at);

-- name: foreign_rows
-- Rows of the messages table that memshift did not write.
SELECT count(*) FROM {messages} m
 WHERE NOT EXISTS (SELECT 1 FROM memshift.openai_agents_sessions o
                    WHERE o.session_id = m.session_id);

-- name: item_function
-- The item the SDK stores for one memshift message: the SQL twin of
-- memshift.stores.layouts.openai_agents.items.to_item (a test checks they agree). One
-- expression, so that PostgreSQL inlines it into the projecting statement.
CREATE OR REPLACE FUNCTION memshift.openai_agents_item(
    role text, content text, metadata jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE
        WHEN jsonb_typeof(metadata -> 'openai_agents' -> 'item') IS DISTINCT FROM 'object'
            THEN jsonb_build_object('role', role, 'content', content)
        WHEN jsonb_typeof(metadata -> 'openai_agents' -> 'text') = 'string' THEN
            (metadata -> 'openai_agents' -> 'item') || jsonb_build_object(
                metadata -> 'openai_agents' ->> 'text',
                CASE WHEN metadata -> 'openai_agents' -> 'text_json' = 'true'::jsonb
                     THEN content::jsonb ELSE to_jsonb(content) END)
        ELSE metadata -> 'openai_agents' -> 'item'
    END
$fn$;

-- name: project_function
-- Project the sessions' messages that are not in the SDK's tables yet, in seq order,
-- up to the first missing seq (a later one waits until the gap is filled). The
-- sessions' mapping rows are locked first, in id order: one projector per session at
-- a time. created_at is the database's local time (the SDK's columns have no time
-- zone, and its own rows get CURRENT_TIMESTAMP in the server's zone), never before
-- the session's last projected row, so ORDER BY created_at, id is the seq order.
CREATE OR REPLACE FUNCTION memshift.openai_agents_project(ids text[]) RETURNS bigint
LANGUAGE plpgsql
-- Plan its statements once per connection: re-planning them for every write would
-- cost more than running them.
SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    added bigint;
    -- The database's own time zone, read when installed (not this session's).
    local_now timestamp := clock_timestamp() AT TIME ZONE {zone};
BEGIN
    INSERT INTO memshift.openai_agents_sessions (session_id, projected_next)
    SELECT id, coalesce((SELECT s.messages_trimmed FROM memshift.sessions s
                          WHERE s.session_id = id), 0)
      FROM unnest(ids) AS id
     WHERE NOT EXISTS (SELECT 1 FROM memshift.openai_agents_sessions o
                        WHERE o.session_id = id)
    ON CONFLICT (session_id) DO NOTHING;
    PERFORM 1 FROM memshift.openai_agents_sessions
      WHERE session_id = ANY(ids) ORDER BY session_id FOR UPDATE;
    INSERT INTO {sessions} AS t (session_id, created_at, updated_at)
    SELECT DISTINCT m.session_id, local_now, local_now
      FROM memshift.messages m JOIN memshift.openai_agents_sessions o
        ON o.session_id = m.session_id AND m.seq = o.projected_next
     WHERE m.session_id = ANY(ids)
    ON CONFLICT (session_id) DO UPDATE SET updated_at = greatest(
        t.updated_at, excluded.updated_at);
    WITH pending AS (
        SELECT o.session_id, m.seq, m.role, m.content, m.metadata,
               greatest(local_now, o.last_created_at) AS created_at,
               m.seq - o.projected_next
                 - row_number() OVER (PARTITION BY m.session_id ORDER BY m.seq) + 1 AS hole
          FROM memshift.openai_agents_sessions o
          JOIN memshift.messages m
            ON m.session_id = o.session_id AND m.seq >= o.projected_next
         WHERE o.session_id = ANY(ids)
    ), ready AS (
        SELECT * FROM pending WHERE hole = 0
    ), written AS (
        INSERT INTO {messages} (session_id, message_data, created_at)
        SELECT session_id, memshift.openai_agents_item(role, content, metadata)::text,
               created_at
          FROM ready ORDER BY session_id, seq
    ), moved AS (
        UPDATE memshift.openai_agents_sessions o
           SET projected_next = r.next_seq, last_created_at = r.created_at,
               projected_at = now()
          FROM (SELECT session_id, max(seq) + 1 AS next_seq, max(created_at) AS created_at
                  FROM ready GROUP BY session_id) AS r
         WHERE o.session_id = r.session_id
    )
    SELECT count(*) INTO added FROM ready;
    RETURN added;
END
$fn$;

-- name: record_install
INSERT INTO memshift.openai_agents_projection
    (table_schema, sessions_table, messages_table)
VALUES (%(schema)s, %(sessions)s, %(messages)s)
ON CONFLICT (singleton) DO NOTHING;

-- name: render
-- One truth message m as the SDK's messages table holds it (projection/'s expected).
memshift.openai_agents_item(m.role, m.content, m.metadata)

-- name: projected
-- What the SDK's messages table holds for each session given, in the order
-- SQLAlchemySession reads it.
SELECT session_id, array_agg(message_data::jsonb ORDER BY created_at, id) AS messages
  FROM {messages} WHERE session_id = ANY(%(ids)s) GROUP BY session_id
