-- The Lua library of every Redis layout: each layout's lua/common.lua is a link to
-- this file, and the store prepends it to each of the layout's scripts before loading
-- it (once; then called by SHA). Only helpers that read no layout's key scheme live
-- here; what a layout's scripts alone use stays in those scripts.
--
-- ARGV[1] is always the TTL in milliseconds (0: keep). What KEYS hold is each
-- layout's own and is said at the top of its scripts (the reference layout: 1 session
-- hash, 2 messages, 3 tools, 4 summary, 5 checkpoint, 6 events). Replies are lists
-- whose first element says what happened (see memshift/stores/layouts/__init__.py).

-- Must equal memshift.model.TOOL_STATUS_RANK and TERMINAL_TOOL_STATUSES (a unit test
-- checks it).
local TOOL_STATUS_RANK = {pending = 0, running = 1, retrying = 2, succeeded = 3, failed = 3}
local TERMINAL = {succeeded = true, failed = true}

local function invalid(key, field, what)
  return {'invalid', key, field, what}
end

-- Lua numbers are doubles; versions and steps may exceed 2^53, so they are compared
-- as decimal text.
local function is_uint(s)
  return type(s) == 'string' and string.match(s, '^%d+$') ~= nil
end

local function cmp_uint(a, b)
  a = (string.gsub(a, '^0+', ''))
  b = (string.gsub(b, '^0+', ''))
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

-- A JSON number decoded by cjson, as decimal text when it is a whole number >= 0.
local function uint_text(v)
  if type(v) ~= 'number' or v ~= v or v < 0 or v ~= math.floor(v) or v >= 2 ^ 53 then
    return nil
  end
  return string.format('%.0f', v)
end

-- Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d
end

local DAYS_IN_MONTH = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

local function leap(y)
  return (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0
end

-- Seconds since the epoch plus microseconds, as memshift writes timestamps.
local function format_ts(secs, micros)
  local days = math.floor(secs / 86400)
  local sod = secs - days * 86400
  local y, m, d = civil_from_days(days)
  if y < 1 or y > 9999 then
    return nil
  end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', y, m, d,
    math.floor(sod / 3600), math.floor(sod % 3600 / 60), sod % 60, micros)
end

local function frac_micros(frac)
  return tonumber(string.sub(frac .. '000000', 1, 6))
end

-- A stored timestamp as fixed-width ISO 8601 UTC text, or nil when it is in a form
-- this helper does not read (Python then decides). Reads epoch milliseconds (number
-- or digits with an optional fraction) and ISO 8601 'YYYY-MM-DD[T ]HH:MM[:SS[.f]]'
-- with 'Z', '+HH:MM', '+HHMM' or no offset (UTC), exactly as
-- memshift.stores.layouts.timestamps.parse_timestamp reads them.
local function norm_ts(v)
  if type(v) == 'number' then
    v = uint_text(v)
  end
  if type(v) ~= 'string' then
    return nil
  end
  local ms, frac = string.match(v, '^(%d+)%.?(%d*)$')
  if ms then
    if #ms > 15 then
      return nil
    end
    local n = tonumber(ms)
    local secs = math.floor(n / 1000)
    return format_ts(secs, (n - secs * 1000) * 1000 + math.floor(frac_micros(frac) / 1000))
  end
  local y, mo, d, h, mi, rest = string.match(v,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d)(.*)$')
  if not y then
    return nil
  end
  y, mo, d, h, mi = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi)
  local s, micros = 0, 0
  local sec = string.match(rest, '^:(%d%d)')
  if sec then
    s = tonumber(sec)
    rest = string.sub(rest, 4)
    local f = string.match(rest, '^%.(%d+)')
    if f then
      micros = frac_micros(f)
      rest = string.sub(rest, #f + 2)
    end
  end
  local offset = 0
  if rest ~= '' and rest ~= 'Z' then
    local sign, oh, om = string.match(rest, '^([+-])(%d%d):?(%d%d)$')
    if not sign then
      return nil
    end
    oh, om = tonumber(oh), tonumber(om)
    if oh > 23 or om > 59 then
      return nil
    end
    offset = (oh * 3600 + om * 60) * (sign == '-' and -1 or 1)
  end
  if y < 1 or mo < 1 or mo > 12 or d < 1 or h > 23 or mi > 59 or s > 59 then
    return nil
  end
  if d > DAYS_IN_MONTH[mo] or (mo == 2 and d == 29 and not leap(y)) then
    return nil
  end
  local secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset
  return format_ts(secs, micros)
end

-- Give every key of the session the TTL: the one asked for, or, when none is asked
-- for (0), the TTL of the key the session's life is read from (KEYS[from], the first
-- unless said) to keys that have none, so that a key this script created does not
-- outlive the rest of the session. PEXPIRE leaves a key that does not exist alone.
local function refresh_ttl(ttl_ms, from)
  ttl_ms = tonumber(ttl_ms)
  from = tonumber(from) or 1
  if ttl_ms > 0 then
    for i = 1, #KEYS do
      redis.call('PEXPIRE', KEYS[i], ttl_ms)
    end
    return
  end
  local session_ttl = redis.call('PTTL', KEYS[from])
  if session_ttl > 0 then
    for i = 1, #KEYS do
      if i ~= from and redis.call('PTTL', KEYS[i]) == -1 then
        redis.call('PEXPIRE', KEYS[i], session_ttl)
      end
    end
  end
