-- state.lua: the per-IP facts the policy needs (governor.policy.IpState), read-only.
-- KEYS: state, pauses (ZSET of pause starts), defer, compl (ZSETs of timestamps)
-- ARGV: 1 escalation repeat window us, 2 complaints/deferrals window us
-- Returns {now, level, cooldown_until, held 0|1, recent_pauses, complaints, deferrals, rate_factor (string)}
local now = now_us()
local s = redis.call('HMGET', KEYS[1], 'lv', 'cu', 'hd', 'f0', 'fs', 'fr')
local since_p = '(' .. int(now - tonumber(ARGV[1]))
local since_w = '(' .. int(now - tonumber(ARGV[2]))
return {
  now,
  tonumber(s[1]) or 0,
  tonumber(s[2]) or 0,
  s[3] and 1 or 0,
  redis.call('ZCOUNT', KEYS[2], since_p, '+inf'),
  redis.call('ZCOUNT', KEYS[4], since_w, '+inf'),
  redis.call('ZCOUNT', KEYS[3], since_w, '+inf'),
  string.format('%.17g', factor_at(s[4], s[5], s[6], now)),
}
