-- The Plan: which stage the migration is in, which read paths are cut over for which
-- cohorts, and the rules; one versioned row, every change audited and announced.

CREATE TABLE memshift.plan (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),   -- there is one Plan
    version    bigint NOT NULL,
    stage      text NOT NULL CHECK (stage IN ('redis_only', 'dual_write', 'shadow', 'cutover',
                                              'pg_primary', 'retired')),
    slices     jsonb NOT NULL DEFAULT '{}',
    rules      jsonb NOT NULL DEFAULT '{}',
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL
);
INSERT INTO memshift.plan (version, stage, changed_by) VALUES (1, 'redis_only', 'memshift db upgrade');

CREATE TABLE memshift.plan_audit (
    id      bigserial PRIMARY KEY,
    version bigint NOT NULL,         -- the Plan version this change made
    at      timestamptz NOT NULL DEFAULT now(),
    who     text NOT NULL,
    why     text NOT NULL,
    action  text NOT NULL,           -- stage, slice, rollback, rules
    forced  boolean NOT NULL DEFAULT false,
    before  jsonb NOT NULL,
    after   jsonb NOT NULL
);

-- Every change to the Plan is announced to the processes that LISTEN, in the same
-- transaction: they reload it (a periodic poll backs this up).
CREATE FUNCTION memshift.announce_plan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('memshift_plan', NEW.version::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER plan_announce AFTER INSERT OR UPDATE ON memshift.plan
    FOR EACH ROW EXECUTE FUNCTION memshift.announce_plan();
