-- Keep the summary with the highest version (the key holds the latest only).
-- ARGV from 4: summary JSON, version, version member.
local key = KEYS[tonumber(ARGV[3])]
local raw, version, vm = ARGV[4], ARGV[5], ARGV[6]
local stored = redis.call('GET', key)
local outcome = 'applied'
if stored then
  local old = decode_json(stored)
  local old_version = old and (uint_text(plain(old[vm])) or plain(old[vm]))
  if not is_uint(old_version) then
    return invalid(key, vm, 'is not a JSON object with a whole-number version')
  end
  local c = cmp_uint(version, old_version)
  if c == 0 then
    outcome = 'unchanged'
  elseif c < 0 then
    outcome = 'stale'
  end
end
if outcome == 'applied' then
  redis.call('SET', key, raw, 'KEEPTTL')
end
refresh_ttl(ARGV[1], ARGV[2])
return {outcome}
