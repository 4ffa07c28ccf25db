-- Append one message, or recognise it as already there.
-- ARGV: ttl_ms, message JSON, seq (-1: assign the next), message id, id window.
-- seq = messages_trimmed + index in the list.
local raw, seq, id, window = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

local trimmed = redis.call('HGET', KEYS[1], 'messages_trimmed')
if trimmed and not is_uint(trimmed) then
  return invalid(KEYS[1], 'messages_trimmed', 'is not a non-negative integer')
end
trimmed = tonumber(trimmed or '0')
local length = redis.call('LLEN', KEYS[2])
local next_seq = trimmed + length
local new = cjson.decode(raw)

local function same(stored)
  local old = decode_json(stored)
  return old ~= nil and plain(old.id) == new.id and plain(old.role) == new.role
    and plain(old.content) == new.content and plain(old.tool_call_id) == plain(new.tool_call_id)
end

-- The index of the message with this id among the latest `window` messages, if any.
-- An id of printable ASCII without quotes, backslashes or slashes appears verbatim
-- in any JSON encoding of it, so the raw text is searched before decoding.
local verbatim = not string.find(id, '[^\32-\126]') and not string.find(id, '["\\/]')
local function find_id()
  local first = math.max(0, length - window)
  local items = redis.call('LRANGE', KEYS[2], first, -1)
  for i = #items, 1, -1 do
    if not verbatim or string.find(items[i], id, 1, true) then
      local old = decode_json(items[i])
      if old and plain(old.id) == id then
        return first + i - 1, items[i]
      end
    end
  end
  return nil
end

local reply
if seq >= 0 and seq < trimmed then
  reply = {'trimmed', seq}
elseif seq >= 0 and seq < next_seq then
  local stored = redis.call('LINDEX', KEYS[2], seq - trimmed)
  if same(stored) then
    reply = {'duplicate', seq, stored}
  else
    reply = {'conflict', seq, stored, 'content'}
  end
elseif seq > next_seq then
  reply = {'gap', next_seq}
else
  local index, stored = find_id()
  if index == nil then
    redis.call('RPUSH', KEYS[2], raw)
    reply = {'appended', next_seq}
  elseif seq < 0 and same(stored) then
    reply = {'duplicate', trimmed + index, stored}
  else
    reply = {'conflict', trimmed + index, stored, 'id'}
  end
end
refresh_ttl(ARGV[1])
return reply
