-- Append one message (LPUSH, as LangChain does), or recognise it as already there.
-- KEYS[1] is the session's LIST, newest message first (LangChain LPUSHes), so
-- seq = LLEN - 1 - index: the oldest message is seq 0. ARGV and replies: see
-- append_to_chat_list in the shared library (lua/common.lua).

-- Same type (role) and content; the entry keeps both, and the tool call, in `data`.
local function same_content(old, new)
  local data = plain(old.data)
  return type(data) == 'table' and plain(old.type) == new.type
    and deep_equal(plain(data.content), new.data.content)
end

-- Legacy ids as memshift.stores.layouts.langchain.messages.legacy_id derives them.
return append_to_chat_list({newest_first = true, legacy = 'lc-', calls_in = 'data',
  same_content = same_content})
