-- The PostgreSQL side of the llamaindex layout: memshift's messages projected into
-- llama-index-storage-chat-store-postgres' table, in the transaction that writes them.
-- Names in braces ({table}, {index}, {unique}, {element}, {key_prefix}) are filled in
-- with psycopg.sql (Identifier, SQL, Literal); values are parameters. See projection.py.

-- name: create_projection_record
-- Which table the projection writes (one per database), with which key prefix, and
-- whether its messages are json or jsonb.
CREATE TABLE IF NOT EXISTS memshift.llamaindex_projection (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    key_prefix   text NOT NULL,
    element      text NOT NULL CHECK (element IN ('json', 'jsonb')),
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- name: create_sessions
-- The mapping: memshift session id -> the key PostgresChatStore is given (the same
-- key the application gave RedisChatStore). projected_next: the first seq not yet in
-- the chat store's array (it only grows).
CREATE TABLE IF NOT EXISTS memshift.llamaindex_sessions (
    session_id     text PRIMARY KEY,
    chat_key       text NOT NULL UNIQUE,
    projected_next bigint NOT NULL DEFAULT 0,
    projected_at   timestamptz
);

-- name: installed
SELECT table_schema, table_name, key_prefix, element FROM memshift.llamaindex_projection;

-- name: table_columns
SELECT column_name, data_type, udt_name FROM information_schema.columns
 WHERE table_schema = %(schema)s AND table_name = %(table)s;

-- name: create_chat_table
-- Exactly what PostgresChatStore's SQLAlchemy model creates (same constraint and
-- index names), so that it finds the table there and uses it.
CREATE TABLE IF NOT EXISTS {table} (
    id SERIAL PRIMARY KEY,
    key VARCHAR NOT NULL,
    value {element}[],
    CONSTRAINT {unique} UNIQUE (key)
);

-- name: create_chat_index
CREATE INDEX IF NOT EXISTS {index} ON {table} (key);

-- name: foreign_rows
-- Rows of the chat store table that memshift did not write.
SELECT count(*) FROM {table} c
 WHERE NOT EXISTS (SELECT 1 FROM memshift.llamaindex_sessions l WHERE l.chat_key = c.key);

-- name: message_function
-- The object LlamaIndex stores for one memshift message: the SQL twin of
-- memshift.stores.layouts.llamaindex.messages.to_dict (a test checks they agree).
CREATE OR REPLACE FUNCTION memshift.llamaindex_message(
    role text, content text, tool_call_id text, metadata jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT jsonb_build_object('role', role)
        || coalesce(kept -> 'data',
                    jsonb_build_object('additional_kwargs',
                        CASE WHEN tool_call_id IS NULL THEN jsonb_build_object()
                             ELSE jsonb_build_object('tool_call_id', tool_call_id) END))
        || CASE coalesce(kept ->> 'content', 'text')
             WHEN 'text' THEN jsonb_build_object('blocks', jsonb_build_array(
                                  jsonb_build_object('block_type', 'text', 'text', content)))
             WHEN 'none' THEN jsonb_build_object('blocks', jsonb_build_array())
             WHEN 'blocks' THEN jsonb_build_object('blocks', content::jsonb)
             WHEN 'legacy' THEN jsonb_build_object('content', to_jsonb(content))
             ELSE jsonb_build_object('content', 'null'::jsonb) END
      FROM (SELECT CASE WHEN jsonb_typeof(metadata -> 'llamaindex') = 'object'
                         AND jsonb_typeof(metadata -> 'llamaindex' -> 'data') = 'object'
                         AND metadata -> 'llamaindex' ->> 'content'
                             IN ('text', 'none', 'blocks', 'legacy', 'legacy-null')
                        THEN metadata -> 'llamaindex' END AS kept) AS k
$fn$;

-- name: project_function
-- Append the sessions' messages that are not in the chat store yet to each session's
-- array, in seq order, up to the first missing seq (a later one waits until the gap
-- is filled, so the array is always the transcript in order). The sessions' mapping
-- rows are locked first, in id order: one projector per session at a time, and each
-- later statement sees what the one before it committed.
CREATE OR REPLACE FUNCTION memshift.llamaindex_project(ids text[]) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    added bigint;
BEGIN
    INSERT INTO memshift.llamaindex_sessions (session_id, chat_key, projected_next)
    SELECT id, {key_prefix} || id,
           coalesce((SELECT s.messages_trimmed FROM memshift.sessions s
                      WHERE s.session_id = id), 0)
      FROM unnest(ids) AS id
    ON CONFLICT (session_id) DO NOTHING;
    PERFORM 1 FROM memshift.llamaindex_sessions
      WHERE session_id = ANY(ids) ORDER BY session_id FOR UPDATE;
    WITH pending AS (
        SELECT l.session_id, l.chat_key, m.seq, m.role, m.content, m.tool_call_id,
               m.metadata,
               m.seq - l.projected_next
                 - row_number() OVER (PARTITION BY m.session_id ORDER BY m.seq) + 1 AS hole
          FROM memshift.llamaindex_sessions l
          JOIN memshift.messages m
            ON m.session_id = l.session_id AND m.seq >= l.projected_next
         WHERE l.session_id = ANY(ids)
    ), ready AS (
        SELECT session_id, chat_key, max(seq) + 1 AS next_seq, count(*) AS n,
               array_agg(memshift.llamaindex_message(role, content, tool_call_id,
                                                     metadata)::{element}
                         ORDER BY seq) AS value
          FROM pending WHERE hole = 0
         GROUP BY session_id, chat_key
    ), written AS (
        INSERT INTO {table} AS c (key, value)
        SELECT chat_key, value FROM ready ORDER BY chat_key
        ON CONFLICT (key) DO UPDATE SET value = array_cat(c.value, excluded.value)
    ), moved AS (
        UPDATE memshift.llamaindex_sessions l
           SET projected_next = r.next_seq, projected_at = now()
          FROM ready r
         WHERE l.session_id = r.session_id
    )
    SELECT coalesce(sum(n), 0) INTO added FROM ready;
    RETURN added;
END
$fn$;

-- name: record_install
INSERT INTO memshift.llamaindex_projection (table_schema, table_name, key_prefix, element)
VALUES (%(schema)s, %(table)s, %(key_prefix)s, %(element)s)
ON CONFLICT (singleton) DO NOTHING;

-- name: render
-- One truth message m as the chat store's array holds it (projection/'s expected).
memshift.llamaindex_message(m.role, m.content, m.tool_call_id, m.metadata)

-- name: projected
-- What the chat store holds for each session given, in array order.
SELECT i.session_id,
       ARRAY(SELECT v::jsonb FROM unnest(c.value) WITH ORDINALITY AS u(v, n) ORDER BY n)
           AS messages
  FROM unnest(%(ids)s::text[]) AS i(session_id)
  JOIN {table} c ON c.key = {key_prefix} || i.session_id
