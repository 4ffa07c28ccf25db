-- Write a tool run when its field is empty, or still holds what Python merged from
-- (`expected`); otherwise hand the stored record back for Python to merge (the
-- model's merge_tool_runs decides: attempts never decrease, terminal stays).
-- ARGV from 4: tool_call_id (the field), record JSON, expected ('': none), merged
-- ('': none).
local h = KEYS[tonumber(ARGV[3])]
local field, raw, expected, merged = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local stored = redis.call('HGET', h, field)
local reply
if not stored or (expected ~= '' and stored == expected) then
  local value = merged ~= '' and merged or raw
  redis.call('HSET', h, field, value)
  reply = {'applied', value}
elseif stored == raw then
  reply = {'unchanged', stored}
else
  reply = {'compare', stored}
end
refresh_ttl(ARGV[1], ARGV[2])
return reply
