-- What every framework projection shares (see __init__.py). Values are parameters.

-- name: lock
-- One installer at a time, whichever framework it installs.
SELECT pg_advisory_xact_lock(hashtext('memshift.projection'));

-- name: record_exists
SELECT to_regclass(%(table)s) IS NOT NULL;

-- name: sessions_after
-- Sessions holding messages, in id order after %(after)s (the catch-up's pages).
SELECT DISTINCT session_id FROM memshift.messages
 WHERE session_id > %(after)s ORDER BY session_id LIMIT %(limit)s;

-- name: table_columns
SELECT column_name, data_type FROM information_schema.columns
 WHERE table_schema = %(schema)s AND table_name = %(table)s;

-- name: current_schema
SELECT current_schema();

-- name: expected
-- What a framework table should hold for each session given: the truth's
-- messages, from the first seq it projected on (what Redis had trimmed before the
-- migration was never projected), each rendered as the framework stores it.
SELECT m.session_id, array_agg({render} ORDER BY m.seq) AS messages
  FROM memshift.messages m LEFT JOIN memshift.sessions s USING (session_id)
 WHERE m.session_id = ANY(%(ids)s) AND m.seq >= coalesce(s.messages_trimmed, 0)
 GROUP BY m.session_id

-- name: drift
-- The sessions whose framework rows differ from the truth, with both sides and the
-- seq of the first position. Both subqueries (this file's expected, the framework's
-- projected) yield (session_id, messages jsonb[]); a side with no row holds nothing.
SELECT session_id, coalesce(s.messages_trimmed, 0),
       coalesce(w.messages, ARRAY[]::jsonb[]), coalesce(h.messages, ARRAY[]::jsonb[])
  FROM ({expected}) AS w FULL JOIN ({projected}) AS h USING (session_id)
  LEFT JOIN memshift.sessions s USING (session_id)
 WHERE coalesce(w.messages, ARRAY[]::jsonb[]) IS DISTINCT FROM
       coalesce(h.messages, ARRAY[]::jsonb[]);

-- name: trigger_function
-- The trigger and its removal: names in braces are a framework's objects, named
-- after it (Framework.shared in __init__.py).
CREATE OR REPLACE FUNCTION {inserted}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM {project}(ARRAY(SELECT DISTINCT session_id FROM inserted ORDER BY 1));
    END IF;
    RETURN NULL;
END
$fn$;

-- name: drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON memshift.messages;

-- name: create_trigger
-- Every path that adds truth messages (live writes, backfill merges, repair) inserts
-- into memshift.messages: all of them project, in their own transaction.
CREATE TRIGGER {trigger} AFTER INSERT ON memshift.messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION {inserted}();

-- name: drop_functions
DROP FUNCTION IF EXISTS {inserted}(), {project}(text[]);

-- name: forget_install
DELETE FROM {record};

-- name: project
SELECT {project}(%(ids)s);
