-- Replicate a status change made by the primary: record its event at the event_seq
-- the primary assigned (once, whatever the order of arrival), then apply the session
-- snapshot as save_session does (so a late change never undoes a newer write).
-- The stream cannot hold gaps: an event_seq beyond the next one is refused whole.
-- ARGV: ttl_ms, event_seq, type, from ('' for none), to ('' for none), at, data,
--       then the save_session arguments (version, updated_at, created_at, ...).
local event_seq = tonumber(ARGV[2])
local length = redis.call('XLEN', KEYS[6])
if event_seq > length then
  return {'gap', length}
end
local recorded = false
if event_seq == length then
  local fields = {'type', ARGV[3]}
  if ARGV[4] ~= '' then
    fields[#fields + 1] = 'from'
    fields[#fields + 1] = ARGV[4]
  end
  if ARGV[5] ~= '' then
    fields[#fields + 1] = 'to'
    fields[#fields + 1] = ARGV[5]
  end
  for _, item in ipairs({'at', ARGV[6], 'data', ARGV[7]}) do
    fields[#fields + 1] = item
  end
  redis.call('XADD', KEYS[6], '*', unpack(fields))
  recorded = true
end
local outcome = save_session_fields(8)
if type(outcome) == 'table' then
  return outcome
end
if recorded then
  outcome = 'applied'
end
refresh_ttl(ARGV[1])
return {outcome}
