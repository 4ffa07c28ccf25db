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
    -- A dismissed session still bad in the same way stays dismissed; bad in another
    -- way (or bad again once resolved), it is open again.
    state = CASE WHEN q.state = 'dismissed' AND q.reason = excluded.reason
                 THEN 'dismissed' ELSE 'open' END,
    resolved_at = NULL, seen = q.seen + 1, last_seen = now()

-- name: quarantine_resolve
-- A dismissed entry whose session migrates after all is resolved too.
UPDATE memshift.quarantine SET state = 'resolved', resolved_at = now()
 WHERE source = %(source)s AND session_key = %(session_key)s
   AND state IN ('open', 'dismissed')

-- name: quarantine_dismiss
-- The operator accepts that these sessions are not migrated: who, when and why are
-- kept. Returns the entries dismissed now (open ones; the others are left as they are).
UPDATE memshift.quarantine
   SET state = 'dismissed', dismissed_at = now(), dismissed_by = %(who)s,
       dismissed_reason = %(why)s
 WHERE id = ANY(%(ids)s) AND state = 'open'
RETURNING id

-- name: quarantine_list
SELECT id, source, session_id, reason, state, seen, first_seen, last_seen, dismissed_at,
       dismissed_by, dismissed_reason
  FROM memshift.quarantine
 WHERE (%(state)s::text IS NULL OR state = %(state)s)
 ORDER BY last_seen DESC, id DESC
 LIMIT %(limit)s

-- name: quarantine_get
SELECT id, source, session_key, session_id, reason, raw, run_id, state, seen, first_seen,
       last_seen, resolved_at, dismissed_at, dismissed_by, dismissed_reason
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
-- How many backfills have completed. A run started before the Plan last moved back to
-- redis_only does not count: the writes made there since reached Redis alone.
SELECT count(*) FILTER (WHERE state = 'completed' AND started_at > coalesce(
           (SELECT max(a.at) FROM memshift.plan_audit a
             WHERE a.after ->> 'stage' = 'redis_only'
               AND a.before ->> 'stage' IS DISTINCT FROM 'redis_only'), '-infinity'))
  FROM memshift.backfill_runs

-- name: gate_backfill_unfinished
-- The unfinished runs, each with its source, so an operator can tell which to finish
-- and which to abandon (one started against a wrong Redis URL, say).
SELECT run_id, source, layout, prefix, state, started_at
  FROM memshift.backfill_runs
 WHERE state IN ('discovering', 'copying')
 ORDER BY run_id

-- name: backfill_abandon
-- An operator gives up on an unfinished run: who and why are kept, and the gates no
-- longer wait for it. Refused (no row) while a worker holds one of its batches or the
-- run moved in the last %(quiet)s seconds: a live backfill would go on working on it.
UPDATE memshift.backfill_runs r
   SET state = 'abandoned', finished_at = now(), updated_at = now(),
       abandoned_by = %(who)s, abandoned_reason = %(why)s
 WHERE run_id = %(run_id)s AND state IN ('discovering', 'copying')
   AND updated_at < now() - make_interval(secs => %(quiet)s)
   AND NOT EXISTS (SELECT 1 FROM memshift.backfill_batches b
                    WHERE b.run_id = r.run_id AND b.state = 'pending'
                      AND b.lease_until > now())
RETURNING run_id

-- name: backfill_activity
-- Why a run cannot be abandoned: its state, seconds since it moved, and the latest
-- lease a worker holds on one of its batches (NULL when none).
SELECT r.state, extract(epoch FROM now() - r.updated_at)::float8,
       (SELECT max(b.lease_until) FROM memshift.backfill_batches b
         WHERE b.run_id = r.run_id AND b.state = 'pending' AND b.lease_until > now())
  FROM memshift.backfill_runs r WHERE r.run_id = %(run_id)s

-- name: gate_quarantine
-- Open quarantine entries by source: each is a session missing from PostgreSQL.
SELECT source, count(*) FROM memshift.quarantine
 WHERE state = 'open'
 GROUP BY source ORDER BY source

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

