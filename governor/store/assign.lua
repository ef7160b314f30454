-- assign.lua: route one Postfix recipient to a slot transport of an IP that may send now.
-- Postfix asks its transport map once, at queue time (docs/postfix-levers.md), so this
-- does not pace anything: the slot transports do (rate delay). It only spreads recipients
-- evenly over the slots the pool offers right now, in one atomic round trip.
--
-- KEYS: 2 per pool IP: state (HASH), assigned (ZSET recipient -> assigned at, us); then
--   the shared round-robin counter (STRING, INCR). Multi-slot: standalone/Sentinel only;
--   Redis Cluster uses Planner.assign_sequential (one slot per command).
-- ARGV: 1 mode (assign | probe), 2 monitor (0|1), 3 recipient ('' = record nothing),
--   4 keep us (holds.queue_lifetime), 5 cap (members kept per assigned ZSET),
--   6 retry-after for held IPs (us), then 1 per pool IP: the slots of its plan
-- An IP offers no slot while held, cooling or provider-paused; otherwise the first
-- floor(slots x rate factor) of its slots, at least one (governor.transports.active_slots;
-- the factor is the ramp in force now, lib.lua factor_at).
-- Returns {granted 0|1, reason, retry us, now us, monitor 0|1, index (1-based, 0 = none),
--   slot (0 = none), slots offered}
local now = now_us()
local n = (#KEYS - 1) / 2
local probe, monitor, rcpt = ARGV[1] == 'probe', ARGV[2] == '1', ARGV[3]
local keep, cap, hold_retry = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

local offered, total, widest = {}, 0, 0
local first, first_free, first_reason, held_reason = 0, math.huge, nil, nil
for i = 1, n do
  local s = redis.call('HMGET', KEYS[2 * i - 1], 'hd', 'hr', 'cu', 'cr', 'pu', 'pr', 'f0', 'fs', 'fr')
  local cu, pu = tonumber(s[3]) or 0, tonumber(s[5]) or 0
  local k = 0
  if s[1] then
    held_reason = held_reason or ('held:' .. (s[2] or ''))
  elseif cu > now or pu > now then
    local r, t = 'cooldown:' .. (s[4] or ''), cu
    if pu > cu then r, t = 'provider-paused', pu end
    if t < first_free then first, first_free, first_reason = i, t, r end
  else
    local slots = tonumber(ARGV[6 + i])
    k = math.max(1, math.min(slots, math.floor(slots * factor_at(s[7], s[8], s[9], now) + 1e-9)))
  end
  offered[i] = k
  total = total + k
  if k > widest then widest = k end
end

local reason, retry, mon = 'ok', 0, 0
if total == 0 then
  -- nobody may send: name the cooldown that ends first (held IPs never end by themselves)
  if first > 0 then reason, retry = first_reason, first_free - now
  else reason, retry = held_reason or 'no-ip', hold_retry end
  if probe or not monitor then return {0, reason, retry, now, 0, first, 0, 0} end
  mon = 1   -- monitor mode: would deny; spread over every IP's full plan instead
  for i = 1, n do
    offered[i] = tonumber(ARGV[6 + i])
    total = total + offered[i]
    if offered[i] > widest then widest = offered[i] end
  end
end
if probe then return {1, reason, retry, now, mon, 0, 0, total} end

-- Slot-major order: slot 1 of every offering IP, then slot 2, ...; so consecutive
-- recipients alternate between IPs, and every run of `total` consecutive assignments
-- gives each offered slot exactly one.
local c = redis.call('INCR', KEYS[#KEYS])
if c >= 1e12 then redis.call('SET', KEYS[#KEYS], 0) end
local left, chosen, slot = (c - 1) % total, 0, 0
for j = 1, widest do
  for i = 1, n do
    if chosen == 0 and offered[i] >= j then
      if left == 0 then chosen, slot = i, j end
      left = left - 1
    end
  end
end

if rcpt ~= '' then
  local ka = KEYS[2 * chosen]
  redis.call('ZADD', ka, int(now), rcpt)
  redis.call('ZREMRANGEBYSCORE', ka, '-inf', '(' .. int(now - keep))
  redis.call('ZREMRANGEBYRANK', ka, 0, -(cap + 1))   -- keep the newest `cap`
  redis.call('PEXPIRE', ka, int(math.ceil(keep / 1000)))
end
return {1, reason, retry, now, mon, chosen, slot, total}
