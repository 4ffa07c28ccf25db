-- The retired stage's cache epoch: one number, part of every cache entry's tag. A
-- router whose invalidation of a cache entry could not reach Redis bumps it (after its
-- write to PostgreSQL committed), so that no process serves an entry filled under an
-- earlier epoch: a durable Redis that comes back brings such entries back with it.
-- Every bump is announced on the Plan's channel in the same transaction, with the
-- payload 'cache_epoch <n>', so every watcher learns it without a query.

CREATE TABLE memshift.cache_epoch (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),   -- there is one epoch
    epoch     bigint NOT NULL DEFAULT 1 CHECK (epoch > 0),
    bumped_at timestamptz,
    bumped_by text                                           -- host:pid of the router
);
INSERT INTO memshift.cache_epoch (epoch) VALUES (1);

CREATE FUNCTION memshift.announce_cache_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('memshift_plan', 'cache_epoch ' || NEW.epoch::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER cache_epoch_announce AFTER UPDATE ON memshift.cache_epoch
    FOR EACH ROW EXECUTE FUNCTION memshift.announce_cache_epoch();
