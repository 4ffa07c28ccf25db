-- LangChain keeps no session record, only the messages: there is nothing to write
-- here. The session is accepted, so that a router passes it on to PostgreSQL, whose
-- guarded save keeps it or finds it stale; the TTL is refreshed as on every write.
-- ARGV: ttl_ms.
refresh_ttl(ARGV[1])
return {'applied'}
