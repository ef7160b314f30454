-- admin.lua: operator actions on one IP (or on the provider record), audited.
-- KEYS: 1 state hash (an IP's, or the provider hash), 2 that IP's pauses ZSET, 3 audit stream
-- ARGV: 1 op, 2 ip (or "provider") for the audit, 3 seconds us, 4 reason, 5 who, 6 audit maxlen, 7 audit 0|1
-- ops: pause | resume | provider-pause | provider-resume | release-ip | reset-level
-- Pauses keep "max" semantics (an admin pause never shortens a running cooldown;
-- resume is the way to end one). Returns {now, changed 0|1}.
local now = now_us()
local ks, kp = KEYS[1], KEYS[2]
local op, ip, sec, reason, who = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local changed = 0
local extra = {}

if op == 'pause' then
  local cu = tonumber(redis.call('HGET', ks, 'cu')) or 0
  local untl = now + sec
  if untl > cu then
    local cs = (cu > now) and redis.call('HGET', ks, 'cs') or int(now)
    redis.call('HSET', ks, 'cu', int(untl), 'cr', 'admin', 'cy', reason, 'cs', cs)
    delay_ramp(ks, untl, now)
    changed = 1
  end
  extra = {'until', secs(math.max(cu, untl)), 'seconds', secs(sec)}
elseif op == 'resume' then
  changed = redis.call('HDEL', ks, 'cu', 'cr', 'cy', 'cs', 'hq')
  local fs = tonumber(redis.call('HGET', ks, 'fs'))
  if fs and fs > now then redis.call('HSET', ks, 'fs', int(now)) end
elseif op == 'provider-pause' then
  local pu = tonumber(redis.call('HGET', ks, 'pu')) or 0
  local untl = now + sec
  if untl > pu then
    redis.call('HSET', ks, 'pu', int(untl), 'pr', reason, 'ps', int(now))
    changed = 1
  end
  extra = {'until', secs(math.max(pu, untl)), 'seconds', secs(sec)}
elseif op == 'provider-resume' then
  changed = redis.call('HDEL', ks, 'pu', 'pr', 'ps')
elseif op == 'release-ip' then
  changed = redis.call('HDEL', ks, 'hd', 'hr', 'hy', 'hs')
  if tonumber(redis.call('HGET', ks, 'hq')) == -1 then redis.call('HDEL', ks, 'hq') end
elseif op == 'reset-level' then
  changed = redis.call('HDEL', ks, 'lv') + redis.call('DEL', kp)
else
  return redis.error_reply('unknown admin op ' .. op)
end
if changed > 0 then changed = 1 end

if ARGV[7] == '1' then
  local fields = {'ip', ip, 'action', 'admin:' .. op, 'reason', reason, 'reply', '', 'who', who, 'queue_id', ''}
  for j = 1, #extra do fields[#fields + 1] = extra[j] end
  audit(KEYS[3], ARGV[6], now, fields)
end
return {now, changed}
