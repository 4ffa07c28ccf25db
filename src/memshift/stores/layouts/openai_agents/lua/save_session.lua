-- The SDK keeps no session record memshift could write (its hash holds only the id
-- and two times, which the SDK sets as messages arrive). The session is accepted, so
-- that a router passes it on to PostgreSQL, whose guarded save keeps it or finds it
-- stale; the TTL is refreshed as on every write. ARGV: ttl_ms.
refresh_ttl(ARGV[1])
return {'applied'}
