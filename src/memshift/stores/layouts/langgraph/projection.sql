-- The PostgreSQL side of the langgraph layout: memshift's checkpoints and pending
-- writes projected into langgraph-checkpoint-postgres' tables, in the transaction
-- that writes them. Names in braces ({checkpoints}, {blobs}, {writes}) are filled in
-- with psycopg.sql.Identifier (and so '{{}}' is an empty JSON object there); values
-- are parameters. See projection.py.

-- name: lock
-- One installer at a time.
SELECT pg_advisory_xact_lock(hashtext('memshift.langgraph_projection'));

-- name: current_schema
SELECT current_schema();

-- name: saver_tables
-- PostgresSaver.setup()'s tables in a schema, with their columns.
SELECT table_name, array_agg(column_name::text ORDER BY column_name)
  FROM information_schema.columns
 WHERE table_schema = %(schema)s
   AND table_name IN ('checkpoints', 'checkpoint_blobs', 'checkpoint_writes')
 GROUP BY table_name;

-- name: create_projection_record
-- Which schema's tables the projection writes (one per database), and since when.
CREATE TABLE IF NOT EXISTS memshift.langgraph_projection (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    table_schema text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- name: installed
SELECT table_schema FROM memshift.langgraph_projection;

-- name: revive_function
-- A JSON value as RedisSaver's serializer wrote it, in the form PostgresSaver's
-- serializer revives from JSON ("json" type): RedisSaver marks an Interrupt as
-- {"__interrupt__": true, "value", ...} and a Send as {"__send__": true, "node",
-- "arg"}; PostgresSaver reads both as lc:2 constructor envelopes (LangGraph lists
-- them as safe types). LangChain objects (lc:1) and sets (lc:2) are the same in both.
CREATE OR REPLACE FUNCTION memshift.langgraph_revive(v jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    kind text := jsonb_typeof(v);
BEGIN
    IF kind = 'array' THEN
        RETURN (SELECT coalesce(jsonb_agg(memshift.langgraph_revive(e) ORDER BY n), '[]')
                  FROM jsonb_array_elements(v) WITH ORDINALITY AS a(e, n));
    ELSIF kind <> 'object' THEN
        RETURN v;
    ELSIF v -> '__interrupt__' = 'true'::jsonb AND v ? 'value' THEN
        RETURN jsonb_build_object(
            'lc', 2, 'type', 'constructor', 'id', '["langgraph", "types", "Interrupt"]'::jsonb,
            'kwargs', (SELECT jsonb_object_agg(key, CASE WHEN key = 'value'
                                                         THEN memshift.langgraph_revive(value)
                                                         ELSE value END)
                         FROM jsonb_each(v) WHERE key <> '__interrupt__'));
    ELSIF v -> '__send__' = 'true'::jsonb AND v ? 'node' AND v ? 'arg'
          AND (SELECT count(*) FROM jsonb_object_keys(v)) = 3 THEN
        RETURN jsonb_build_object(
            'lc', 2, 'type', 'constructor', 'id', '["langgraph", "types", "Send"]'::jsonb,
            'kwargs', jsonb_build_object('node', v -> 'node',
                                         'arg', memshift.langgraph_revive(v -> 'arg')));
    END IF;
    RETURN (SELECT coalesce(jsonb_object_agg(key, memshift.langgraph_revive(value)), '{}')
              FROM jsonb_each(v));
END
$fn$;

-- name: blob_function
-- A pending write's value, as PostgresSaver stores it: RedisSaver's base64 decoded;
-- a JSON value revived as above.
CREATE OR REPLACE FUNCTION memshift.langgraph_blob(kind text, blob text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN kind = 'json'
                THEN convert_to(memshift.langgraph_revive(
                         convert_from(decode(blob, 'base64'), 'UTF8')::jsonb)::text, 'UTF8')
                ELSE decode(blob, 'base64') END
$fn$;

-- name: put_checkpoints_function
-- Project truth checkpoints: the checkpoint row (primitive channel values inline, as
-- PostgresSaver.put keeps them; RedisSaver's own "type" and "pending_sends" members
-- left out) and one blob per other channel value, keyed by its version. Only
-- checkpoints that came from LangGraph (metadata.langgraph) are projected; a row
-- already there is kept (truth checkpoints never change).
CREATE OR REPLACE FUNCTION memshift.langgraph_put_checkpoints(rows memshift.checkpoints[])
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {checkpoints} (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
                               type, checkpoint, metadata)
    SELECT lg ->> 'thread_id', lg ->> 'checkpoint_ns', i.checkpoint_id, i.parent_id, NULL,
           (i.state - 'type' - 'pending_sends')
             || jsonb_build_object('channel_values', coalesce(
                    (SELECT jsonb_object_agg(key, value)
                       FROM jsonb_each(i.state -> 'channel_values')
                      WHERE jsonb_typeof(value) NOT IN ('object', 'array')), '{{}}')),
           coalesce(lg -> 'metadata', '{{}}')
      FROM unnest(rows) AS i CROSS JOIN LATERAL (SELECT i.metadata -> 'langgraph' AS lg) AS l
     WHERE jsonb_typeof(l.lg) = 'object'
    ON CONFLICT DO NOTHING;
    INSERT INTO {blobs} (thread_id, checkpoint_ns, channel, version, type, blob)
    SELECT lg ->> 'thread_id', lg ->> 'checkpoint_ns', v.key,
           i.state -> 'channel_versions' ->> v.key, 'json',
           convert_to(memshift.langgraph_revive(v.value)::text, 'UTF8')
      FROM unnest(rows) AS i CROSS JOIN LATERAL (SELECT i.metadata -> 'langgraph' AS lg) AS l
     CROSS JOIN LATERAL jsonb_each(i.state -> 'channel_values') AS v
     WHERE jsonb_typeof(l.lg) = 'object' AND jsonb_typeof(v.value) IN ('object', 'array')
       AND i.state -> 'channel_versions' ? v.key
    ON CONFLICT DO NOTHING;
END
$fn$;

-- name: put_writes_function
-- Project truth pending writes (tool runs that came from LangGraph). A truth write
-- changes only when its merge picks a newer one, so the projection follows it, as
-- PostgresSaver's own upsert of a special write (error, interrupt) does.
CREATE OR REPLACE FUNCTION memshift.langgraph_put_writes(rows memshift.tool_runs[])
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {writes} (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx,
                          channel, type, blob)
    SELECT lg ->> 'thread_id', lg ->> 'checkpoint_ns', lg ->> 'checkpoint_id',
           lg ->> 'task_id', coalesce(lg ->> 'task_path', ''), (lg ->> 'idx')::integer,
           c.name, c.args ->> 'type',
           memshift.langgraph_blob(c.args ->> 'type', c.args ->> 'blob')
      FROM unnest(rows) AS c CROSS JOIN LATERAL (SELECT c.metadata -> 'langgraph' AS lg) AS l
     WHERE jsonb_typeof(l.lg) = 'object'
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
       SET channel = excluded.channel, type = excluded.type, blob = excluded.blob;
END
$fn$;

-- name: trigger_functions
CREATE OR REPLACE FUNCTION memshift.langgraph_checkpoints_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM memshift.langgraph_put_checkpoints(ARRAY(SELECT i::memshift.checkpoints FROM inserted i));
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION memshift.langgraph_writes_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM memshift.langgraph_put_writes(ARRAY(SELECT c::memshift.tool_runs FROM changed c));
    RETURN NULL;
END
$fn$;

-- name: drop_triggers
DROP TRIGGER IF EXISTS langgraph_checkpoints ON memshift.checkpoints;
DROP TRIGGER IF EXISTS langgraph_writes_inserted ON memshift.tool_runs;
DROP TRIGGER IF EXISTS langgraph_writes_updated ON memshift.tool_runs;

-- name: create_triggers
-- Every path that adds truth checkpoints and pending writes (backfill merges, live
-- writes, repair) goes through these tables: all of them project, in their own
-- transaction.
CREATE TRIGGER langgraph_checkpoints AFTER INSERT ON memshift.checkpoints
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION memshift.langgraph_checkpoints_inserted();
CREATE TRIGGER langgraph_writes_inserted AFTER INSERT ON memshift.tool_runs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memshift.langgraph_writes_changed();
CREATE TRIGGER langgraph_writes_updated AFTER UPDATE ON memshift.tool_runs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memshift.langgraph_writes_changed();

-- name: record_install
INSERT INTO memshift.langgraph_projection (table_schema) VALUES (%(schema)s)
ON CONFLICT (singleton) DO NOTHING;

-- name: drop_functions
DROP FUNCTION IF EXISTS memshift.langgraph_checkpoints_inserted(),
    memshift.langgraph_writes_changed(),
    memshift.langgraph_put_checkpoints(memshift.checkpoints[]),
    memshift.langgraph_put_writes(memshift.tool_runs[]);

-- name: forget_install
DELETE FROM memshift.langgraph_projection;

-- name: sessions_after
-- Sessions holding LangGraph checkpoints, in id order after %(after)s (the catch-up's
-- pages).
SELECT DISTINCT session_id FROM memshift.checkpoints
 WHERE session_id > %(after)s AND metadata ? 'langgraph'
 ORDER BY session_id LIMIT %(limit)s;

-- name: catch_up
-- What the triggers would have projected for these sessions' truth rows.
SELECT memshift.langgraph_put_checkpoints(ARRAY(
           SELECT c FROM memshift.checkpoints c WHERE c.session_id = ANY(%(ids)s))),
       memshift.langgraph_put_writes(ARRAY(
           SELECT t FROM memshift.tool_runs t WHERE t.session_id = ANY(%(ids)s)));
