-- release.lua: give a concurrency lease back.
-- KEYS[1] the IP's leases ZSET (member -> expiry us); ARGV[1] the lease member.
-- Returns {1|0, now_us}: 0 when the lease was already released or had expired
-- (an expired lease is removed too, so a late release is still harmless).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not exp then return {0, now} end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(exp) <= now then return {0, now} end
return {1, now}
