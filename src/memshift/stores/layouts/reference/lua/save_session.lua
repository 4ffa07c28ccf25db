-- Write the session hash if the write is newer (see save_session_fields).
-- ARGV: ttl_ms, version, updated_at, created_at, messages_trimmed, n,
--       n field/value pairs, fields to delete.
local outcome = save_session_fields(2)
if type(outcome) == 'table' then
  return outcome
end
refresh_ttl(ARGV[1])
return {outcome}