-- name: parity_seen
-- Which of these ids have parity results already.
SELECT DISTINCT session_id FROM memshift.parity_results WHERE session_id = ANY(%(ids)s)

-- name: parity_unsettled
-- Sessions whose latest judged result did not pass and that PostgreSQL does not hold.
SELECT session_id
  FROM (SELECT DISTINCT ON (session_id) session_id, status
          FROM memshift.parity_results
         WHERE status <> 'pending'
         ORDER BY session_id, checked_at DESC, id DESC) AS latest
 WHERE status <> 'pass'
   AND NOT EXISTS (SELECT 1 FROM memshift.sessions s WHERE s.session_id = latest.session_id)

-- name: gate_parity
-- Each session's latest judged result (pending ones are not judged yet), among those
-- checked after the Plan last moved back to redis_only (writes made there reached
-- Redis alone, so an earlier result says nothing of PostgreSQL now; as gate_backfill):
-- how many sessions, how many pass, how many could not be read (error). A session's
-- older results never count: one failure stays until that session passes, however
-- many others pass meanwhile. A session whose loss an operator accepted (a dismissed
-- quarantine entry) is not counted: it is missing from PostgreSQL on purpose.
WITH since AS (
    SELECT coalesce(max(at), '-infinity') AS at FROM memshift.plan_audit
     WHERE after ->> 'stage' = 'redis_only' AND before ->> 'stage' <> 'redis_only'
)
SELECT count(*), count(*) FILTER (WHERE status = 'pass'),
       count(*) FILTER (WHERE status = 'error')
  FROM (SELECT DISTINCT ON (r.session_id) r.session_id, r.status
          FROM memshift.parity_results r, since
         WHERE r.status <> 'pending' AND r.checked_at > since.at
         ORDER BY r.session_id, r.checked_at DESC, r.id DESC) AS latest
 WHERE NOT EXISTS (SELECT 1 FROM memshift.quarantine q
                    WHERE q.session_id = latest.session_id AND q.state = 'dismissed')

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
-- every path) since its slice changed: how many, how many failed, how many
-- failures of each critical check, and how many are live compares of the path.
WITH latest AS (
    SELECT status, checks, read_path FROM memshift.parity_results
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
             GROUP BY c.name) AS failures),
       (SELECT count(*) FROM latest WHERE read_path IS NOT NULL)

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

-- ---------------------------------------------------------------------------------
-- Metrics (issue 7): the state collector of observe/metrics.py, read at each scrape.

-- name: metrics_parity_latest
-- Sessions by the status of their latest result (pending included), among the results
-- the parity gate reads (see gate_parity).
WITH since AS (
    SELECT coalesce(max(at), '-infinity') AS at FROM memshift.plan_audit
     WHERE after ->> 'stage' = 'redis_only' AND before ->> 'stage' <> 'redis_only'
)
SELECT status, count(*)
  FROM (SELECT DISTINCT ON (r.session_id) r.session_id, r.status
          FROM memshift.parity_results r, since
         WHERE r.checked_at > since.at
         ORDER BY r.session_id, r.checked_at DESC, r.id DESC) AS latest
 WHERE NOT EXISTS (SELECT 1 FROM memshift.quarantine q
                    WHERE q.session_id = latest.session_id AND q.state = 'dismissed')
 GROUP BY status

-- name: metrics_parity_recent
-- Results by status checked in the last few seconds (the trend).
SELECT status, count(*) FROM memshift.parity_results
 WHERE checked_at > now() - make_interval(secs => %(seconds)s)
 GROUP BY status

-- name: metrics_quarantine
-- Open quarantine entries by reason class (the reasons are prose: classify by wording).
SELECT CASE
         WHEN reason LIKE '%over the limit%' THEN 'oversize'
         WHEN reason LIKE '%UTF-8%' THEN 'invalid_utf8'
         WHEN reason LIKE '%NUL%' THEN 'nul'
         WHEN reason LIKE '%not valid JSON%' THEN 'invalid_json'
         WHEN reason ILIKE '%wrongtype%' OR reason LIKE '%wrong kind%'
           OR reason LIKE '%Redis type%' THEN 'wrong_redis_type'
         WHEN reason LIKE '%bytes long%' OR reason LIKE '%longer than%' THEN 'id_too_long'
         ELSE 'invalid_record'
       END AS reason_class,
       count(*)
  FROM memshift.quarantine WHERE state = 'open'
 GROUP BY 1

