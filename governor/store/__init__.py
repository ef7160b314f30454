"""governor.store: Redis-backed, atomic per-IP admission and feedback state.

Every decision is one server-side Lua script (``*.lua`` next to this file, loaded
with importlib.resources and run through redis-py Script objects: EVALSHA with
automatic reload on NOSCRIPT). Time is Redis ``TIME`` inside the scripts, never a
client clock. ``Store`` (blocking) and ``AsyncStore`` (asyncio) share the scripts
and all argument building / result parsing (``plans.py``).

Key scheme (``<p>`` = ``config.redis.prefix``, default ``gov``; ``<ip>`` = the
normalised IP literal, which is also the Redis Cluster hash tag, so every
per-IP script touches exactly one slot)::

    <p>:{<ip>}:leases   ZSET  lease member -> expiry (us); expired members purged by acquire
    <p>:{<ip>}:state    HASH  t GCRA theoretical arrival time (us),
                              cu/cr/cy/cs cooldown until/reason/reply/start,
                              hd/hr/hy/hs held flag/reason/reply/since,
                              pu/pr/ps provider pause (copied here by the admin op),
                              lv level, f0/fs/fr ramp factor/start/duration,
                              mpc messages per connection, hq hold-queue until,
                              wd/wn/w0 warm-up day/count/first day,
                              gw/gc/gp grants in the current/previous 60 s window,
                              ll/lt/lb last limit fired/when/budget returns
    <p>:{<ip>}:pauses   ZSET  pause starts (us), trimmed to escalation.repeat_window
    <p>:{<ip>}:defer    ZSET  deferrals (us), trimmed to complaints.window
    <p>:{<ip>}:compl    ZSET  complaint signals (us), trimmed to complaints.window
    <p>:{<ip>}:holds    HASH  "<mta>/<queue id>" -> JSON hold record
    <p>:{<ip>}:assigned ZSET  Postfix recipient -> when assign() routed it to this IP (us),
                              trimmed to holds.queue_lifetime on write, newest 100000 kept
    <p>:audit           STREAM every automatic and admin action (MAXLEN ~ audit_maxlen)
    <p>:holdidx         HASH  "<mta>/<queue id>" -> ip (find a hold without its IP)
    <p>:provider        HASH  provider pause (pu/pr/ps), for status; hot path never reads it
    <p>:assign:rr       STRING round-robin counter of assign() (INCR), shared by every daemon

On Redis Cluster (a RedisCluster client) no script may span slots, so the audit goes
to per-IP streams ``<p>:{<ip>}:audit`` and the provider record's keys share the tag
``{provider}`` (``<p>:{provider}``, ``<p>:{provider}:pauses``, ``<p>:{provider}:audit``);
the pool-wide pick and assign() run client-side, one slot per call. Sentinel needs
nothing but its client (docs/store.md, "Redis Sentinel and Redis Cluster").

Lease ids are ``<ip>|<16 hex>[|<holder>]`` so release() finds the IP's key with
no lookup. Everything that reaches a key name is validated first (keys.py).

``assign()`` (Postfix's transport map) is one script over the pool (assign.lua): IPs
that are not held, cooling or provider-paused offer ``active_slots(slot_plan(...),
ramp factor)`` slots each, and the shared counter walks them slot-major so every
offered slot gets an equal share. ``AsyncStore.connect()`` runs its round trips on
a Lane (lane.py): one auto-pipelined connection, for the socket daemon's hot path.
"""
from __future__ import annotations

from governor.store.aio import AsyncStore
from governor.store.keys import IpKeys, KeyScheme
from governor.store.model import Assignment, AuditEntry, Decision, Hold, IpStatus
from governor.store.sync import Store

__all__ = ["Assignment", "AsyncStore", "AuditEntry", "Decision", "Hold", "IpKeys", "IpStatus", "KeyScheme", "Store"]
