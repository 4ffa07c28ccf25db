-- Named queries of the PostgreSQL store. Each starts with "-- name: NAME" and runs
-- as one statement (one round trip). Parameters are psycopg's %(name)s, never
-- formatted into the text. The monotonic guards of DESIGN §2 are here, so that any
-- write may land any number of times and in any order.

-- name: schema_version
SELECT coalesce(max(version), 0) FROM memshift.schema_version;

-- name: load_session
-- The whole session in one statement: the session row as JSON and each part as a
-- JSON array in text form (validated in one call on the client).
{{session_parts rows=one_session_id}}

-- name: one_session_id
%(session_id)s

-- name: load_sessions
-- Many sessions in one statement: load_session's columns for each id given, in the
-- order given, after the id itself. An id held by neither store comes back too (a
-- NULL session and empty parts), as load_session's row does.
SELECT ids.session_id, parts.*
  FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS ids(session_id, n)
 CROSS JOIN LATERAL ({{session_parts rows=each_session_id}}) AS parts
 ORDER BY ids.n

-- name: each_session_id
ids.session_id

-- name: session_parts
-- load_session's columns for one session, whose id the rows slot gives: a
-- parameter (load_session) or a column of the enclosing query (load_sessions).
SELECT
    -- A placeholder that no session write has reached yet has no updated_at of its
    -- own: it shows its created_at (the time of its first part).
    (SELECT to_jsonb(s) - 'next_seq' - 'next_event_seq' - 'placeholder'
            || jsonb_build_object('updated_at', CASE WHEN s.updated_at = '-infinity'
                                                     THEN s.created_at ELSE s.updated_at END)
       FROM memshift.sessions s WHERE s.session_id = {{rows}}),
    (SELECT coalesce(jsonb_agg(to_jsonb(m) - 'session_id' ORDER BY m.seq), '[]')::text
       FROM memshift.messages m WHERE m.session_id = {{rows}}),
    (SELECT coalesce(jsonb_agg(to_jsonb(t) - 'session_id' - 'content_hash'
                               ORDER BY t.tool_call_id), '[]')::text
       FROM memshift.tool_runs t WHERE t.session_id = {{rows}}),
    (SELECT coalesce(jsonb_agg(to_jsonb(u) - 'session_id' ORDER BY u.version), '[]')::text
       FROM memshift.summaries u WHERE u.session_id = {{rows}}),
    (SELECT coalesce(jsonb_agg(to_jsonb(c) - 'session_id'
                               ORDER BY c.step, c.checkpoint_id), '[]')::text
       FROM memshift.checkpoints c WHERE c.session_id = {{rows}}),
    (SELECT coalesce(jsonb_agg(to_jsonb(e) - 'session_id' ORDER BY e.event_seq), '[]')::text
       FROM memshift.events e WHERE e.session_id = {{rows}})

-- name: merge_sessions
-- The guarded upsert of session records, from the rows given, in the column order below.
-- A newer (version, updated_at) replaces the record; a placeholder is always
-- replaced; messages_trimmed only grows; created_at only shrinks.
INSERT INTO memshift.sessions AS s
    (session_id, tenant_id, user_id, status, version, created_at, updated_at,
     messages_trimmed, metadata, expires_at, next_seq)
{{rows}}
ON CONFLICT (session_id) DO UPDATE SET
    tenant_id  = CASE WHEN s.placeholder OR (excluded.version, excluded.updated_at)
                            > (s.version, s.updated_at)
                      THEN excluded.tenant_id ELSE s.tenant_id END,
    user_id    = CASE WHEN s.placeholder OR (excluded.version, excluded.updated_at)
                            > (s.version, s.updated_at)
                      THEN excluded.user_id ELSE s.user_id END,
    -- A placeholder's status came from a replicated status change with its own
    -- version, so only a newer version replaces it.
    status     = CASE WHEN (excluded.version, excluded.updated_at)
                            > (s.version, s.updated_at)
                      THEN excluded.status ELSE s.status END,
    created_at = CASE WHEN s.placeholder THEN excluded.created_at
                      ELSE least(s.created_at, excluded.created_at) END,
    metadata   = CASE WHEN s.placeholder OR (excluded.version, excluded.updated_at)
                            > (s.version, s.updated_at)
                      THEN excluded.metadata ELSE s.metadata END,
    expires_at = CASE WHEN s.placeholder OR (excluded.version, excluded.updated_at)
                            > (s.version, s.updated_at)
                      THEN excluded.expires_at ELSE s.expires_at END,
    version    = greatest(s.version, excluded.version),
    updated_at = greatest(s.updated_at, excluded.updated_at),
    messages_trimmed = greatest(s.messages_trimmed, excluded.messages_trimmed),
    next_seq   = greatest(s.next_seq, excluded.messages_trimmed),
    placeholder = false
