-- acquire.lua: admit one delivery on one egress IP, or pick the best IP of a pool.
-- One atomic round trip; a denial never consumes budget (no lease, no TAT move).
-- Lean on purpose (5 redis.call on a grant): this runs for every delivery attempt.
--
-- KEYS: 2 per candidate IP, both under that IP's hash tag:
--   leases (ZSET member -> expiry us), state (HASH; see governor/store/__init__.py)
-- ARGV: 1 monitor (0|1), 2 lease member, 3 retry-after for held IPs (us), 4 day length (us),
--   then 7 per candidate IP: concurrency, interval us (0 = no rate limit), burst,
--   lease ttl us, warm-up initial/day (0 = not cold), doubling days, warm-up start day (-1 = first use)
-- Returns {granted 0|1, reason, retry_after us, now us, monitor 0|1, chosen index (1-based), per-connection (-1 = default)}
local now = now_us()
local monitor = ARGV[1] == '1'
local token = ARGV[2]
local hold_retry = tonumber(ARGV[3])
local day = tonumber(ARGV[4])
local HUGE = math.huge
local WINDOW = 60000000   -- grants counter: two 60 s windows (sliding-window estimate)

-- Check every limit of candidate i without committing anything; remember what a
-- commit needs. e.free = when every blocking limit lifts; e.reason = the first that blocks
-- (held, cooldown/provider pause, concurrency, warm-up, rate).
local function evaluate(i)
  local kl, ks, a = KEYS[2 * i - 1], KEYS[2 * i], 4 + (i - 1) * 7
  local s = redis.call('HMGET', ks, 'hd', 'hr', 'cu', 'cr', 'pu', 'pr', 'f0', 'fs', 'fr',
                       'wd', 'wn', 'w0', 'mpc', 't', 'gw', 'gc', 'gp')
  local e = {reason = false, free = now, mpc = tonumber(s[13]) or -1, T = 0, tat0 = tonumber(s[14]) or 0, s = s}
  if s[1] then e.reason = 'held:' .. (s[2] or ''); e.free = HUGE end
  local cu, pu = tonumber(s[3]) or 0, tonumber(s[5]) or 0
  if cu > now or pu > now then
    local r, t = 'cooldown:' .. (s[4] or ''), cu
    if pu > cu then r, t = 'provider-paused', pu end
    e.reason = e.reason or r
    if t > e.free then e.free = t end
  end
  -- leases: expired members (crashed holders) are purged only when they could matter
  local cap = tonumber(ARGV[a + 1])
  e.leases = redis.call('ZCARD', kl)
  if e.leases >= cap then
    redis.call('ZREMRANGEBYSCORE', kl, '-inf', now)
    e.leases = redis.call('ZCARD', kl)
    if e.leases >= cap then
      local t = tonumber(redis.call('ZRANGE', kl, 0, 0, 'WITHSCORES')[2])
      e.reason = e.reason or 'concurrency'
      if t > e.free then e.free = t end
    end
  end
  local winit = tonumber(ARGV[a + 5])
  if winit > 0 then
    local today = math.floor(now / day)
    local w0 = tonumber(ARGV[a + 7])
    if w0 < 0 then
      w0 = tonumber(s[12])
      if not w0 then w0 = today; e.w0new = true end
    end
    e.today = today
    e.wused = (tonumber(s[10]) == today) and (tonumber(s[11]) or 0) or 0
    if e.wused >= warm_cap(winit, tonumber(ARGV[a + 6]), w0, today) then
      e.reason = e.reason or 'warmup'
      if (today + 1) * day > e.free then e.free = (today + 1) * day end
    end
  end
  local interval = tonumber(ARGV[a + 2])
  if interval > 0 then
    e.T = math.floor(interval / factor_at(s[7], s[8], s[9], now) + 0.5)
    e.tat = math.max(e.tat0, now)
    local allow = e.tat - tonumber(ARGV[a + 3]) * e.T
    if allow > now then
      e.reason = e.reason or 'rate'
      if allow > e.free then e.free = allow end
    end
  end
  return e
end

-- Take a lease, count the grant; advance the TAT only for a real grant (a monitor-mode
-- override doesn't, so "would deny" stays meaningful).
local function commit(i, e, advance)
  local kl, ks, a = KEYS[2 * i - 1], KEYS[2 * i], 4 + (i - 1) * 7
  redis.call('ZADD', kl, int(now + tonumber(ARGV[a + 4])), token)
  local s, w = e.s, math.floor(now / WINDOW)
  local gw, gc, gp = tonumber(s[15]) or 0, tonumber(s[16]) or 0, tonumber(s[17]) or 0
  if gw == w then gc = gc + 1
  elseif gw == w - 1 then gp, gc = gc, 1
  else gp, gc = 0, 1 end
  if e.today then   -- cold IP: also count today's warm-up use
    local h = {'gw', int(w), 'gc', int(gc), 'gp', int(gp), 'wd', int(e.today), 'wn', int(e.wused + 1)}
    if advance and e.T > 0 then h[#h + 1] = 't'; h[#h + 1] = int(e.tat + e.T) end
    if e.w0new then h[#h + 1] = 'w0'; h[#h + 1] = int(e.today) end
    redis.call('HSET', ks, unpack(h))
  elseif advance and e.T > 0 then
    redis.call('HSET', ks, 'gw', int(w), 'gc', int(gc), 'gp', int(gp), 't', int(e.tat + e.T))
  else
    redis.call('HSET', ks, 'gw', int(w), 'gc', int(gc), 'gp', int(gp))
  end
end

local n = #KEYS / 2
local evs, best = {}, nil
for i = 1, n do
  local e = evaluate(i)
  evs[i] = e
  if not e.reason then
    local b = best and evs[best]
    if not b or e.leases < b.leases or (e.leases == b.leases and e.tat0 < b.tat0) then best = i end
  end
end
if best then
  commit(best, evs[best], true)
  return {1, 'ok', 0, now, 0, best, evs[best].mpc}
end

-- Denied everywhere: name the candidate whose budget returns first; note what fired.
local first = 1
for i = 1, n do
  local e = evs[i]
  if e.free < evs[first].free then first = i end
  redis.call('HSET', KEYS[2 * i], 'll', e.reason, 'lt', int(now), 'lb', e.free == HUGE and '-1' or int(e.free))
end
local e = evs[first]
local retry = (e.free == HUGE) and hold_retry or (e.free - now)
if monitor then
  commit(first, e, false)
  return {1, e.reason, retry, now, 1, first, e.mpc}
end
return {0, e.reason, retry, now, 0, first, e.mpc}
