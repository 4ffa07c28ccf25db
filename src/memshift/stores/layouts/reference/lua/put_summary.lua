-- Keep the summary with the highest version (the layout holds the latest only).
-- ARGV: ttl_ms, summary JSON, version.
local raw, version = ARGV[2], ARGV[3]
local stored = redis.call('GET', KEYS[4])
local outcome = 'applied'
if stored then
  local old = decode_json(stored)
  local old_version = old and uint_text(plain(old.version))
  if not old_version then
    return invalid(KEYS[4], 'version', 'is not a JSON object with a whole-number version')
  end
  local c = cmp_uint(version, old_version)
  if c == 0 then
    outcome = 'unchanged'
  elseif c < 0 then
    outcome = 'stale'
  end
end
if outcome == 'applied' then
  redis.call('SET', KEYS[4], raw, 'KEEPTTL')
end
refresh_ttl(ARGV[1])
return {outcome}