WHERE s.placeholder
   OR (excluded.version, excluded.updated_at) > (s.version, s.updated_at)
   OR excluded.messages_trimmed > s.messages_trimmed

-- name: session_row
VALUES (%(session_id)s, %(tenant_id)s, %(user_id)s, %(status)s, %(version)s,
        %(created_at)s, %(updated_at)s, %(messages_trimmed)s, %(metadata)s,
        %(expires_at)s, %(messages_trimmed)s)

-- name: save_session
-- Reports whether it changed the row, and whether the row already held this version.
WITH old AS (
    SELECT version, updated_at, placeholder
      FROM memshift.sessions WHERE session_id = %(session_id)s
), up AS (
    {{merge_sessions rows=session_row}}
    RETURNING 1
)
SELECT (SELECT count(*) FROM up),
       coalesce(old.version = %(version)s AND old.updated_at = %(updated_at)s, false)
  FROM (SELECT 1) AS one LEFT JOIN old ON true;

-- name: append_message_assign
-- PostgreSQL is primary: the seq comes from the session row in the same statement.
-- A duplicate message id raises a unique violation, which undoes the seq bump too.
WITH s AS (
    UPDATE memshift.sessions SET next_seq = next_seq + 1
     WHERE session_id = %(session_id)s
    RETURNING next_seq - 1 AS seq
)
INSERT INTO memshift.messages
    (session_id, seq, message_id, role, content, ts, tool_call_id, metadata)
SELECT %(session_id)s, s.seq, %(message_id)s, %(role)s, %(content)s, %(ts)s, %(tool_call_id)s,
       %(metadata)s
  FROM s
RETURNING seq;

-- name: append_message_carried
-- A replicated write carries its seq: insert it, or report what already holds that
-- seq or message id (the outer SELECT sees the rows as they were before the insert).
WITH ins AS (
    INSERT INTO memshift.messages
        (session_id, seq, message_id, role, content, ts, tool_call_id, metadata)
    VALUES (%(session_id)s, %(seq)s, %(message_id)s, %(role)s, %(content)s, %(ts)s,
            %(tool_call_id)s, %(metadata)s)
    ON CONFLICT DO NOTHING
    RETURNING seq
), sess AS (
    -- A placeholder session is as old as its oldest part, whatever the arrival order.
    INSERT INTO memshift.sessions AS s (session_id, placeholder, next_seq, created_at)
    SELECT %(session_id)s, true, ins.seq + 1, %(ts)s FROM ins
    ON CONFLICT (session_id) DO UPDATE SET
        next_seq = greatest(s.next_seq, excluded.next_seq),
        created_at = CASE WHEN s.placeholder THEN least(s.created_at, excluded.created_at)
                          ELSE s.created_at END
    WHERE s.next_seq < excluded.next_seq
       OR (s.placeholder AND excluded.created_at < s.created_at)
)
SELECT true, seq, NULL, NULL, NULL, NULL, NULL, NULL FROM ins
UNION ALL
SELECT false, m.seq, m.message_id, m.role, m.content, m.ts, m.tool_call_id, m.metadata
  FROM memshift.messages m
 WHERE m.session_id = %(session_id)s AND (m.seq = %(seq)s OR m.message_id = %(message_id)s);

-- name: message_by_id
SELECT seq, message_id, role, content, ts, tool_call_id, metadata
  FROM memshift.messages WHERE session_id = %(session_id)s AND message_id = %(message_id)s;

