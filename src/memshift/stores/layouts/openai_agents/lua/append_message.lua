-- Append one item (RPUSH, as the SDK does, touching the session hash as it does), or
-- recognise it as already there. Items carry no id: a message's id is its seq.
-- KEYS: 1 the session hash, 2 the messages LIST (RPUSH, oldest first: seq = index),
-- 3 the counter, as the SDK's RedisSession names them.
-- ARGV: ttl_ms, item JSON, seq (-1: assign the next), session id.
local raw, seq, session_id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local length = redis.call('LLEN', KEYS[2])
local new = cjson.decode(raw)

-- An item's role, text and tool call as items.py reads them (Message.same_content).
local TEXT_MEMBERS = {'content', 'output', 'arguments'}

local function role_of(item)
  if type(item.role) == 'string' then
    return item.role
  end
  return item.type
end

local function text_of(item)
  for _, name in ipairs(TEXT_MEMBERS) do
    if item[name] ~= nil then
      return item[name]
    end
  end
  return ''
end

local function call_of(item)
  if type(item.call_id) == 'string' and item.call_id ~= '' then
    return item.call_id
  end
  return nil
end

local function same(stored)
  local old = decode_json(stored)
  return old ~= nil and role_of(old) == role_of(new)
    and deep_equal(text_of(old), text_of(new)) and call_of(old) == call_of(new)
end

local function stored_at(at_seq)
  return redis.call('LINDEX', KEYS[2], at_seq)
end

-- Items carry no id, so none is looked for: the seq alone places an item.
local function find_id()
  return nil
end

local function push()
  redis.call('RPUSH', KEYS[2], raw)
  local now = redis.call('TIME')[1]
  redis.call('HSET', KEYS[1], 'session_id', session_id)
  redis.call('HSETNX', KEYS[1], 'created_at', now)
  redis.call('HSET', KEYS[1], 'updated_at', now)
end

local reply = append_reply(seq, length, stored_at, same, find_id, push)
refresh_ttl(ARGV[1])
return reply
