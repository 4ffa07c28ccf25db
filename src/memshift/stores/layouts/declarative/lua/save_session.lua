-- Write the session hash if the write is newer: a greater version, or the same
-- version with a later updated_at (as PostgreSQL's save_session does); without a
-- mapped version, every write is newer. A mapped messages_trimmed only grows.
-- ARGV from 4: version field, updated_at field, messages_trimmed field ('' when not
-- mapped), version, updated_at (memshift's fixed-width ISO), messages_trimmed, n,
-- n field/value pairs to set, then fields to delete.
local h = KEYS[tonumber(ARGV[3])]
local vf, uf, tf = ARGV[4], ARGV[5], ARGV[6]
local version, updated, trimmed, n = ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])

local order = 1
if vf ~= '' and redis.call('EXISTS', h) == 1 then
  local stored = redis.call('HGET', h, vf)
  if stored and not is_uint(stored) then
    return invalid(h, vf, 'is not a non-negative integer')
  end
  order = cmp_uint(version, stored or '0')
  if order == 0 and uf ~= '' then
    local raw = redis.call('HGET', h, uf)
    local stored_ts = raw and norm_ts(raw)
    if raw and not stored_ts then
      return invalid(h, uf, 'is not a timestamp that can be compared')
    end
    if not stored_ts or updated > stored_ts then
      order = 1
    elseif updated < stored_ts then
      order = -1
    end
  end
end
if order <= 0 then
  refresh_ttl(ARGV[1], ARGV[2])
  return {order == 0 and 'unchanged' or 'stale'}
end

local stored_trimmed = tf ~= '' and redis.call('HGET', h, tf)
local fields = {}
for i = 11, 10 + 2 * n do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', h, unpack(fields))
for i = 11 + 2 * n, #ARGV do
  redis.call('HDEL', h, ARGV[i])
end
if stored_trimmed and is_uint(stored_trimmed) and cmp_uint(stored_trimmed, trimmed) > 0 then
  redis.call('HSET', h, tf, stored_trimmed)
end
refresh_ttl(ARGV[1], ARGV[2])
return {'applied'}
