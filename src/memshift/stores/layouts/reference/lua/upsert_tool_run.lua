-- Merge one tool run into the stored one as memshift.model.merge_tool_runs does:
-- the fields of the write with the greater merge key (terminal status, then
-- updated_at, then status rank, then content hash), attempts the greater of both.
-- The script orders the two records on the first three; when they tie and the
-- contents differ, or the stored record is in a form it does not read, it replies
-- 'compare' and Python merges, then calls again with `expected` (the stored record
-- it merged with) and `merged`, written only if the record is still `expected`.
-- ARGV: ttl_ms, tool_call_id, JSON before attempts, JSON after attempts, attempts,
--       terminal (0/1), updated_at (fixed-width ISO), rank, expected, merged.
local field, head, tail, attempts = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local terminal, updated_at, rank = ARGV[6] == '1', ARGV[7], tonumber(ARGV[8])
local expected, merged = ARGV[9], ARGV[10]
local stored = redis.call('HGET', KEYS[3], field)

local function write(value)
  redis.call('HSET', KEYS[3], field, value)
  return {'applied', value}
end

local function merge()
  if not stored then
    return write(head .. attempts .. tail)
  end
  if expected ~= '' and stored == expected then
    return write(merged)
  end
  local old = decode_json(stored)
  if not old then
    return {'compare', stored}
  end
  local status = plain(old.status)
  local old_rank = TOOL_STATUS_RANK[status]
  local old_attempts = uint_text(plain(old.attempts))
  local old_ts = norm_ts(plain(old.updated_at))
  if not (old_rank and old_attempts and old_ts) then
    return {'compare', stored}
  end
  local most = cmp_uint(attempts, old_attempts) >= 0 and attempts or old_attempts
  local old_terminal = TERMINAL[status] == true
  local order = 0
  if terminal ~= old_terminal then
    order = terminal and 1 or -1
  elseif updated_at ~= old_ts then
    order = updated_at > old_ts and 1 or -1
  elseif rank ~= old_rank then
    order = rank > old_rank and 1 or -1
  elseif stored ~= head .. old_attempts .. tail then
    -- Same key, different bytes: only the content hash can decide.
    return {'compare', stored}
  end
  if order < 0 then
    if most == old_attempts then
      return {'unchanged', stored}
    end
    return {'compare', stored}
  end
  local value = head .. most .. tail
  if value == stored then
    return {'unchanged', stored}
  end
  return write(value)
end

local reply = merge()
refresh_ttl(ARGV[1])
return reply
