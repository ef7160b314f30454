-- lib.lua: helpers shared by the governor scripts. scripts.py prepends this file
-- to every script that needs it, so each EVALSHA body stays self-contained (Redis
-- has no include) while the GCRA/ramp/warm-up arithmetic exists exactly once.
--
-- Time is Redis TIME in integer microseconds (exact in a Lua double until 2^53 us,
-- i.e. the year 2255); every value written back goes through int() so it never
-- meets Lua's lossy %.14g number formatting.

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function int(x)
  return string.format('%d', x)
end

-- Microseconds as seconds text, for audit fields people read.
local function secs(us)
  return string.format('%.6f', us / 1000000)
end

-- Rate factor in force at time t: f0 until fs, then linear back to 1.0 over fr.
local function factor_at(f0, fs, fr, t)
  f0 = tonumber(f0)
  if not f0 then return 1.0 end
  fs = tonumber(fs) or 0
  fr = tonumber(fr) or 0
  if t < fs then return f0 end
  if fr <= 0 or t >= fs + fr then return 1.0 end
  return f0 + (1.0 - f0) * (t - fs) / fr
end

-- Warm-up daily cap: init doubling every dbl days since start_day (capped at 2^40).
local function warm_cap(init, dbl, start_day, today)
  local age = today - start_day
  if age < 0 then age = 0 end
  local steps = math.floor(age / dbl)
  if steps > 40 then steps = 40 end
  return init * 2 ^ steps
end

-- One audit entry; the stream is trimmed approximately (MAXLEN ~) so XADD stays O(1).
local function audit(key, maxlen, now, fields)
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'ts', secs(now), unpack(fields))
end

-- A (new or longer) cooldown until untl: a ramp still in progress restarts when it
-- ends (from its low factor: stricter); a finished ramp is dropped, not revived.
local function delay_ramp(ks, untl, now)
  local r = redis.call('HMGET', ks, 'f0', 'fs', 'fr')
  if not r[1] then return end
  if factor_at(r[1], r[2], r[3], now) >= 1 then
    redis.call('HDEL', ks, 'f0', 'fs', 'fr')
  elseif tonumber(r[2]) < untl then
    redis.call('HSET', ks, 'fs', int(untl))
  end
end
