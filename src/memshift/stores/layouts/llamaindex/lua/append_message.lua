-- Append one message (RPUSH, as RedisChatStore does), or recognise it as already there.
-- KEYS[1] is the session's LIST, oldest message first (RedisChatStore RPUSHes), so
-- seq = index. ARGV and replies: see append_to_chat_list in the shared library
-- (lua/common.lua).

-- Same role and content (text blocks, or the older content member); the entry keeps
-- its tool call in `additional_kwargs`.
local function same_content(old, new)
  return plain(old.role) == new.role
    and deep_equal(old.blocks, new.blocks, true)
    and deep_equal(old.content, new.content, true)
end

-- Legacy ids as memshift.stores.layouts.llamaindex.messages.legacy_id derives them.
return append_to_chat_list({newest_first = false, legacy = 'li-',
  calls_in = 'additional_kwargs', same_content = same_content})
