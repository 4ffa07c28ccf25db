-- The primary's status change: the move must be legal from the stored status; the
-- version grows by one, updated_at never goes back, and the event is appended with
-- the next event_seq. Replies with the session hash as it is afterwards.
-- ARGV: ttl_ms, to, at (fixed-width ISO), data JSON, legal source statuses (comma
--       separated).
local to, at, data, legal = ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
local stored = redis.call('HMGET', KEYS[1], 'status', 'version', 'updated_at')
local current, stored_version, stored_updated = stored[1] or 'active', stored[2] or '0', stored[3]
if not is_uint(stored_version) then
  return invalid(KEYS[1], 'version', 'is not a non-negative integer')
end
local stored_ts = stored_updated and norm_ts(stored_updated)
if stored_updated and not stored_ts then
  return invalid(KEYS[1], 'updated_at', 'is not a timestamp that can be compared')
end
local allowed = false
for source in string.gmatch(legal, '[^,]+') do
  if source == current then
    allowed = true
  end
end
if not allowed then
  return {'illegal', current}
end

local updated = (stored_ts and stored_ts > at) and stored_updated or at
redis.call('HSET', KEYS[1], 'status', to, 'updated_at', updated)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('XADD', KEYS[6], '*', 'type', 'status', 'from', current, 'to', to, 'at', at,
  'data', data)
local event_seq = redis.call('XLEN', KEYS[6]) - 1
refresh_ttl(ARGV[1])
return {'applied', version, event_seq, current, redis.call('HGETALL', KEYS[1]),
  redis.call('PTTL', KEYS[1])}
