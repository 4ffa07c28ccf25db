-- Read one LangGraph thread (one checkpoint namespace of it) as RedisSaver keeps it:
-- the latest checkpoint from the pointer, then each parent in turn, and each
-- checkpoint's pending writes from its write registry. One script, so that a session
-- is one round trip and one consistent read, however long its chain.
--
-- The keys are computed from the documents, as RedisSaver names them (they cannot be
-- declared up front), so this read works on one Redis server, not across a cluster.
--
-- ARGV: the pointer key of a root namespace ({p}_latest:{sid}:__empty__), the pointer
-- key of a subgraph namespace ({p}_latest:{sid}), the checkpoint prefix {p}, the write
-- registry prefix.
-- Reply: {'ok', pointer, pttl, key, document, {write key, write document, ...}, ...}
-- latest first; or {'missing'}, {'ambiguous', key, key}, {'wrongtype', key, type},
-- {'dangling', pointer, key}, {'notjson', key}, {'cycle', key} or {'unindexed', key}.

-- A document's JSON text: a string here, a RedisJSON document where the module runs.
local function read_doc(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then
    return nil, nil
  elseif kind == 'string' then
    return redis.call('GET', key), nil
  elseif kind == 'ReJSON-RL' then
    return redis.call('JSON.GET', key), nil
  end
  return nil, kind
end

local pointer = nil
for i = 1, 2 do
  local kind = redis.call('TYPE', ARGV[i])['ok']
  if kind ~= 'none' then
    if kind ~= 'string' then
      return {'wrongtype', ARGV[i], kind}
    end
    if pointer ~= nil then
      return {'ambiguous', pointer, ARGV[i]}
    end
    pointer = ARGV[i]
  end
end
if pointer == nil then
  return {'missing'}
end

local out = {'ok', pointer, redis.call('PTTL', pointer)}
local key = redis.call('GET', pointer)
local seen = {}
while key do
  if seen[key] then
    return {'cycle', key}
  end
  seen[key] = true
  local text, bad = read_doc(key)
  if bad then
    return {'wrongtype', key, bad}
  end
  if text == nil then
    if #out == 3 then
      return {'dangling', pointer, key}
    end
    break -- an older checkpoint was pruned: the chain ends here
  end
  local ok, doc = pcall(cjson.decode, text)
  if not ok or type(doc) ~= 'table' or type(doc.thread_id) ~= 'string'
      or type(doc.checkpoint_ns) ~= 'string' or type(doc.checkpoint_id) ~= 'string' then
    return {'notjson', key}
  end
  local registry = ARGV[4] .. ':' .. doc.thread_id .. ':' .. doc.checkpoint_ns .. ':'
    .. doc.checkpoint_id
  local kind = redis.call('TYPE', registry)['ok']
  if kind ~= 'none' and kind ~= 'zset' then
    return {'wrongtype', registry, kind}
  end
  local writes = {}
  for _, write_key in ipairs(redis.call('ZRANGE', registry, 0, -1)) do
    local write, wrong = read_doc(write_key)
    if wrong then
      return {'wrongtype', write_key, wrong}
    end
    if write then
      table.insert(writes, write_key)
      table.insert(writes, write)
    end
  end
  if doc.has_writes == true and #writes == 0 then
    return {'unindexed', key}
  end
  table.insert(out, key)
  table.insert(out, text)
  table.insert(out, writes)
  local parent = doc.parent_checkpoint_id
  if type(parent) == 'string' and parent ~= '' then
    key = ARGV[3] .. ':' .. doc.thread_id .. ':' .. doc.checkpoint_ns .. ':' .. parent
  else
    key = nil
  end
end
return out
