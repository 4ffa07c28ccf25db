-- The PostgreSQL side of the langchain layout: memshift's messages projected into
-- langchain-postgres' chat history table, in the transaction that writes them.
-- Names in braces ({table}, {index}, {crypto}, {namespace}) are filled in with
-- psycopg.sql (Identifier, Literal); values are parameters. See projection.py.

-- name: pgcrypto
-- SHA-1 for uuid5; pgcrypto is a trusted extension (PostgreSQL 13+): a user who may
-- create objects in the database may install it.
CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- name: pgcrypto_schema
SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'pgcrypto';

-- name: create_projection_record
-- Which table the projection writes (one per database), and since when.
CREATE TABLE IF NOT EXISTS memshift.langchain_projection (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- name: create_sessions
-- The mapping the application reads: original session id -> the UUID that
-- PostgresChatMessageHistory is given. projected_next: the first seq not yet in the
-- chat history table (it only grows).
CREATE TABLE IF NOT EXISTS memshift.langchain_sessions (
    session_id     text PRIMARY KEY,
    session_uuid   uuid NOT NULL UNIQUE,
    projected_next bigint NOT NULL DEFAULT 0,
    projected_at   timestamptz
);

-- name: installed
SELECT table_schema, table_name FROM memshift.langchain_projection;

-- name: create_chat_table
-- Exactly langchain-postgres' PostgresChatMessageHistory.create_tables.
CREATE TABLE IF NOT EXISTS {table} (
    id SERIAL PRIMARY KEY,
    session_id UUID NOT NULL,
    message JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- name: create_chat_index
CREATE INDEX IF NOT EXISTS {index} ON {table} (session_id);

-- name: foreign_rows
-- Rows of the chat history table that memshift did not write.
SELECT count(*) FROM {table} c
 WHERE NOT EXISTS (SELECT 1 FROM memshift.langchain_sessions l
                    WHERE l.session_uuid = c.session_id);

-- name: uuid_function
-- uuid5(namespace, session id), as Python's uuid.uuid5 computes it.
CREATE OR REPLACE FUNCTION memshift.langchain_session_uuid(session_id text) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT encode(set_byte(set_byte(h, 6, (get_byte(h, 6) & 15) | 80),
                           8, (get_byte(h, 8) & 63) | 128), 'hex')::uuid
      FROM (SELECT substring({crypto}.digest(
                       decode({namespace}, 'hex') || convert_to(session_id, 'UTF8'), 'sha1')
                   FROM 1 FOR 16) AS h) AS hashed
$fn$;

-- name: message_function
-- The dict LangChain stores for one memshift message: the SQL twin of
-- memshift.stores.layouts.langchain.messages.to_dict (a test checks they agree). One
-- expression, so that PostgreSQL inlines it into the projecting statement rather
-- than planning a function call for every message.
CREATE OR REPLACE FUNCTION memshift.langchain_message(
    role text, content text, tool_call_id text, metadata jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE
        WHEN jsonb_typeof(metadata -> 'langchain' -> 'data') = 'object' THEN
            coalesce(CASE WHEN jsonb_typeof(metadata -> 'langchain' -> 'members') = 'object'
                          THEN metadata -> 'langchain' -> 'members' END, jsonb_build_object())
            || jsonb_build_object(
                   'type', role,
                   'data', jsonb_build_object(
                               'content',
                               CASE WHEN metadata -> 'langchain' -> 'content_json'
                                         = 'true'::jsonb
                                    THEN content::jsonb ELSE to_jsonb(content) END)
                           || (metadata -> 'langchain' -> 'data'))
        ELSE jsonb_build_object(
                 'type', role,
                 'data', jsonb_build_object('content', content, 'type', role)
                         || CASE WHEN tool_call_id IS NULL THEN jsonb_build_object()
                                 ELSE jsonb_build_object('tool_call_id', tool_call_id) END)
    END
$fn$;

-- name: project_function
-- Project the sessions' messages that are not in the chat history table yet, in seq
-- order, up to the first missing seq (a later one waits until the gap is filled, so
-- the table's id order is always the transcript's order). The sessions' mapping rows
-- are locked first, in id order: one projector per session at a time, and each later
-- statement sees what the one before it committed.
CREATE OR REPLACE FUNCTION memshift.langchain_project(ids text[]) RETURNS bigint
LANGUAGE plpgsql
-- Plan its statements once per connection: re-planning them for every write would
-- cost more than running them.
SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    added bigint;
BEGIN
    INSERT INTO memshift.langchain_sessions (session_id, session_uuid, projected_next)
    SELECT id, memshift.langchain_session_uuid(id),
           coalesce((SELECT s.messages_trimmed FROM memshift.sessions s
                      WHERE s.session_id = id), 0)
      FROM unnest(ids) AS id
     WHERE NOT EXISTS (SELECT 1 FROM memshift.langchain_sessions l WHERE l.session_id = id)
    ON CONFLICT (session_id) DO NOTHING;
    PERFORM 1 FROM memshift.langchain_sessions
      WHERE session_id = ANY(ids) ORDER BY session_id FOR UPDATE;
    WITH pending AS (
        SELECT l.session_id, l.session_uuid, m.seq, m.role, m.content, m.tool_call_id,
               m.metadata, m.ts,
               m.seq - l.projected_next
                 - row_number() OVER (PARTITION BY m.session_id ORDER BY m.seq) + 1 AS hole
          FROM memshift.langchain_sessions l
          JOIN memshift.messages m
            ON m.session_id = l.session_id AND m.seq >= l.projected_next
         WHERE l.session_id = ANY(ids)
    ), ready AS (
        SELECT * FROM pending WHERE hole = 0
    ), written AS (
        INSERT INTO {table} (session_id, message, created_at)
        SELECT session_uuid,
               memshift.langchain_message(role, content, tool_call_id, metadata),
               -- LangChain's own messages carry no time (memshift shows the epoch).
               CASE WHEN ts > 'epoch' THEN ts ELSE now() END
          FROM ready ORDER BY session_id, seq
    ), moved AS (
        UPDATE memshift.langchain_sessions l
           SET projected_next = r.next_seq, projected_at = now()
          FROM (SELECT session_id, max(seq) + 1 AS next_seq FROM ready
                 GROUP BY session_id) AS r
         WHERE l.session_id = r.session_id
    )
    SELECT count(*) INTO added FROM ready;
    RETURN added;
END
$fn$;

-- name: record_install
INSERT INTO memshift.langchain_projection (table_schema, table_name)
VALUES (%(schema)s, %(table)s)
ON CONFLICT (singleton) DO NOTHING;

-- name: render
-- One truth message m as the chat history table holds it (projection/'s expected).
memshift.langchain_message(m.role, m.content, m.tool_call_id, m.metadata)

-- name: projected
-- What the chat history table holds for each session given, in the order
-- PostgresChatMessageHistory reads it.
SELECT i.session_id, array_agg(c.message ORDER BY c.id) AS messages
  FROM unnest(%(ids)s::text[]) AS i(session_id)
  JOIN {table} c ON c.session_id = memshift.langchain_session_uuid(i.session_id)
 GROUP BY i.session_id
