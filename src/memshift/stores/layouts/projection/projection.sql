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
