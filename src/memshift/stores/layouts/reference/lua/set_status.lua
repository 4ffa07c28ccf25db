-- Change the session status and record the event.
-- ARGV: ttl_ms, to, at (fixed-width ISO), data JSON, version (-1: assign),
--       event_seq (-1: assign), legal source statuses (comma separated).
-- Assign form (the primary): the move must be legal from the stored status; the
-- version grows by one and the event is appended. Replicated form (version and
-- event_seq given by the primary): the status is applied if the version is newer,
-- the event appended if it is the next one; the primary checked legality.
local to, at, data = ARGV[2], ARGV[3], ARGV[4]
local version, event_seq, legal = ARGV[5], tonumber(ARGV[6]), ARGV[7]

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
-- updated_at only grows, even when clocks disagree.
local updated = (stored_ts and stored_ts > at) and stored_updated or at

local function add_event(from)
  redis.call('XADD', KEYS[6], '*', 'type', 'status', 'from', from, 'to', to, 'at', at,
    'data', data)
end

local reply
if version == '-1' then
  local allowed = false
  for source in string.gmatch(legal, '[^,]+') do
    if source == current then
      allowed = true
    end
  end
  if not allowed then
    return {'illegal', current}
  end
  redis.call('HSET', KEYS[1], 'status', to, 'updated_at', updated)
  local new_version = redis.call('HINCRBY', KEYS[1], 'version', 1)
  add_event(current)
  reply = {'applied', new_version, redis.call('XLEN', KEYS[6]) - 1, current}
else
  local length = redis.call('XLEN', KEYS[6])
  if event_seq > length then
    return {'gap', length}
  end
  local from = current
  if event_seq < length then
    local entries = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', event_seq + 1)
    local fields = entries[event_seq + 1][2]
    from = ''
    for i = 1, #fields, 2 do
      if fields[i] == 'from' then
        from = fields[i + 1]
      end
    end
  else
    add_event(current)
  end
  local outcome = 'stale'
  if cmp_uint(version, stored_version) > 0 then
    redis.call('HSET', KEYS[1], 'status', to, 'version', version, 'updated_at', updated)
    outcome = 'applied'
  end
  reply = {outcome, version, event_seq, from}
end
refresh_ttl(ARGV[1])
return reply
