-- Append one message (RPUSH, as RedisChatStore does), or recognise it as already there.
-- ARGV: ttl_ms, entry JSON, seq (-1: assign the next), message id, id window.
-- KEYS[1] is the session's LIST, oldest message first (RedisChatStore RPUSHes), so
-- seq = index.

local raw, seq, id, window = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local length = redis.call('LLEN', KEYS[1])
local new = cjson.decode(raw)

-- The memshift id of a stored entry at seq: its own when memshift wrote it, else the
-- one memshift.stores.layouts.llamaindex.messages.legacy_id derives from its place.
local function id_of(entry, seq)
  local own = plain(entry.memshift)
  if type(own) == 'table' and type(own.id) == 'string' then
    return own.id
  end
  return string.format('li-%d', seq)
end

local function tool_call_id(entry)
  local extra = plain(entry.additional_kwargs)
  local call = type(extra) == 'table' and plain(extra.tool_call_id) or nil
  if type(call) == 'string' and call ~= '' then
    return call
  end
  return nil
end

-- Same message as Message.same_content sees it: id, role, content, tool call.
local function same(stored, at_seq)
  local old = decode_json(stored)
  return old ~= nil and id_of(old, at_seq) == id and plain(old.role) == new.role
    and deep_equal(old.blocks, new.blocks, true)
    and deep_equal(old.content, new.content, true)
    and tool_call_id(old) == tool_call_id(new)
end

-- The seq of the message with this id among the latest `window` messages, if any.
-- An id of printable ASCII without quotes, backslashes or slashes appears verbatim
-- in the JSON of an entry that carries it, so the raw text is searched before
-- decoding; a legacy id (li-N) is derived, never written, so it is not.
local verbatim = not string.find(id, '[^\32-\126]') and not string.find(id, '["\\/]')
  and string.sub(id, 1, 3) ~= 'li-'
local function find_id()
  local first = math.max(length - window, 0)
  local items = redis.call('LRANGE', KEYS[1], first, -1)
  for i = #items, 1, -1 do
    if not verbatim or string.find(items[i], id, 1, true) then
      local at_seq = first + i - 1
      local old = decode_json(items[i])
      if old and id_of(old, at_seq) == id then
        return at_seq, items[i]
      end
    end
  end
  return nil
end

local reply
if seq >= 0 and seq < length then
  local stored = redis.call('LINDEX', KEYS[1], seq)
  if same(stored, seq) then
    reply = {'duplicate', seq, stored}
  else
    reply = {'conflict', seq, stored, 'content'}
  end
elseif seq > length then
  reply = {'gap', length}
else
  local at_seq, stored = find_id()
  if at_seq == nil then
    redis.call('RPUSH', KEYS[1], raw)
    reply = {'appended', length}
  elseif seq < 0 and same(stored, at_seq) then
    reply = {'duplicate', at_seq, stored}
  else
    reply = {'conflict', at_seq, stored, 'id'}
  end
end
refresh_ttl(ARGV[1])
return reply