-- name: metrics_rollbacks
-- Rollbacks in the audit: by the rule (its "who") or by a person; how many, the last.
SELECT who = %(rule_who)s AS by_rule, count(*), max(at)
  FROM memshift.plan_audit WHERE action = 'rollback'
 GROUP BY 1

-- ---------------------------------------------------------------------------------
-- Inspect and dashboard (issue 7): the control plane as operators read it
-- (observe/control_plane.py; `memshift inspect` and `memshift dashboard` share these).

-- name: parity_results_of
-- One session's recorded parity results, newest first.
SELECT id, session_id, status, checks, diffs, checked_at, read_path
  FROM memshift.parity_results
 WHERE session_id = %(session_id)s
 ORDER BY checked_at DESC, id DESC
 LIMIT %(limit)s

-- name: parity_span
-- The first and last result within this many seconds before the newest one.
SELECT min(checked_at), max(checked_at)
  FROM memshift.parity_results
 WHERE checked_at >= (SELECT max(checked_at) FROM memshift.parity_results)
                     - make_interval(secs => %(seconds)s)

-- name: parity_trend
-- Results by status in buckets of this many seconds, from this time on.
SELECT to_timestamp(floor(extract(epoch FROM checked_at) / %(bucket)s) * %(bucket)s) AS at,
       count(*) FILTER (WHERE status = 'pass') AS pass,
       count(*) FILTER (WHERE status = 'fail') AS fail,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'error') AS error
  FROM memshift.parity_results
 WHERE checked_at >= %(since)s
 GROUP BY 1
 ORDER BY 1

-- name: parity_failing
-- Sessions that failed (or errored) since this time and whose latest result still
-- does: each with that latest result, newest first.
WITH recent AS (
    SELECT DISTINCT session_id FROM memshift.parity_results
     WHERE status IN ('fail', 'error') AND checked_at >= %(since)s
)
SELECT latest.*
  FROM recent CROSS JOIN LATERAL (
        SELECT id, session_id, status, checks, diffs, checked_at, read_path
          FROM memshift.parity_results r
         WHERE r.session_id = recent.session_id
         ORDER BY checked_at DESC, id DESC
         LIMIT 1) AS latest
 WHERE latest.status IN ('fail', 'error')
 ORDER BY latest.checked_at DESC, latest.id DESC
 LIMIT %(limit)s

-- name: repair_entries
-- The repair queue, oldest first; one session's rows when a session id is given.
SELECT id, session_id, target, operation, error, enqueued_at, attempts, last_error,
       last_attempt_at
  FROM memshift.repair_queue
 WHERE %(session_id)s::text IS NULL OR session_id = %(session_id)s
 ORDER BY id
 LIMIT %(limit)s

-- name: quarantine_of_session
-- One session's quarantine entries (by its printable id), from any source.
SELECT id, source, session_id, reason, state, seen, first_seen, last_seen, dismissed_at,
       dismissed_by, dismissed_reason
  FROM memshift.quarantine
 WHERE session_id = %(session_id)s
 ORDER BY last_seen DESC, id DESC

-- name: quarantine_open_count
SELECT count(*) FROM memshift.quarantine WHERE state = 'open'

-- ---------------------------------------------------------------------------------
-- Backfill fast path (issue 4): sessions PostgreSQL holds nothing of are COPYed
-- straight into the tables (bulk.py); a plain insert that succeeds is what the
-- guarded upserts do when they find no row, and a unique violation (a live write
-- landed since this check) sends the whole group through the staging merge instead.

