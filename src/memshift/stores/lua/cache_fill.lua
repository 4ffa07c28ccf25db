-- Fill the retired stage's cache with a session state read from PostgreSQL, but only
-- if no write touched the session since the reader looked (see stores/_async/cache.py).
--
-- KEYS: 1 the cached value, 2 the session's generation, 3 its writes-in-flight count.
-- ARGV: 1 the generation the reader saw before it read PostgreSQL ('' when absent),
--       2 the value, 3 its TTL in milliseconds, 4 the generation key's TTL in ms.
-- Reply: 1 when stored, 0 when refused (a write began or ended since the reader looked).

local gen = redis.call('GET', KEYS[2]) or ''
if gen ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if gen ~= '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