end

local function decode_json(raw)
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then
    return value
  end
  return nil
end

-- cjson reads JSON null as a sentinel; nil and null mean the same here.
local function plain(v)
  if v == cjson.null then
    return nil
  end
  return v
end

-- An id member as a layout's records read it: text, or a whole number as its digits.
local function id_text(v)
  v = plain(v)
  if type(v) == 'number' then
    return uint_text(v)
  end
  return v
end

-- JSON values decoded by cjson, compared member by member; null is not missing unless
-- `null_is_missing` (then a member null in `a` matches one `b` lacks).
local function deep_equal(a, b, null_is_missing)
  if null_is_missing then
    a, b = plain(a), plain(b)
  end
  if type(a) ~= type(b) then
    return false
  end
  if type(a) ~= 'table' then
    return a == b
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k], null_is_missing) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end

-- Write the session hash if the write is newer: a greater version, or the same
-- version with a later updated_at (as PostgreSQL's save_session does). Whoever wins,
-- messages_trimmed and updated_at only grow and created_at only shrinks.
-- ARGV from `first` on: version, updated_at, created_at (fixed-width ISO),
-- messages_trimmed, n, then n field/value pairs to set, then fields to delete.
-- Returns the outcome, or an 'invalid' reply.
local function save_session_fields(first)
  local version, updated_at, created_at = ARGV[first], ARGV[first + 1], ARGV[first + 2]
  local trimmed, n = ARGV[first + 3], tonumber(ARGV[first + 4])
  local stored = redis.call('HMGET', KEYS[1], 'version', 'updated_at', 'created_at',
    'messages_trimmed')
  local stored_version, stored_updated, stored_created, stored_trimmed =
    stored[1], stored[2], stored[3], stored[4]
  local updated_ts = norm_ts(stored_updated)
  local created_ts = norm_ts(stored_created)
  if stored_version and not is_uint(stored_version) then
    return invalid(KEYS[1], 'version', 'is not a non-negative integer')
  end
  if stored_trimmed and not is_uint(stored_trimmed) then
    return invalid(KEYS[1], 'messages_trimmed', 'is not a non-negative integer')
  end
  if stored_updated and not updated_ts then
    return invalid(KEYS[1], 'updated_at', 'is not a timestamp that can be compared')
  end
  if stored_created and not created_ts then
    return invalid(KEYS[1], 'created_at', 'is not a timestamp that can be compared')
  end

  -- A hash without a version reads as version 0, without updated_at as older than any.
  if not stored_version and redis.call('EXISTS', KEYS[1]) == 1 then
    stored_version = '0'
  end
  local order = 1
  if stored_version then
    order = cmp_uint(version, stored_version)
    if order == 0 then
      if not updated_ts or updated_at > updated_ts then
        order = 1
      elseif updated_at < updated_ts then
        order = -1
      end
    end
  end
  local outcome = order == 0 and 'unchanged' or 'stale'
  if order > 0 then
    local fields = {}
    for i = first + 5, first + 4 + 2 * n do
      fields[#fields + 1] = ARGV[i]
    end
    redis.call('HSET', KEYS[1], unpack(fields))
    for i = first + 5 + 2 * n, #ARGV do
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
    if updated_ts and updated_ts > updated_at then
      redis.call('HSET', KEYS[1], 'updated_at', stored_updated)
    end
    if created_ts and created_ts < created_at then
      redis.call('HSET', KEYS[1], 'created_at', stored_created)
    end
    outcome = 'applied'
  end

  local grows
  if stored_trimmed then
    grows = cmp_uint(trimmed, stored_trimmed) > 0
  else
    grows = order > 0 or cmp_uint(trimmed, '0') > 0
  end
  if grows then
    redis.call('HSET', KEYS[1], 'messages_trimmed', trimmed)
    outcome = 'applied'
  end
  return outcome
end

-- What an append_message script replies for a message at `seq` (-1: the next) in a
-- transcript that holds seqs 0 to `length` - 1 (nothing trimmed): 'duplicate' or
-- 'conflict' against the entry already at that seq (`stored_at(seq)`) or already
-- holding the message's id (`find_id()`: its seq and entry, or nil), as
-- `same(stored, at_seq)` judges; 'gap' beyond the next seq; else `push()` it and
-- reply 'appended'.
local function append_reply(seq, length, stored_at, same, find_id, push)
  if seq >= 0 and seq < length then
    local stored = stored_at(seq)
    if same(stored, seq) then
      return {'duplicate', seq, stored}
    end
    return {'conflict', seq, stored, 'content'}
  end
  if seq > length then
    return {'gap', length}
  end
  local at_seq, stored = find_id()
  if at_seq == nil then
    push()
    return {'appended', length}
  end
  if seq < 0 and same(stored, at_seq) then
    return {'duplicate', at_seq, stored}
  end
  return {'conflict', at_seq, stored, 'id'}
end

-- append_message of a chat list: a framework's transcript in one LIST (KEYS[1]) from
-- seq 0, each entry the framework's JSON of a message (langchain, llamaindex).
-- ARGV: ttl_ms, entry JSON, seq (-1: assign the next), message id, id window.
-- `list` says what differs between frameworks:
--   newest_first  the framework LPUSHes (seq = LLEN - 1 - index), else it RPUSHes;
--   legacy        the prefix of the id derived from the seq of an entry memshift did
--                 not write ('lc-': lc-0, lc-1, ... as the layout's legacy_id does);
--   calls_in      the member of an entry whose tool_call_id member is the message's
--                 tool call;
--   same_content  whether decoded entry `old` holds the same message as the new one
--                 `new`, role and content (as Message.same_content sees them).
local function append_to_chat_list(list)
  local raw, seq, id, window = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local length = redis.call('LLEN', KEYS[1])
  local new = cjson.decode(raw)

  local function index_of(at_seq)
    return list.newest_first and length - 1 - at_seq or at_seq
  end

  -- The memshift id of an entry at a seq: its own when memshift wrote it, else the
  -- legacy one derived from its place.
  local function id_of(entry, at_seq)
    local own = plain(entry.memshift)
    if type(own) == 'table' and type(own.id) == 'string' then
      return own.id
    end
    return string.format('%s%d', list.legacy, at_seq)
  end

  local function tool_call_id(entry)
    local member = plain(entry[list.calls_in])
    local call = type(member) == 'table' and plain(member.tool_call_id) or nil
    if type(call) == 'string' and call ~= '' then
      return call
    end
    return nil
  end

  -- Same message as Message.same_content sees it: id, role, content, tool call.
  local function same(stored, at_seq)
    local old = decode_json(stored)
    return old ~= nil and id_of(old, at_seq) == id and list.same_content(old, new)
      and tool_call_id(old) == tool_call_id(new)
  end

  -- The seq of the message with this id among the latest `window` messages, if any.
  -- An id of printable ASCII without quotes, backslashes or slashes appears verbatim
  -- in the JSON of an entry that carries it, so the raw text is searched before
  -- decoding; a legacy id is derived, never written, so it is not.
  local verbatim = not string.find(id, '[^\32-\126]') and not string.find(id, '["\\/]')
    and string.sub(id, 1, #list.legacy) ~= list.legacy
  local function find_id()
    local oldest = math.max(length - window, 0)
    local items
    if list.newest_first then
      items = redis.call('LRANGE', KEYS[1], 0, length - 1 - oldest)
    else
      items = redis.call('LRANGE', KEYS[1], oldest, -1)
    end
    for at_seq = length - 1, oldest, -1 do
      local stored = items[list.newest_first and length - at_seq or at_seq - oldest + 1]
      if not verbatim or string.find(stored, id, 1, true) then
        local old = decode_json(stored)
        if old and id_of(old, at_seq) == id then
          return at_seq, stored
        end
      end
    end
    return nil
  end

  local function push()
    redis.call(list.newest_first and 'LPUSH' or 'RPUSH', KEYS[1], raw)
  end

  local reply = append_reply(seq, length, function(at_seq)
    return redis.call('LINDEX', KEYS[1], index_of(at_seq))
  end, same, find_id, push)
  refresh_ttl(ARGV[1])
  return reply
end