-- name: bulk_fresh_sessions
-- The ids given of which no table holds any row.
SELECT ids.session_id
  FROM unnest(%(ids)s::text[]) AS ids(session_id)
 WHERE NOT EXISTS (SELECT 1 FROM memshift.sessions s WHERE s.session_id = ids.session_id)
   AND NOT EXISTS (SELECT 1 FROM memshift.messages m WHERE m.session_id = ids.session_id)
   AND NOT EXISTS (SELECT 1 FROM memshift.tool_runs t WHERE t.session_id = ids.session_id)
   AND NOT EXISTS (SELECT 1 FROM memshift.summaries u WHERE u.session_id = ids.session_id)
   AND NOT EXISTS (SELECT 1 FROM memshift.checkpoints c
                    WHERE c.session_id = ids.session_id)
   AND NOT EXISTS (SELECT 1 FROM memshift.events e WHERE e.session_id = ids.session_id)

-- ---------------------------------------------------------------------------------
-- Follow mode (memshift follow).

-- name: follow_register
-- The follower row of this source, made the first time; nothing else is touched
-- until the advisory lock says no other process follows it.
WITH made AS (
    INSERT INTO memshift.followers (source, layout, prefix)
    VALUES (%(source)s, %(layout)s, %(prefix)s)
    ON CONFLICT (source, layout, prefix) DO NOTHING
    RETURNING follower_id
)
SELECT follower_id FROM made
UNION ALL
SELECT follower_id FROM memshift.followers
 WHERE source = %(source)s AND layout = %(layout)s AND prefix = %(prefix)s

-- name: follow_lock
-- Held by the following process's connection: PostgreSQL drops it when the process dies.
SELECT pg_try_advisory_lock(%(space)s::int, %(follower_id)s::int)

-- name: follow_start
-- This process follows now. The position stays where the last follower left it (a
-- restart catches up before moving it): how far behind it is, in seconds.
UPDATE memshift.followers
   SET state = 'running', worker = %(worker)s, started_at = now(), heartbeat_at = now()
 WHERE follower_id = %(follower_id)s
RETURNING extract(epoch FROM now() - applied_through)::float8

-- name: follow_heartbeat
-- The position (now minus the lag; it never moves back) and the counts since the last beat.
UPDATE memshift.followers
   SET heartbeat_at = now(),
       applied_through = greatest(applied_through,
                                  now() - make_interval(secs => %(lag)s::float8)),
       events = events + %(events)s,
       sessions_applied = sessions_applied + %(applied)s,
       sessions_expired = sessions_expired + %(expired)s,
       quarantined = quarantined + %(quarantined)s,
       events_per_second = %(eps)s,
       sessions_per_second = %(sps)s
 WHERE follower_id = %(follower_id)s

-- name: follow_stop
UPDATE memshift.followers
   SET state = 'stopped', heartbeat_at = now(), events_per_second = 0, sessions_per_second = 0
 WHERE follower_id = %(follower_id)s

-- name: follow_known
-- For each session: the digest of what the follower last applied, and the next seq
-- PostgreSQL would take (every seq below it is held there, or was trimmed in Redis).
SELECT k.session_key, f.digest, s.next_seq
  FROM unnest(%(keys)s::bytea[], %(ids)s::text[]) AS k(session_key, session_id)
  LEFT JOIN memshift.follow_sessions f
         ON f.follower_id = %(follower_id)s AND f.session_key = k.session_key
  LEFT JOIN memshift.sessions s ON s.session_id = k.session_id

-- name: follow_record
-- What the follower applied; the sessions it merged whole are no longer quarantined.
WITH applied AS (
    INSERT INTO memshift.follow_sessions (follower_id, session_key, digest)
    SELECT %(follower_id)s, k, d FROM unnest(%(keys)s::bytea[], %(digests)s::bytea[]) AS t(k, d)
    ON CONFLICT (follower_id, session_key) DO UPDATE
       SET digest = excluded.digest, applied_at = now(), gone_at = NULL
)
UPDATE memshift.quarantine SET state = 'resolved', resolved_at = now()
 WHERE source = %(source)s AND session_key = ANY(%(resolved)s::bytea[])
   AND state IN ('open', 'dismissed')

