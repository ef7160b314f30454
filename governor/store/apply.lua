-- apply.lua: apply the policy's actions for one IP atomically, with "max" semantics
-- (a cooldown only gets longer, a level only higher, a rate factor only lower, a
-- per-connection limit only smaller), so a decision made on a stale read can never
-- undo a stricter one. Every action is audited.
--
-- KEYS: 1 state, 2 pauses, 3 defer, 4 compl (same hash tag), 5 audit stream
-- ARGV: 1 monitor (0|1), 2 ip, 3 reply, 4 who, 5 queue id, 6 mta, 7 domain, 8 audit maxlen,
--   9 repeat window us, 10 counter window us, 11 default per-connection, 12 nonce,
--   then 6 per action: kind, seconds us, factor, level, value, reason
-- Monitor mode: only count_deferral/count_complaint change state; every other
-- action is audited as "would:<kind>".
-- Returns {now, actions applied}
local now = now_us()
local ks, kp, kd, kc, ka = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local monitor = ARGV[1] == '1'
local ip, reply, who, qid, mta, domain = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local maxlen, rw, cw, dmpc, nonce = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]

local function hnum(field)
  return tonumber(redis.call('HGET', ks, field)) or 0
end

-- A rolling counter: one ZSET member per event, trimmed to the window.
local function count(key, window, member)
  redis.call('ZADD', key, int(now), member)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - window))
  redis.call('PEXPIRE', key, int(math.ceil(window / 1000)))
end

local handlers = {}

function handlers.pause(sec, _, _, _, reason, member)
  local cu = hnum('cu')
  local untl = now + sec
  if cu <= now then count(kp, rw, member) end   -- a new pause starts (not an extension)
  if untl > cu then
    local cs = (cu > now) and redis.call('HGET', ks, 'cs') or int(now)
    redis.call('HSET', ks, 'cu', int(untl), 'cr', reason, 'cy', reply, 'cs', cs)
    delay_ramp(ks, untl, now)
  end
  return {'until', secs(math.max(cu, untl))}
end

function handlers.hold_ip(_, _, _, _, reason)
  if redis.call('HEXISTS', ks, 'hd') == 0 then
    redis.call('HSET', ks, 'hd', '1', 'hr', reason, 'hy', reply, 'hs', int(now))
  end
  return {}
end

function handlers.slow(sec, factor)
  local start = math.max(hnum('cu'), now)
  local r = redis.call('HMGET', ks, 'f0', 'fs', 'fr')
  local cur = factor_at(r[1], r[2], r[3], start)
  if factor < 1 and factor <= cur then
    redis.call('HSET', ks, 'f0', string.format('%.17g', factor), 'fs', int(start), 'fr', int(sec))
    return {'factor', string.format('%.17g', factor), 'from', secs(start)}
  end
  return {'kept', string.format('%.17g', cur)}
end

function handlers.escalate(_, _, level)
  local lv = math.max(hnum('lv'), level)
  redis.call('HSET', ks, 'lv', int(lv))
  return {'level', int(lv)}
end

function handlers.per_connection(_, _, _, value)
  local cur = tonumber(redis.call('HGET', ks, 'mpc')) or dmpc
  local v = math.min(cur, value)
  redis.call('HSET', ks, 'mpc', int(v))
  return {'value', int(v)}
end

function handlers.count_deferral(_, _, _, _, _, member)
  count(kd, cw, member)
  return {}
end

function handlers.count_complaint(_, _, _, _, _, member)
  count(kc, cw, member)
  return {}
end

-- hq = until when the queue agent should keep this IP's deferred mail on hold;
-- -1 = until an admin releases the held IP.
function handlers.hold_queue(sec)
  if redis.call('HEXISTS', ks, 'hd') == 1 then
    redis.call('HSET', ks, 'hq', '-1')
    return {'until', 'release'}
  end
  local hq = hnum('hq')
  if hq < 0 then return {'until', 'release'} end
  local untl = math.max(hnum('cu'), hq, now + sec)
  redis.call('HSET', ks, 'hq', int(untl))
  return {'until', secs(untl)}
end

function handlers.failover() return {} end
function handlers.alert() return {} end

local applied = 0
for a = 13, #ARGV, 6 do
  local kind, sec, factor = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local level, value, reason = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5]
  local member = int(now) .. ':' .. nonce .. ':' .. int(a)
  local action, extra = kind, {}
  if monitor and kind ~= 'count_deferral' and kind ~= 'count_complaint' then
    action = 'would:' .. kind
  else
    extra = handlers[kind](sec, factor, level, value, reason, member)
    applied = applied + 1
  end
  local fields = {'ip', ip, 'action', action, 'reason', reason, 'reply', reply, 'who', who, 'queue_id', qid,
                  'mta', mta, 'domain', domain}
  if sec > 0 then fields[#fields + 1] = 'seconds'; fields[#fields + 1] = secs(sec) end
  for j = 1, #extra do fields[#fields + 1] = extra[j] end
  audit(ka, maxlen, now, fields)
end
return {now, applied}
