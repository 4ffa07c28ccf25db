-- Append one message (RPUSH or LPUSH, as the description orders the list), or
-- recognise it as already there. seq = messages_trimmed + place from the oldest.
-- ARGV from 4: message JSON, seq (-1: assign the next), message id, id window,
-- order (oldest_first | newest_first), index of the session hash (0: none),
-- messages_trimmed field (''), then the members of id, role, content, tool call ('').
local raw, seq, id, window = ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local newest_first, hash_index, tf = ARGV[8] == 'newest_first', tonumber(ARGV[9]), ARGV[10]
local id_m, role_m, content_m, call_m = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local list = KEYS[tonumber(ARGV[3])]

local trimmed = '0'
if hash_index > 0 and tf ~= '' then
  trimmed = redis.call('HGET', KEYS[hash_index], tf) or '0'
  if not is_uint(trimmed) then
    return invalid(KEYS[hash_index], tf, 'is not a non-negative integer')
  end
end
trimmed = tonumber(trimmed)
local length = redis.call('LLEN', list)
local next_seq = trimmed + length
local new = cjson.decode(raw)

local function index_of(at_seq)
  local place = at_seq - trimmed
  return newest_first and length - 1 - place or place
end

local function call_of(entry)
  return call_m ~= '' and id_text(entry[call_m]) or nil
end

local function same(stored, at_seq)
  local old = decode_json(stored)
  return old ~= nil and (id_text(old[id_m]) or string.format('seq-%d', at_seq)) == id
    and plain(old[role_m]) == new[role_m] and deep_equal(plain(old[content_m]), new[content_m])
    and call_of(old) == call_of(new)
end

-- The seq of the message with this id among the latest `window` messages, if any.
-- An id without quotes, backslashes or control characters appears verbatim in the
-- JSON of an entry that holds it, so the raw text is searched before decoding.
local verbatim = not string.find(id, '[%c"\\/]')
local function find_id()
  local first, last = -window, -1
  if newest_first then
    first, last = 0, window - 1
  end
  local items = redis.call('LRANGE', list, first, last)
  for i = 1, #items do
    if not verbatim or string.find(items[i], id, 1, true) then
      local old = decode_json(items[i])
      local at_seq = newest_first and next_seq - i or next_seq - #items + i - 1
      if old and id_text(old[id_m]) == id then
        return at_seq, items[i]
      end
    end
  end
  return nil
end

local reply
if seq >= 0 and seq < trimmed then
  reply = {'trimmed', seq}
elseif seq >= 0 and seq < next_seq then
  local stored = redis.call('LINDEX', list, index_of(seq))
  if same(stored, seq) then
    reply = {'duplicate', seq, stored}
  else
    reply = {'conflict', seq, stored, 'content'}
  end
elseif seq > next_seq then
  reply = {'gap', next_seq}
else
  local at_seq, stored = find_id()
  if at_seq == nil then
    redis.call(newest_first and 'LPUSH' or 'RPUSH', list, raw)
    reply = {'appended', next_seq}
  elseif seq < 0 and same(stored, at_seq) then
    reply = {'duplicate', at_seq, stored}
  else
    reply = {'conflict', at_seq, stored, 'id'}
  end
end
refresh_ttl(ARGV[1], ARGV[2])
return reply