-- name: follow_record_gone
INSERT INTO memshift.follow_sessions (follower_id, session_key, digest, gone_at)
SELECT %(follower_id)s, k, NULL, now() FROM unnest(%(keys)s::bytea[]) AS t(k)
ON CONFLICT (follower_id, session_key) DO UPDATE
   SET digest = NULL, applied_at = now(), gone_at = now()

-- name: follow_mark_gone
-- Sessions gone from Redis are kept, recorded as expired: the expiry is now (or the
-- one recorded, if that has passed); a status that may move to expired does, with a
-- version bump and its event, as a status change of the primary would. Returns the
-- sessions changed (a session already recorded so is left as it is).
WITH cur AS (
    SELECT session_id, status FROM memshift.sessions
     WHERE session_id = ANY(%(ids)s::text[])
     ORDER BY session_id FOR UPDATE
), upd AS (
    UPDATE memshift.sessions s
       SET expires_at = CASE WHEN s.expires_at <= now() THEN s.expires_at ELSE now() END,
           status = CASE WHEN cur.status = ANY(%(legal_from)s) THEN 'expired' ELSE s.status END,
           version = s.version + (cur.status = ANY(%(legal_from)s))::int,
           updated_at = CASE WHEN cur.status = ANY(%(legal_from)s)
                             THEN greatest(s.updated_at, now()) ELSE s.updated_at END,
           next_event_seq = s.next_event_seq + (cur.status = ANY(%(legal_from)s))::int
      FROM cur
     WHERE s.session_id = cur.session_id
       AND (cur.status = ANY(%(legal_from)s) OR s.expires_at IS NULL OR s.expires_at > now())
    RETURNING s.session_id, cur.status AS from_status, s.next_event_seq - 1 AS event_seq
), ev AS (
    INSERT INTO memshift.events (session_id, event_seq, type, from_status, to_status, at, data)
    SELECT session_id, event_seq, 'status', from_status, 'expired', now(), %(data)s
      FROM upd WHERE from_status = ANY(%(legal_from)s)
    ON CONFLICT DO NOTHING
)
SELECT session_id FROM upd

-- name: follow_sweep_started
UPDATE memshift.followers SET last_sweep_started_at = now()
 WHERE follower_id = %(follower_id)s
RETURNING now()

-- name: follow_sweep_finished
UPDATE memshift.followers
   SET last_sweep_finished_at = now(), sweeps = sweeps + 1,
       last_sweep_scanned = %(scanned)s, last_sweep_applied = %(applied)s
 WHERE follower_id = %(follower_id)s

-- name: follow_seen_reset
-- The sessions a sweep finds, kept in PostgreSQL so the sweeper's memory stays flat.
CREATE TEMP TABLE IF NOT EXISTS follow_seen (session_key bytea PRIMARY KEY);
TRUNCATE follow_seen

-- name: follow_seen_add
INSERT INTO follow_seen SELECT unnest(%(keys)s::bytea[]) ON CONFLICT DO NOTHING

-- name: follow_unseen
-- Sessions applied before the sweep began that it did not find: gone from Redis,
-- unless a second read finds them. A page at a time, in key order.
SELECT f.session_key FROM memshift.follow_sessions f
 WHERE f.follower_id = %(follower_id)s AND f.gone_at IS NULL AND f.applied_at < %(since)s
   AND f.session_key > %(after)s
   AND NOT EXISTS (SELECT 1 FROM follow_seen s WHERE s.session_key = f.session_key)
 ORDER BY f.session_key
 LIMIT %(limit)s

-- name: follow_status
SELECT follower_id, source, layout, prefix, state, worker, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_seconds,
       applied_through,
       -- A stopped follower applies nothing: its lag is not a lag of the migration.
       CASE WHEN state = 'running' THEN extract(epoch FROM now() - applied_through)::float8
            ELSE 0 END AS lag_seconds,
       events, sessions_applied, sessions_expired, quarantined, events_per_second,
       sessions_per_second, sweeps, last_sweep_started_at, last_sweep_finished_at,
       last_sweep_scanned, last_sweep_applied
  FROM memshift.followers ORDER BY follower_id

