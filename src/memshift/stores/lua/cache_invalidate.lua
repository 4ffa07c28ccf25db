-- Invalidate the retired stage's cache entry of one session around a PostgreSQL write
-- (see stores/_async/cache.py): called with 'begin' before the write, 'end' after it,
-- and 'drop' to retry an invalidation that did not reach Redis.
--
-- KEYS: 1 the cached value, 2 the session's generation, 3 its writes-in-flight count.
-- ARGV: 1 'begin', 'end' or 'drop', 2 the write lease in milliseconds (how long fills stay
--       refused after a begin whose end never arrives), 3 the generation key's TTL.
-- All three bump the generation (so every fill prepared earlier is refused) and delete the
-- value. 'begin' counts the write in flight (fills are refused while any is), 'end'
-- counts it out ('drop' leaves the count alone: it belongs to the writes in flight).
-- Reply: the new generation.

local gen = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[1])
if ARGV[1] == 'begin' then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
elseif ARGV[1] == 'end' and redis.call('EXISTS', KEYS[3]) == 1
    and redis.call('DECR', KEYS[3]) <= 0 then
  redis.call('DEL', KEYS[3])
end
return gen
