-- Keep the checkpoint with the highest step (the layout holds the latest only).
-- ARGV: ttl_ms, checkpoint JSON, step, checkpoint_id.
local raw, step, checkpoint_id = ARGV[2], ARGV[3], ARGV[4]
local stored = redis.call('GET', KEYS[5])
local outcome = 'applied'
if stored then
  local old = decode_json(stored)
  local old_step = old and uint_text(plain(old.step))
  if not old_step then
    return invalid(KEYS[5], 'step', 'is not a JSON object with a whole-number step')
  end
  if plain(old.checkpoint_id) == checkpoint_id then
    outcome = 'unchanged'
  elseif cmp_uint(step, old_step) <= 0 then
    outcome = 'stale'
  end
end
if outcome == 'applied' then
  redis.call('SET', KEYS[5], raw, 'KEEPTTL')
end
refresh_ttl(ARGV[1])
return {outcome}