-- name: gate_follow
-- Followers that run (or died running): how many, and the lag of the furthest behind.
SELECT count(*), coalesce(max(extract(epoch FROM now() - applied_through)), 0)::float8,
       (array_agg(prefix ORDER BY applied_through))[1]
  FROM memshift.followers WHERE state = 'running'

-- ---------------------------------------------------------------------------------
-- The demo (issue 7).

-- name: demo_totals
-- What PostgreSQL holds, for the demo's table.
SELECT (SELECT count(*) FROM memshift.sessions), (SELECT count(*) FROM memshift.messages)

-- name: demo_drop_latest_checkpoint
-- The drift the demo injects: a session's latest checkpoint lost in PostgreSQL.
DELETE FROM memshift.checkpoints
 WHERE (session_id, checkpoint_id) = (
        SELECT session_id, checkpoint_id FROM memshift.checkpoints
         WHERE session_id = %(session_id)s
         ORDER BY step DESC LIMIT 1)
RETURNING checkpoint_id

-- ---------------------------------------------------------------------------------
-- Per-slice drift (issue 6): the read paths live compares recorded results for.

-- name: rule_read_paths
-- Each distinct read path once, by skipping through the (read_path, checked_at)
-- index rather than reading every result.
WITH RECURSIVE paths(read_path) AS (
    (SELECT read_path FROM memshift.parity_results
      WHERE read_path IS NOT NULL ORDER BY read_path LIMIT 1)
    UNION ALL
    SELECT (SELECT p.read_path FROM memshift.parity_results p
             WHERE p.read_path > paths.read_path ORDER BY p.read_path LIMIT 1)
      FROM paths WHERE paths.read_path IS NOT NULL
)
SELECT read_path FROM paths WHERE read_path IS NOT NULL ORDER BY read_path

-- ---------------------------------------------------------------------------------
-- Continuity (issue 11).

-- name: plan_retired_since_redis_led
-- Whether the Plan was retired after it last sent writes to Redis first (a stage
-- before pg_primary): then Redis lacks the writes made while retired, which nothing
-- copies back, and reads must not go back to it.
SELECT coalesce(max(id) FILTER (WHERE after ->> 'stage' = 'retired'), 0)
     > coalesce(max(id) FILTER (WHERE after ->> 'stage' IN
                                ('redis_only', 'dual_write', 'shadow', 'cutover')), 0)
  FROM memshift.plan_audit

-- ---------------------------------------------------------------------------------
-- The retired stage's cache epoch (drill finding: stale reads after a Redis restart).

-- name: cache_epoch_get
SELECT epoch FROM memshift.cache_epoch

-- name: cache_epoch_bump
-- An invalidation could not reach Redis: entries filled under earlier epochs must not
-- be served by any process. The row's trigger announces the new epoch.
UPDATE memshift.cache_epoch
   SET epoch = epoch + 1, bumped_at = now(), bumped_by = %(by)s
RETURNING epoch

-- ---------------------------------------------------------------------------------
-- Repair from parity (`memshift repair --from-parity`).

-- name: repair_enqueue_parity_failures
-- Every session whose latest parity result is a failure, queued for a whole-session
-- repair into the target store, unless one is queued for it there already: how many
-- sessions fail, and how many were queued now.
WITH latest AS (
    SELECT DISTINCT ON (session_id) session_id, status, checked_at
      FROM memshift.parity_results
     ORDER BY session_id, checked_at DESC, id DESC
), failing AS (
    SELECT session_id, checked_at FROM latest WHERE status = 'fail'
), queued AS (
    INSERT INTO memshift.repair_queue (session_id, target, operation, error, enqueued_at)
    SELECT f.session_id, %(target)s::text, 'parity',
           'the latest parity result (checked at ' || f.checked_at::text
           || ') is a failure: copy the whole session from ' || %(source)s::text,
           now()
      FROM failing f
     WHERE NOT EXISTS (SELECT 1 FROM memshift.repair_queue q
                        WHERE q.session_id = f.session_id AND q.target = %(target)s::text)
    RETURNING session_id
)
SELECT (SELECT count(*) FROM failing), (SELECT count(*) FROM queued)