-- name: session_exists
SELECT 1 FROM memshift.sessions WHERE session_id = %(session_id)s;

-- name: record_message_conflict
INSERT INTO memshift.message_conflicts (session_id, seq, existing, incoming)
VALUES (%(session_id)s, %(seq)s, %(existing)s, %(incoming)s)
ON CONFLICT DO NOTHING;

-- name: merge_tool_runs
-- The guarded upsert of tool runs, from the rows given, in the column order below. Fields
-- come from the winning write (memshift.tool_run_wins), its metadata too; attempts
-- never decrease.
INSERT INTO memshift.tool_runs AS t
    (session_id, tool_call_id, name, args, status, attempts, last_error, updated_at,
     content_hash, metadata)
{{rows}}
ON CONFLICT (session_id, tool_call_id) DO UPDATE SET
    name = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.name ELSE t.name END,
    args = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.args ELSE t.args END,
    status = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.status ELSE t.status END,
    last_error = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.last_error ELSE t.last_error END,
    updated_at = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.updated_at ELSE t.updated_at END,
    content_hash = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.content_hash ELSE t.content_hash END,
    metadata = CASE WHEN memshift.tool_run_wins(excluded.status, excluded.updated_at,
               excluded.content_hash, t.status, t.updated_at, t.content_hash)
                THEN excluded.metadata ELSE t.metadata END,
    attempts = greatest(t.attempts, excluded.attempts)
WHERE memshift.tool_run_wins(excluded.status, excluded.updated_at, excluded.content_hash,
                             t.status, t.updated_at, t.content_hash)
   OR excluded.attempts > t.attempts

-- name: tool_run_row
VALUES (%(session_id)s, %(tool_call_id)s, %(name)s, %(args)s, %(status)s, %(attempts)s,
        %(last_error)s, %(updated_at)s, %(content_hash)s, %(metadata)s)

-- name: upsert_tool_run
-- Returns the stored run after the write, whether or not it changed.
WITH up AS (
    {{merge_tool_runs rows=tool_run_row}}
    RETURNING tool_call_id, name, args, status, attempts, last_error, updated_at, metadata
)
SELECT * FROM up
UNION ALL
SELECT tool_call_id, name, args, status, attempts, last_error, updated_at, metadata
  FROM memshift.tool_runs
 WHERE session_id = %(session_id)s AND tool_call_id = %(tool_call_id)s
   AND NOT EXISTS (SELECT 1 FROM up);

