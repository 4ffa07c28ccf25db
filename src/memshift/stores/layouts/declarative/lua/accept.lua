-- The description has no session hash: there is no session record to write. It is
-- accepted, so that a router passes it on to PostgreSQL, whose guarded save keeps it
-- or finds it stale; the TTL is refreshed as on every write.
refresh_ttl(ARGV[1], ARGV[2])
return {'applied'}
