-- Write the session hash if the write is newer: a greater version, or the same
-- version with a later updated_at. messages_trimmed only grows, whoever wins.
-- ARGV: ttl_ms, version, updated_at (fixed-width ISO), messages_trimmed,
--       n, then n field/value pairs to set, then the fields to delete.
local version, updated_at, trimmed = ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local stored = redis.call('HMGET', KEYS[1], 'version', 'updated_at', 'messages_trimmed')
local stored_version, stored_updated, stored_trimmed = stored[1], stored[2], stored[3]

local newer
if not stored_version then
  newer = true
elseif not is_uint(stored_version) then
  return invalid(KEYS[1], 'version', 'is not a non-negative integer')
else
  local c = cmp_uint(version, stored_version)
  if c == 0 then
    local stored_ts = norm_ts(stored_updated)
    if not stored_updated then
      newer = true
    elseif not stored_ts then
      return invalid(KEYS[1], 'updated_at', 'is not a timestamp that can be compared')
    end
    newer = newer or updated_at > stored_ts
  else
    newer = c > 0
  end
end
if stored_trimmed and not is_uint(stored_trimmed) then
  return invalid(KEYS[1], 'messages_trimmed', 'is not a non-negative integer')
end

local outcome = 'stale'
if newer then
  local pairs_ = {}
  for i = 6, 5 + 2 * n do
    pairs_[#pairs_ + 1] = ARGV[i]
  end
  redis.call('HSET', KEYS[1], unpack(pairs_))
  for i = 6 + 2 * n, #ARGV do
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
  outcome = 'applied'
else
  -- Same version and time: unchanged when every field already holds the value.
  local same = cmp_uint(version, stored_version) == 0 and updated_at == norm_ts(stored_updated)
  for i = 6, 5 + 2 * n, 2 do
    if same and redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
      same = false
    end
  end
  for i = 6 + 2 * n, #ARGV do
    if same and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      same = false
    end
  end
  if same then
    outcome = 'unchanged'
  end
end

local grows
if stored_trimmed then
  grows = cmp_uint(trimmed, stored_trimmed) > 0
else
  grows = newer or cmp_uint(trimmed, '0') > 0
end
if grows then
  redis.call('HSET', KEYS[1], 'messages_trimmed', trimmed)
  outcome = 'applied'
end
refresh_ttl(ARGV[1])
return {outcome}
