-- Keep the checkpoint with the highest step (the key holds the latest only).
-- ARGV from 4: checkpoint JSON, step, checkpoint id, step member, id member.
local key = KEYS[tonumber(ARGV[3])]
local raw, step, checkpoint_id = ARGV[4], ARGV[5], ARGV[6]
local step_m, id_m = ARGV[7], ARGV[8]
local stored = redis.call('GET', key)
local outcome = 'applied'
if stored then
  local old = decode_json(stored)
  local old_step = old and (uint_text(plain(old[step_m])) or plain(old[step_m]))
  if not is_uint(old_step) then
    return invalid(key, step_m, 'is not a JSON object with a whole-number step')
  end
  if id_text(old[id_m]) == checkpoint_id then
    outcome = 'unchanged'
  elseif cmp_uint(step, old_step) <= 0 then
    outcome = 'stale'
  end
end
if outcome == 'applied' then
  redis.call('SET', key, raw, 'KEEPTTL')
end
refresh_ttl(ARGV[1], ARGV[2])
return {outcome}