-- name: put_summary
-- History is kept; the latest is the highest version. The first write of a
-- version wins. Reports whether it was inserted, the highest version before, and
-- the text stored for this version before.
WITH ins AS (
    INSERT INTO memshift.summaries
        (session_id, version, text, covers_through, updated_at, metadata)
    VALUES (%(session_id)s, %(version)s, %(text)s, %(covers_through)s, %(updated_at)s,
            %(metadata)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins),
       (SELECT max(version) FROM memshift.summaries WHERE session_id = %(session_id)s),
       (SELECT text FROM memshift.summaries
         WHERE session_id = %(session_id)s AND version = %(version)s);

-- name: put_checkpoint
-- Every checkpoint of the chain is kept; the latest is the highest step.
WITH ins AS (
    INSERT INTO memshift.checkpoints
        (session_id, checkpoint_id, parent_id, step, state, created_at, metadata)
    VALUES (%(session_id)s, %(checkpoint_id)s, %(parent_id)s, %(step)s, %(state)s,
            %(created_at)s, %(metadata)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins),
       (SELECT max(step) FROM memshift.checkpoints WHERE session_id = %(session_id)s),
       (SELECT step = %(step)s AND parent_id IS NOT DISTINCT FROM %(parent_id)s
               AND state = %(state)s
          FROM memshift.checkpoints
         WHERE session_id = %(session_id)s AND checkpoint_id = %(checkpoint_id)s);

-- name: set_status_assign
-- PostgreSQL is primary: check the move against the current status (row locked),
-- bump the version, and append the event with the next event_seq, all at once.
WITH cur AS (
    SELECT status, version FROM memshift.sessions
     WHERE session_id = %(session_id)s FOR UPDATE
), upd AS (
    UPDATE memshift.sessions s
       SET status = %(to_status)s, version = s.version + 1,
           updated_at = greatest(s.updated_at, %(at)s),
           next_event_seq = s.next_event_seq + 1, placeholder = false
      FROM cur
     WHERE s.session_id = %(session_id)s AND cur.status = ANY(%(legal_from)s)
    RETURNING s.next_event_seq - 1 AS event_seq,
              to_jsonb(s) - 'next_seq' - 'next_event_seq' - 'placeholder' AS session
), ev AS (
    INSERT INTO memshift.events (session_id, event_seq, type, from_status, to_status, at, data)
    SELECT %(session_id)s, upd.event_seq, 'status', cur.status, %(to_status)s, %(at)s, %(data)s
      FROM upd, cur
)
SELECT cur.status, upd.event_seq, upd.session FROM cur LEFT JOIN upd ON true;

-- name: record_event
-- A replicated event carries its event_seq: appended once, whatever the order.
-- (apply_status_change then applies the session snapshot with save_session.)
WITH ev AS (
    INSERT INTO memshift.events (session_id, event_seq, type, from_status, to_status, at, data)
    VALUES (%(session_id)s, %(event_seq)s, %(type)s, %(from_status)s, %(to_status)s, %(at)s,
            %(data)s)
    ON CONFLICT DO NOTHING
    RETURNING event_seq
)
INSERT INTO memshift.sessions AS s (session_id, placeholder, next_event_seq, created_at)
SELECT %(session_id)s, true, ev.event_seq + 1, %(at)s FROM ev
ON CONFLICT (session_id) DO UPDATE SET
    next_event_seq = greatest(s.next_event_seq, excluded.next_event_seq),
    created_at = CASE WHEN s.placeholder THEN least(s.created_at, excluded.created_at)
                      ELSE s.created_at END
WHERE s.next_event_seq < excluded.next_event_seq
   OR (s.placeholder AND excluded.created_at < s.created_at);

-- name: list_sessions
SELECT session_id FROM memshift.sessions
 WHERE session_id > %(after)s
 ORDER BY session_id
 LIMIT %(limit)s;

-- ---------------------------------------------------------------------------------
-- Bulk merge (the backfill): a batch is COPYed into staging tables, then merged
-- with the same guarded upserts as the live writes, in one transaction.

-- name: stage_create
CREATE TEMP TABLE IF NOT EXISTS stage_sessions
    (LIKE memshift.sessions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_messages
    (LIKE memshift.messages) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_tool_runs
    (LIKE memshift.tool_runs) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_summaries
    (LIKE memshift.summaries) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_checkpoints
    (LIKE memshift.checkpoints) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_events
    (LIKE memshift.events) ON COMMIT DELETE ROWS

-- name: stage_session_rows
SELECT session_id, tenant_id, user_id, status, version, created_at, updated_at,
       messages_trimmed, metadata, expires_at, messages_trimmed
  FROM stage_sessions

-- Each bulk merge returns the sessions it changed, once each, and how many rows.

-- name: bulk_merge_sessions
WITH changed AS (
    {{merge_sessions rows=stage_session_rows}}
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_merge_messages
WITH changed AS (
    INSERT INTO memshift.messages
        (session_id, seq, message_id, role, content, ts, tool_call_id, metadata)
    SELECT session_id, seq, message_id, role, content, ts, tool_call_id, metadata
      FROM stage_messages
    ON CONFLICT DO NOTHING
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_message_conflicts
-- Staged messages whose seq or id holds other content: recorded, never applied.
-- (Other metadata is not other content, as in Message.same_content.) Run only when
-- some staged rows were not inserted; each join uses an index of memshift.messages.
WITH clash AS (
    SELECT st.session_id, st.seq, to_jsonb(m) - 'session_id' AS existing,
           to_jsonb(st) - 'session_id' AS incoming
      FROM stage_messages st
      JOIN memshift.messages m ON m.session_id = st.session_id AND m.seq = st.seq
     WHERE (m.message_id, m.role, m.content, m.tool_call_id)
           IS DISTINCT FROM (st.message_id, st.role, st.content, st.tool_call_id)
    UNION ALL
    SELECT st.session_id, st.seq, to_jsonb(m) - 'session_id', to_jsonb(st) - 'session_id'
      FROM stage_messages st
      JOIN memshift.messages m
        ON m.session_id = st.session_id AND m.message_id = st.message_id AND m.seq <> st.seq
), recorded AS (
    INSERT INTO memshift.message_conflicts (session_id, seq, existing, incoming)
    SELECT session_id, seq, existing, incoming FROM clash
    ON CONFLICT DO NOTHING
)
SELECT session_id, count(*) FROM clash GROUP BY session_id

-- name: bulk_next_seq
UPDATE memshift.sessions s
   SET next_seq = staged.next_seq
  FROM (SELECT session_id, max(seq) + 1 AS next_seq
          FROM stage_messages GROUP BY session_id) AS staged
 WHERE s.session_id = staged.session_id AND s.next_seq < staged.next_seq

-- name: stage_tool_run_rows
SELECT session_id, tool_call_id, name, args, status, attempts, last_error, updated_at,
       content_hash, metadata
  FROM stage_tool_runs

-- name: bulk_merge_tool_runs
WITH changed AS (
    {{merge_tool_runs rows=stage_tool_run_rows}}
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_merge_summaries
WITH changed AS (
    INSERT INTO memshift.summaries
        (session_id, version, text, covers_through, updated_at, metadata)
    SELECT session_id, version, text, covers_through, updated_at, metadata
      FROM stage_summaries
    ON CONFLICT DO NOTHING
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_merge_checkpoints
WITH changed AS (
    INSERT INTO memshift.checkpoints
        (session_id, checkpoint_id, parent_id, step, state, created_at, metadata)
    SELECT session_id, checkpoint_id, parent_id, step, state, created_at, metadata
      FROM stage_checkpoints
    ON CONFLICT DO NOTHING
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_merge_events
WITH changed AS (
    INSERT INTO memshift.events
        (session_id, event_seq, type, from_status, to_status, at, data)
    SELECT session_id, event_seq, type, from_status, to_status, at, data FROM stage_events
    ON CONFLICT DO NOTHING
    RETURNING session_id
)
SELECT session_id, count(*) FROM changed GROUP BY session_id

-- name: bulk_next_event_seq
UPDATE memshift.sessions s
   SET next_event_seq = staged.next_event_seq
  FROM (SELECT session_id, max(event_seq) + 1 AS next_event_seq
          FROM stage_events GROUP BY session_id) AS staged
 WHERE s.session_id = staged.session_id AND s.next_event_seq < staged.next_event_seq

-- ---------------------------------------------------------------------------------
-- Backfill runs and batches.

-- name: backfill_start_or_join
-- The one unfinished run for this source, or a new one.
INSERT INTO memshift.backfill_runs AS r (format, source, layout, prefix, batch_size)
VALUES (%(format)s, %(source)s, %(layout)s, %(prefix)s, %(batch_size)s)
ON CONFLICT (source, layout, prefix) WHERE state IN ('discovering', 'copying')
DO UPDATE SET updated_at = now()
RETURNING run_id, format, source, layout, prefix, batch_size, state, scan_cursors,
          sessions_seen, quarantined, batches_total, started_at, updated_at, finished_at

-- name: backfill_mark_seen
-- Ids discovery has not seen before in this run (SCAN may return a key twice).
INSERT INTO memshift.backfill_seen (run_id, session_id)
SELECT %(run_id)s, unnest(%(ids)s::text[])
ON CONFLICT DO NOTHING
RETURNING session_id

-- name: backfill_add_batch
WITH r AS (
    UPDATE memshift.backfill_runs SET batches_total = batches_total + 1, updated_at = now()
     WHERE run_id = %(run_id)s
    RETURNING batches_total - 1 AS batch_no
)
INSERT INTO memshift.backfill_batches (run_id, batch_no, session_ids)
SELECT %(run_id)s, r.batch_no, %(ids)s FROM r

-- name: backfill_save_cursor
UPDATE memshift.backfill_runs
   SET scan_cursors = %(cursors)s, sessions_seen = sessions_seen + %(seen)s,
       quarantined = quarantined + %(quarantined)s, updated_at = now()
 WHERE run_id = %(run_id)s

-- name: backfill_discovered
UPDATE memshift.backfill_runs SET state = 'copying', updated_at = now()
 WHERE run_id = %(run_id)s AND state = 'discovering'

-- name: backfill_claim
-- The next batch that nobody holds (or whose holder's lease ran out).
UPDATE memshift.backfill_batches b
   SET claimed_by = %(worker)s,
       lease_until = now() + make_interval(secs => %(lease)s),
       attempts = b.attempts + 1
 WHERE (b.run_id, b.batch_no) = (
        SELECT run_id, batch_no FROM memshift.backfill_batches
         WHERE run_id = %(run_id)s AND state = 'pending'
           AND (lease_until IS NULL OR lease_until < now())
         ORDER BY batch_no
         LIMIT 1
           FOR UPDATE SKIP LOCKED)
RETURNING b.batch_no, b.session_ids

-- name: backfill_state
SELECT r.state,
       (SELECT count(*) FROM memshift.backfill_batches b
         WHERE b.run_id = r.run_id AND b.state = 'pending')
  FROM memshift.backfill_runs r WHERE r.run_id = %(run_id)s

-- name: backfill_finish_batch
UPDATE memshift.backfill_batches
   SET state = 'done', done_at = now(), migrated = %(migrated)s,
       unchanged = %(unchanged)s, quarantined = %(quarantined)s,
       vanished = %(vanished)s, messages = %(messages)s, claimed_by = %(worker)s
 WHERE run_id = %(run_id)s AND batch_no = %(batch_no)s AND state = 'pending'
RETURNING 1

-- name: backfill_complete
UPDATE memshift.backfill_runs SET state = 'completed', finished_at = now(), updated_at = now()
 WHERE run_id = %(run_id)s AND state = 'copying'
   AND NOT EXISTS (SELECT 1 FROM memshift.backfill_batches
                    WHERE run_id = %(run_id)s AND state = 'pending')

-- name: backfill_runs
SELECT r.*, now() AS now,
       count(b.*) FILTER (WHERE b.state = 'done') AS batches_done,
       coalesce(sum(b.migrated), 0)::bigint AS migrated,
       coalesce(sum(b.unchanged), 0)::bigint AS unchanged,
       r.quarantined + coalesce(sum(b.quarantined), 0)::bigint AS quarantined,
       coalesce(sum(b.vanished), 0)::bigint AS vanished,
       coalesce(sum(b.messages), 0)::bigint AS messages
  FROM memshift.backfill_runs r
  LEFT JOIN memshift.backfill_batches b ON b.run_id = r.run_id
 GROUP BY r.run_id
 ORDER BY r.run_id DESC
 LIMIT %(limit)s

-- name: backfill_run
SELECT r.*, now() AS now,
       count(b.*) FILTER (WHERE b.state = 'done') AS batches_done,
       coalesce(sum(b.migrated), 0)::bigint AS migrated,
       coalesce(sum(b.unchanged), 0)::bigint AS unchanged,
       r.quarantined + coalesce(sum(b.quarantined), 0)::bigint AS quarantined,
       coalesce(sum(b.vanished), 0)::bigint AS vanished,
       coalesce(sum(b.messages), 0)::bigint AS messages
  FROM memshift.backfill_runs r
  LEFT JOIN memshift.backfill_batches b ON b.run_id = r.run_id
 WHERE r.run_id = %(run_id)s
 GROUP BY r.run_id

-- ---------------------------------------------------------------------------------
-- Quarantine.

-- name: quarantine_record
INSERT INTO memshift.quarantine AS q (source, session_key, session_id, reason, raw, run_id)
VALUES (%(source)s, %(session_key)s, %(session_id)s, %(reason)s, %(raw)s, %(run_id)s)
ON CONFLICT (source, session_key) DO UPDATE SET
    reason = excluded.reason, raw = excluded.raw, run_id = excluded.run_id,
    state = 'open', resolved_at = NULL, seen = q.seen + 1, last_seen = now()

-- name: quarantine_resolve
UPDATE memshift.quarantine SET state = 'resolved', resolved_at = now()
 WHERE source = %(source)s AND session_key = %(session_key)s AND state = 'open'

-- name: quarantine_list
SELECT id, source, session_id, reason, state, seen, first_seen, last_seen
  FROM memshift.quarantine
 WHERE (%(state)s::text IS NULL OR state = %(state)s)
 ORDER BY last_seen DESC, id DESC
 LIMIT %(limit)s

-- name: quarantine_get
SELECT id, source, session_key, session_id, reason, raw, run_id, state, seen, first_seen,
       last_seen, resolved_at
  FROM memshift.quarantine WHERE id = %(id)s

-- ---------------------------------------------------------------------------------
-- The Plan.

-- name: plan_get
SELECT version, stage, slices, rules, changed_at, changed_by FROM memshift.plan

-- name: plan_lock
SELECT version, stage, slices, rules, changed_at, changed_by FROM memshift.plan FOR UPDATE

-- name: plan_put
UPDATE memshift.plan
   SET version = version + 1, stage = %(stage)s, slices = %(slices)s, rules = %(rules)s,
       changed_at = now(), changed_by = %(who)s
 WHERE version = %(version)s
RETURNING version, stage, slices, rules, changed_at, changed_by

-- name: plan_audit_add
INSERT INTO memshift.plan_audit (version, who, why, action, forced, before, after)
VALUES (%(version)s, %(who)s, %(why)s, %(action)s, %(forced)s, %(before)s, %(after)s)

-- name: plan_history
SELECT id, version, at, who, why, action, forced, before, after
  FROM memshift.plan_audit ORDER BY id DESC LIMIT %(limit)s

-- name: gate_backfill
-- Whether a backfill has completed, and whether one is still unfinished.
SELECT count(*) FILTER (WHERE state = 'completed'),
       count(*) FILTER (WHERE state IN ('discovering', 'copying'))
  FROM memshift.backfill_runs

-- ---------------------------------------------------------------------------------
-- The repair queue.

-- name: repair_enqueue
INSERT INTO memshift.repair_queue (session_id, target, operation, error, enqueued_at, spool_id)
VALUES (%(session_id)s, %(target)s, %(operation)s, %(error)s, %(enqueued_at)s, %(spool_id)s)
ON CONFLICT (spool_id) DO NOTHING

-- name: repair_pending
-- Whether this session has repairs pending for this store (then it is read elsewhere).
SELECT EXISTS (SELECT 1 FROM memshift.repair_queue
                WHERE session_id = %(session_id)s AND target = %(target)s)

-- name: load_session_unless_repair
-- A router's read of PostgreSQL as the secondary: the session, and whether repairs
-- are pending for it here (then the caller reads the primary instead), in one trip.
SELECT l.*,
       EXISTS (SELECT 1 FROM memshift.repair_queue
                WHERE session_id = %(session_id)s AND target = 'postgres')
  FROM ({{load_session}}) AS l

-- name: repair_targets
-- The stores that some repair is pending for.
SELECT DISTINCT target FROM memshift.repair_queue

-- name: repair_claim
-- One session's pending repairs for one store, locked; rows another worker holds, or
-- that failed since this run started, are left for later.
WITH first AS (
    SELECT session_id, target FROM memshift.repair_queue
     WHERE last_attempt_at IS NULL OR last_attempt_at < %(since)s
     ORDER BY id LIMIT 1
       FOR UPDATE SKIP LOCKED
)
SELECT q.id, q.session_id, q.target
  FROM memshift.repair_queue q JOIN first USING (session_id, target)
 WHERE q.last_attempt_at IS NULL OR q.last_attempt_at < %(since)s
   FOR UPDATE OF q SKIP LOCKED

-- name: repair_done
DELETE FROM memshift.repair_queue WHERE id = ANY(%(ids)s)

-- name: repair_failed
UPDATE memshift.repair_queue
   SET attempts = attempts + 1, last_error = %(error)s, last_attempt_at = clock_timestamp()
 WHERE id = ANY(%(ids)s)

-- name: repair_counts
SELECT target, count(*), count(DISTINCT session_id), min(enqueued_at)
  FROM memshift.repair_queue GROUP BY target ORDER BY target

-- ---------------------------------------------------------------------------------
-- Parity.

-- name: parity_record
-- One batch of reports in one statement (arrays of equal length, one element each).
INSERT INTO memshift.parity_results (session_id, status, checks, diffs, checked_at)
SELECT * FROM unnest(%(session_ids)s::text[], %(statuses)s::text[], %(checks)s::jsonb[],
                     %(diffs)s::jsonb[], %(checked_at)s::timestamptz[])

-- name: parity_sample
-- A random sample of the sessions PostgreSQL holds.
SELECT session_id FROM memshift.sessions ORDER BY random() LIMIT %(limit)s

-- name: parity_known
-- Which of these ids PostgreSQL holds (to skip, in Redis's pass, ids checked already).
SELECT session_id FROM memshift.sessions WHERE session_id = ANY(%(ids)s)

-- name: gate_parity
-- The latest judged results (pending ones are not judged yet): how many, how many passed.
SELECT count(*), count(*) FILTER (WHERE status = 'pass')
  FROM (SELECT status FROM memshift.parity_results
         WHERE status <> 'pending'
         ORDER BY checked_at DESC, id DESC
         LIMIT %(window)s) AS latest

-- ---------------------------------------------------------------------------------
-- Rollback rule.

-- name: parity_record_live
-- One live shadow compare's report, with the read path it sampled.
INSERT INTO memshift.parity_results (session_id, status, checks, diffs, checked_at, read_path)
VALUES (%(session_id)s, %(status)s, %(checks)s, %(diffs)s, %(checked_at)s, %(read_path)s)

-- name: rule_slice_changed_at
-- When this read path's slice (or the stage) last changed: evidence older than that
-- was about another Plan, so the rule leaves it out (a person's re-advance starts afresh).
SELECT max(at) FROM memshift.plan_audit
 WHERE before -> 'slices' -> %(read_path)s IS DISTINCT FROM after -> 'slices' -> %(read_path)s
    OR before -> 'stage' IS DISTINCT FROM after -> 'stage'

-- name: rule_window
-- The newest judged results for this read path (batch ones, with no path, count for
-- every path) since its slice changed: how many, how many failed, and how many
-- failures of each critical check.
WITH latest AS (
    SELECT status, checks FROM memshift.parity_results
     WHERE status <> 'pending' AND (%(since)s::timestamptz IS NULL OR checked_at > %(since)s)
       AND (read_path IS NULL OR read_path = %(read_path)s)
     ORDER BY checked_at DESC, id DESC
     LIMIT %(window)s
)
SELECT (SELECT count(*) FROM latest),
       (SELECT count(*) FROM latest WHERE status = 'fail'),
       (SELECT coalesce(jsonb_object_agg(name, n), '{}') FROM (
            SELECT c.name, count(*) AS n
              FROM latest, jsonb_each(latest.checks) AS c(name, ok)
             WHERE latest.status = 'fail' AND c.ok = 'false'::jsonb
               AND c.name = ANY(%(critical)s::text[])
             GROUP BY c.name) AS failures)

-- ---------------------------------------------------------------------------------
-- Rehearsal drills.

-- name: drill_forget
-- A drill's synthetic sessions, removed from every table once judged.
WITH ids AS (SELECT unnest(%(ids)s::text[]) AS session_id),
m AS (DELETE FROM memshift.messages WHERE session_id IN (SELECT session_id FROM ids)),
c AS (DELETE FROM memshift.message_conflicts
       WHERE session_id IN (SELECT session_id FROM ids)),
t AS (DELETE FROM memshift.tool_runs WHERE session_id IN (SELECT session_id FROM ids)),
u AS (DELETE FROM memshift.summaries WHERE session_id IN (SELECT session_id FROM ids)),
k AS (DELETE FROM memshift.checkpoints WHERE session_id IN (SELECT session_id FROM ids)),
e AS (DELETE FROM memshift.events WHERE session_id IN (SELECT session_id FROM ids))
DELETE FROM memshift.sessions WHERE session_id IN (SELECT session_id FROM ids)
