-- status.lua: everything an operator wants to see about one IP, read-only.
-- KEYS: leases, state, pauses, defer, compl, holds (same hash tag)
-- ARGV: 1 repeat window us, 2 counter window us, 3 warm-up initial (0 = not cold),
--   4 doubling days, 5 warm-up start day (-1 = first use), 6 day us
-- Returns {now, leases in use, rate factor (string), grants in the last 60 s (sliding-window estimate),
--   deferrals, complaints, recent pauses, holds, warm-up cap (-1 = none), warm-up used today,
--   state hash as a flat field/value list}
local now = now_us()
local s = redis.call('HGETALL', KEYS[2])
local h = {}
for i = 1, #s, 2 do h[s[i]] = s[i + 1] end

-- grants: acquire keeps counts of the current and previous 60 s window (gw/gc/gp)
local WINDOW = 60000000
local w = math.floor(now / WINDOW)
local gw, gc, gp = tonumber(h['gw']) or 0, tonumber(h['gc']) or 0, tonumber(h['gp']) or 0
local left = 1 - (now - w * WINDOW) / WINDOW
local granted = 0
if gw == w then granted = gc + gp * left elseif gw == w - 1 then granted = gc * left end

local wcap, wused = -1, 0
local winit, day = tonumber(ARGV[3]), tonumber(ARGV[6])
if winit > 0 then
  local today = math.floor(now / day)
  local w0 = tonumber(ARGV[5])
  if w0 < 0 then w0 = tonumber(h['w0']) or today end
  wcap = warm_cap(winit, tonumber(ARGV[4]), w0, today)
  if tonumber(h['wd']) == today then wused = tonumber(h['wn']) or 0 end
end

return {
  now,
  redis.call('ZCOUNT', KEYS[1], '(' .. int(now), '+inf'),
  string.format('%.17g', factor_at(h['f0'], h['fs'], h['fr'], now)),
  math.floor(granted + 0.5),
  redis.call('ZCOUNT', KEYS[4], '(' .. int(now - tonumber(ARGV[2])), '+inf'),
  redis.call('ZCOUNT', KEYS[5], '(' .. int(now - tonumber(ARGV[2])), '+inf'),
  redis.call('ZCOUNT', KEYS[3], '(' .. int(now - tonumber(ARGV[1])), '+inf'),
  redis.call('HLEN', KEYS[6]),
  wcap,
  wused,
  s,
}
