"""Pure argument building and result parsing, shared by Store and AsyncStore.

Nothing here does I/O. Each operation is either

- a single script call: ``*_call()`` builds a :class:`Call`, ``parse_*()`` turns
  the raw reply into a result (the hot path: acquire, release), or
- a *plan*: a generator that yields lists of Calls and receives their replies
  (one list = one round trip, pipelined when longer than one), then returns the
  result. Store runs plans with blocking calls, AsyncStore with ``await``, so the
  logic of multi-step operations (record: read state, decide, apply) exists once.
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from governor.store.keys import (
    IpKeys, KeyScheme, parse_lease, reply_text, valid_domain, valid_holder, valid_ip, valid_mta,
    valid_provider, valid_queue_id, valid_recipient, valid_seconds, valid_text,
)
from governor.store.model import Assignment, AuditEntry, Decision, Hold, IpStatus
from governor.transports import SlotPlan, active_slots, limits_plan, slot_transport

US = 1_000_000
DAY = 86400.0
ASSIGNED_MAX = 100_000       # recipients kept per IP in <p>:{<ip>}:assigned (newest win)
LOOKUP_MAX = 10_000          # recipients per assigned_ip() call
_ASSIGN_FIELDS = ("hd", "hr", "cu", "cr", "pu", "pr", "f0", "fs", "fr")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """One Redis request: a named script (keys + args) or a raw command."""

    script: str | None
    keys: tuple[Any, ...] = ()
    args: tuple[Any, ...] = ()
    command: tuple[Any, ...] = ()


Plan = Generator[list[Call], list[Any], T]


def s(value: Any) -> str:
    """bytes or str -> str (clients may or may not decode responses)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _us(seconds: float) -> int:
    return round(seconds * US)


def _sec(us: Any) -> float:
    return int(us) / US


@dataclass(frozen=True, slots=True)
class _IpPlan:
    """Per-IP constants derived from the config once: keys and the script's limit args."""

    ip: str
    keys: IpKeys
    limits: tuple[Any, ...]       # concurrency, interval us, burst, ttl us, warm init, doubling days, start day
    per_connection: int
    messages_per_minute: float
    warm: tuple[Any, ...]         # warm init, doubling days, start day (for status)
    slots: int                    # Postfix slot transports of this IP (governor.transports.slot_plan)


class Planner:
    """Everything config-derived the store needs, and the plans for each operation."""

    def __init__(self, config: Any, *, pick: str = "script", cluster: bool = False) -> None:
        if pick not in ("script", "sequential"):
            raise ValueError(f"pick must be 'script' or 'sequential', got {pick!r}")
        self.config = config
        self.cluster = cluster
        self.keys = KeyScheme(config.redis.prefix, cluster=cluster)
        self.monitor = "1" if config.mode == "monitor" else "0"
        # Redis Cluster: the pool-wide scripts (pick, assign) would cross slots
        self.sequential = pick == "sequential" or cluster
        self.day_us = _us(DAY * float(getattr(config, "time_scale", 1.0)))
        self.hold_retry_us = _us(config.escalation.max_pause)
        self.maxlen = str(int(config.redis.audit_maxlen))
        self._ips: dict[str, _IpPlan] = {}
        self.pool = tuple(valid_ip(ip) for ip in config.pool_ips)
        self._pool_keys = tuple(k for ip in self.pool for k in self.ip(ip).keys.acquire)
        self._pool_limits = tuple(a for ip in self.pool for a in self.ip(ip).limits)
        self._rr = itertools.count(int.from_bytes(os.urandom(2), "big"))
        self.names = {valid_ip(e.ip): e.name for e in config.pool}
        self._assign_keys = (*(k for ip in self.pool for k in (self.ip(ip).keys.state, self.ip(ip).keys.assigned)),
                             self.keys.assign_rr)
        self._assign_args = (self.monitor, _us(config.holds.queue_lifetime), ASSIGNED_MAX, self.hold_retry_us)
        self._pool_slots = tuple(self.ip(ip).slots for ip in self.pool)

    # ------------------------------------------------------------------ per-IP constants
    def ip(self, ip: str) -> _IpPlan:
        """Constants of an already-normalised IP (cached; the pool is precomputed)."""
        plan = self._ips.get(ip)
        if plan is None:
            plan = self._build_ip(ip)
            if len(self._ips) < 4096:
                self._ips[ip] = plan
        return plan

    def _build_ip(self, ip: str) -> _IpPlan:
        cfg = self.config
        lim = cfg.limits_for(ip)
        egress = cfg.egress(ip)
        mpm = float(lim.messages_per_minute)
        interval = round(60 * US / mpm) if mpm > 0 and math.isfinite(mpm) else 0
        warm: tuple[Any, ...] = (0, "1", -1)
        if egress is not None and egress.cold:
            warm = (int(cfg.warmup.initial_per_day), repr(float(cfg.warmup.double_every_days)),
                    self._start_day(egress.warmup_start))
        limits = (int(lim.concurrency), interval, int(lim.burst), _us(lim.lease_ttl), *warm)
        slots = limits_plan(lim).slots if interval else int(lim.concurrency)
        return _IpPlan(ip, self.keys.ip(ip), limits, int(lim.messages_per_connection), mpm, warm, slots)

    def _start_day(self, start: dt.date | None) -> int:
        """Warm-up day index of a start date (-1: count from the IP's first grant).

        Days are Redis-time days of 86400 s x time_scale since the epoch.
        """
        if start is None:
            return -1
        epoch_s = (start - dt.date(1970, 1, 1)).days * DAY
        return math.floor(epoch_s * US / self.day_us)

    # ------------------------------------------------------------------ acquire / release
    def acquire_call(self, ip: str | None, provider: str = "yahoo", holder: str = "",
                     monitor: str | None = None) -> tuple[Call | None, tuple[Any, ...]]:
        """The acquire script call for one IP (ip given) or the whole pool (ip None).

        Returns (None, ctx) when the pool is empty; parse_acquire() then says "no-ip".
        """
        if provider != "yahoo":
            valid_provider(provider)
        member = os.urandom(8).hex()
        if holder:
            member = f"{member}|{valid_holder(holder)}"
        if ip is None:
            ips = self.pool
            if not ips:
                return None, ((), member)
            keys, limits = self._pool_keys, self._pool_limits
        else:
            p = self.ip(valid_ip(ip))
            ips, keys, limits = (p.ip,), p.keys.acquire, p.limits
        args = (monitor or self.monitor, member, self.hold_retry_us, self.day_us, *limits)
        return Call("acquire", keys, args), (ips, member)

    def parse_acquire(self, ctx: tuple[Any, ...], raw: Sequence[Any] | None) -> Decision:
        ips, member = ctx
        if raw is None:
            return Decision(False, None, None, self.hold_retry_us / US, "no-ip")
        granted, reason, retry_us, now_us, mon, idx, mpc = raw
        ip = ips[int(idx) - 1]
        mpc = int(mpc)
        return Decision(
            granted=bool(granted), ip=ip, lease=f"{ip}|{member}" if granted else None,
            retry_after=int(retry_us) / US, reason=s(reason), monitor=bool(mon), now=int(now_us) / US,
            per_connection=mpc if mpc > 0 else self.ip(ip).per_connection,
        )

    def pick_sequential(self, holder: str = "") -> Plan[Decision]:
        """Cluster fallback: try the pool's IPs one by one (one slot per call), in a
        rotating client-side order so processes don't all start on the same IP."""
        if not self.pool:
            return self.parse_acquire(((), ""), None)
        start = next(self._rr) % len(self.pool)
        order = self.pool[start:] + self.pool[:start]
        denials = []
        for ip in order:
            call, ctx = self.acquire_call(ip, holder=holder, monitor="0")
            (raw,) = yield [call]
            decision = self.parse_acquire(ctx, raw)
            if decision.granted:
                return decision
            denials.append(decision)
        # each try read its own Redis time: compare absolute times, report relative to the last
        best = min(denials, key=lambda d: (d.reason.startswith("held:"), d.now + d.retry_after))
        if self.monitor == "1":
            call, ctx = self.acquire_call(best.ip, holder=holder)
            (raw,) = yield [call]
            return self.parse_acquire(ctx, raw)
        last = denials[-1].now
        return replace(best, retry_after=max(0.0, round(best.now + best.retry_after - last, 6)), now=last)

    def release_call(self, lease: str) -> Call:
        ip, member = parse_lease(lease)
        return Call("release", (self.ip(ip).keys.leases,), (member,))

    @staticmethod
    def parse_release(raw: Sequence[Any]) -> float | None:
        """Redis time of the release, or None if it was already released/expired."""
        ok, now_us = raw
        return int(now_us) / US if int(ok) else None

    # ------------------------------------------------------------------ assign (Postfix)
    def assign(self, recipient: str | None, probe: bool = False) -> Plan[Assignment]:
        """Pick the next offered (IP, slot) for a Postfix recipient, in one script over the
        pool (assign.lua); record ``recipient -> now`` on the chosen IP (None: record
        nothing). ``probe``: only say whether any IP may send now, and if not why."""
        rcpt = valid_recipient(recipient) if recipient is not None else ""
        if not self.pool:
            return self._assignment(0, "no-ip", self.hold_retry_us, 0, 0, 0, 0, 0)
        if self.sequential:
            return (yield from self._assign_sequential(rcpt, probe))
        mode, monitor = "probe" if probe else "assign", self._assign_args[0]
        call = Call("assign", self._assign_keys, (mode, monitor, rcpt, *self._assign_args[1:], *self._pool_slots))
        (raw,) = yield [call]
        return self._assignment(*raw)

    def _assignment(self, granted: Any, reason: Any, retry_us: Any, now_us: Any, mon: Any, idx: Any, slot: Any,
                    total: Any) -> Assignment:
        idx, slot = int(idx), int(slot)
        ip = self.pool[idx - 1] if idx else None
        return Assignment(
            granted=bool(int(granted)), ip=ip, slot=slot,
            transport=slot_transport(self.names[ip], slot) if ip is not None and slot else None,
            retry_after=int(retry_us) / US, reason=s(reason), monitor=bool(int(mon)), now=int(now_us) / US,
            offered=int(total),
        )

    def _assign_sequential(self, rcpt: str, probe: bool) -> Plan[Assignment]:
        """Redis Cluster fallback of assign.lua: the same evaluation client-side, with
        single-slot commands (state reads, then INCR, then the record); not atomic, so two
        concurrent callers may see slightly different offers, which only skews the spread."""
        raws = yield [Call(None, command=("TIME",))] + [
            Call(None, command=("HMGET", self.ip(ip).keys.state, *_ASSIGN_FIELDS)) for ip in self.pool]
        now = round(redis_time(raws[0]) * US)
        offered, first, first_free, first_reason, held = [], 0, math.inf, "", ""
        for i, (ip, row) in enumerate(zip(self.pool, raws[1:]), 1):
            hd, hr, cu, cr, pu, _, f0, fs, fr = row
            cu, pu = int(cu or 0), int(pu or 0)
            if hd:
                held = held or f"held:{s(hr or '')}"
            elif cu > now or pu > now:
                reason, until = (f"cooldown:{s(cr or '')}", cu) if cu >= pu else ("provider-paused", pu)
                if until < first_free:
                    first, first_free, first_reason = i, until, reason
            offered.append(0 if hd or cu > now or pu > now else _offer(self.ip(ip).slots, f0, fs, fr, now))
        reason, retry, mon = "ok", 0, 0
        if not any(offered):
            reason, retry = (first_reason, first_free - now) if first else (held or "no-ip", self.hold_retry_us)
            if probe or self.monitor != "1":
                return self._assignment(0, reason, retry, now, 0, first, 0, 0)
            mon, offered = 1, list(self._pool_slots)
        if probe:
            return self._assignment(1, reason, retry, now, mon, 0, 0, sum(offered))
        (count,) = yield [Call(None, command=("INCR", self.keys.assign_rr))]
        idx, slot = _slot_at(offered, (int(count) - 1) % sum(offered))
        if rcpt:
            yield self._record_assignment(self.ip(self.pool[idx - 1]).keys.assigned, rcpt, now)
        return self._assignment(1, reason, retry, now, mon, idx, slot, sum(offered))

    def _record_assignment(self, key: str, rcpt: str, now: int) -> list[Call]:
        keep = _us(self.config.holds.queue_lifetime)
        return [Call(None, command=("ZADD", key, now, rcpt)),
                Call(None, command=("ZREMRANGEBYSCORE", key, "-inf", f"({now - keep}")),
                Call(None, command=("ZREMRANGEBYRANK", key, 0, -(ASSIGNED_MAX + 1))),
                Call(None, command=("PEXPIRE", key, math.ceil(keep / 1000)))]

    def assignments(self, ip: str) -> Plan[dict[str, float]]:
        """recipient -> when it was assigned to ``ip`` (Redis time), within holds.queue_lifetime."""
        key = self.ip(valid_ip(ip)).keys.assigned
        now_raw, raw = yield [Call(None, command=("TIME",)),
                              Call(None, command=("ZRANGE", key, 0, -1, "WITHSCORES"))]
        oldest = redis_time(now_raw) - self.config.holds.queue_lifetime
        pairs = raw if raw and isinstance(raw[0], (list, tuple)) else zip(raw[::2], raw[1::2])
        return {s(m): float(sc) / US for m, sc in pairs if float(sc) / US > oldest}

    def assigned_ip(self, recipients: Sequence[str]) -> Plan[dict[str, str]]:
        """recipient -> the IP it was last assigned to (recipients never assigned are left out):
        how the Postfix queue agent finds queued mail routed to an IP that is now cooling."""
        rcpts = list(dict.fromkeys(valid_recipient(r) for r in recipients))
        if len(rcpts) > LOOKUP_MAX:
            raise ValueError(f"at most {LOOKUP_MAX} recipients per lookup, got {len(rcpts)}")
        ips = list(dict.fromkeys(valid_ip(e.ip) for e in self.config.pool))
        if not rcpts or not ips:
            return {}
        raws = yield [Call(None, command=("ZMSCORE", self.ip(ip).keys.assigned, *rcpts)) for ip in ips]
        best: dict[str, tuple[float, str]] = {}
        for ip, scores in zip(ips, raws):
            for rcpt, score in zip(rcpts, scores):
                if score is not None and float(score) > best.get(rcpt, (-1.0, ""))[0]:
                    best[rcpt] = (float(score), ip)
        return {rcpt: ip for rcpt, (_, ip) in best.items()}

    # ------------------------------------------------------------------ state / record
    def state_call(self, ip: str) -> Call:
        p = self.ip(ip)
        return Call("state", p.keys.record,
                    (_us(self.config.escalation.repeat_window), _us(self.config.complaints.window)))

    @staticmethod
    def parse_state(raw: Sequence[Any]) -> tuple[float, Any]:
        from governor.policy import IpState

        now_us, level, cu, held, pauses, complaints, deferrals, factor = raw
        return int(now_us) / US, IpState(
            level=int(level), cooldown_until=int(cu) / US, held=bool(int(held)),
            recent_pauses=int(pauses), complaints=int(complaints), deferrals=int(deferrals),
            rate_factor=float(s(factor)),
        )

    def ip_state(self, ip: str) -> Plan[Any]:
        (raw,) = yield [self.state_call(valid_ip(ip))]
        return self.parse_state(raw)[1]

    def record(self, ip: str, event: Any, recipient: str | None = None, domain: str | None = None, *,
               queue_id: str | None = None, mta: str | None = None) -> Plan[list[Any]]:
        """Read the IP's state, let governor.policy decide, apply the actions in one script."""
        ip = valid_ip(ip)
        qid = valid_queue_id(queue_id) if queue_id is not None else ""
        mta_name = valid_mta(mta) if mta is not None else ""
        if domain is None and isinstance(recipient, str) and "@" in recipient:
            domain = recipient.rpartition("@")[2]
        dom = valid_domain(domain) if domain else ""
        (raw,) = yield [self.state_call(ip)]
        now, state = self.parse_state(raw)
        from governor import policy

        actions = policy.decide(event, ip, dom or None, state, self.config, now)
        if actions:
            yield [self.apply_call(ip, actions, getattr(event, "text", ""), qid, mta_name, dom)]
        return actions

    def apply_call(self, ip: str, actions: Sequence[Any], reply: Any, queue_id: str = "", mta: str = "",
                   domain: str = "", who: str = "policy") -> Call:
        p = self.ip(ip)
        cfg = self.config
        args: list[Any] = [
            self.monitor, ip, reply_text(reply), who, queue_id, mta, domain, self.maxlen,
            _us(cfg.escalation.repeat_window), _us(cfg.complaints.window), p.per_connection,
            os.urandom(4).hex(),
        ]
        for a in actions:
            args += _action_args(a)
        return Call("apply", (*p.keys.record, self.keys.audit_for(p.keys)), tuple(args))

    # ------------------------------------------------------------------ admin
    def _admin(self, keys: IpKeys | None, op: str, label: str, seconds: float, reason: str, who: str,
               audit: bool = True) -> Call:
        state, pauses = (keys.state, keys.pauses) if keys else (self.keys.provider, self.keys.provider_pauses)
        return Call("admin", (state, pauses, self.keys.audit_for(keys)),
                    (op, label, _us(seconds), reason, who, self.maxlen, "1" if audit else "0"))

    def _provider_calls(self, op: str, seconds: float, reason: str, who: str) -> list[Call]:
        """Provider-wide state is copied into every IP's state hash (rare admin write) so
        the hot path never reads a cross-slot key; the provider hash keeps it for status."""
        ips = {valid_ip(e.ip) for e in self.config.pool}
        calls = [self._admin(None, f"provider-{op}", "provider", seconds, reason, who)]
        calls += [self._admin(self.ip(ip).keys, f"provider-{op}", ip, seconds, reason, who, audit=False)
                  for ip in sorted(ips)]
        return calls

    def pause(self, target: str, seconds: float, reason: str, who: str) -> Plan[None]:
        seconds = valid_seconds(seconds)
        reason, who = valid_text(reason), valid_text(who, "who", 64)
        if target == "provider":
            yield self._provider_calls("pause", seconds, reason, who)
        else:
            ip = valid_ip(target)
            yield [self._admin(self.ip(ip).keys, "pause", ip, seconds, reason, who)]

    def resume(self, target: str, who: str) -> Plan[None]:
        who = valid_text(who, "who", 64)
        if target == "provider":
            yield self._provider_calls("resume", 0.0, "", who)
        else:
            ip = valid_ip(target)
            yield [self._admin(self.ip(ip).keys, "resume", ip, 0.0, "", who)]

    def ip_admin(self, op: str, ip: str, who: str) -> Plan[bool]:
        """release-ip / reset-level; True when something changed."""
        ip, who = valid_ip(ip), valid_text(who, "who", 64)
        (raw,) = yield [self._admin(self.ip(ip).keys, op, ip, 0.0, "", who)]
        return bool(int(raw[1]))

    # ------------------------------------------------------------------ status
    def status(self) -> Plan[list[IpStatus]]:
        egress = [e for e in self.config.pool]
        if not egress:
            return []
        calls = []
        rw, cw = _us(self.config.escalation.repeat_window), _us(self.config.complaints.window)
        for e in egress:
            p = self.ip(valid_ip(e.ip))
            calls.append(Call("status", p.keys.status, (rw, cw, *p.warm, self.day_us)))
        raws = yield calls
        return [self._parse_status(e, raw) for e, raw in zip(egress, raws)]

    def _parse_status(self, egress: Any, raw: Sequence[Any]) -> IpStatus:
        now_us, leases, factor, granted, defer, compl, pauses, holds, wcap, wused, flat = raw
        h = {s(flat[i]): s(flat[i + 1]) for i in range(0, len(flat), 2)}
        p = self.ip(valid_ip(egress.ip))
        f = float(s(factor))

        def t(name: str) -> float:
            return int(h[name]) / US if name in h else 0.0

        lb = int(h.get("lb", 0))
        return IpStatus(
            ip=p.ip, name=egress.name, enabled=getattr(egress, "enabled", True), cold=egress.cold,
            now=int(now_us) / US, leases=int(leases), concurrency=p.limits[0],
            rate_now=int(granted), rate_allowed=p.messages_per_minute * f, rate_factor=f,
            cooldown_until=t("cu"), cooldown_reason=h.get("cr", ""), cooldown_reply=h.get("cy", ""),
            cooldown_start=t("cs"), provider_paused_until=t("pu"), provider_pause_reason=h.get("pr", ""),
            held="hd" in h, held_reason=h.get("hr", ""), held_reply=h.get("hy", ""), held_since=t("hs"),
            level=int(h.get("lv", 0)), deferrals=int(defer), complaints=int(compl), recent_pauses=int(pauses),
            holds=int(holds), per_connection=int(h.get("mpc", p.per_connection)),
            warmup_cap=int(wcap) if int(wcap) >= 0 else None, warmup_used=int(wused),
            hold_queue_until=float(h["hq"]) if h.get("hq") == "-1" else t("hq"), last_limit=h.get("ll", ""), last_limit_at=t("lt"),
            budget_at=-1.0 if lb < 0 else lb / US,
        )

    # ------------------------------------------------------------------ audit
    def audit(self, since: float | None = None, count: int = 100) -> Plan[list[AuditEntry]]:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 100_000:
            raise ValueError(f"count must be an integer in 1..100000, got {count!r}")
        if since is not None:
            since = float(since)
            if not math.isfinite(since) or since < 0:
                raise ValueError(f"since must be a Redis-time timestamp, got {since!r}")
        streams = [self.keys.audit]
        if self.cluster:  # one stream per IP (and the provider's): read each, merge by time
            streams += [self.ip(ip).keys.audit for ip in dict.fromkeys(valid_ip(e.ip) for e in self.config.pool)]
        if since is None:
            raws = yield [Call(None, command=("XREVRANGE", k, "+", "-", "COUNT", count)) for k in streams]
        else:
            start = f"{math.floor(since * 1000)}-0"
            raws = yield [Call(None, command=("XRANGE", k, start, "+", "COUNT", count)) for k in streams]
        entries = [_audit_entry(item) for raw in raws for item in raw or []]
        if len(streams) == 1:
            return entries[::-1] if since is None else entries
        entries.sort(key=lambda e: (e.ts, e.id))
        return entries[-count:] if since is None else entries[:count]

    def note(self, action: str, *, ip: str = "", reason: str = "", who: str = "", queue_id: str = "",
             extra: dict[str, Any] | None = None) -> Plan[str]:
        """Append an operator action the Lua scripts do not make (e.g. a paced release) to
        the audit stream, in the scripts' field layout, stamped with Redis time."""
        target = valid_ip(ip) if ip not in ("", "provider") else ip
        fields: list[Any] = ["ip", target, "action", valid_text(action, "action", 64),
                             "reason", valid_text(reason), "reply", "", "who", valid_text(who, "who", 64),
                             "queue_id", valid_queue_id(queue_id) if queue_id else ""]
        for key, value in (extra or {}).items():
            if key in ("ts", "ip", "action", "reason", "reply", "who", "queue_id"):
                raise ValueError(f"extra field {key!r} would shadow a standard audit field")
            fields += [valid_text(key, "field name", 32), valid_text(str(value), key)]
        (now_raw,) = yield [Call(None, command=("TIME",))]
        (entry_id,) = yield [Call(None, command=("XADD", self.keys.audit, "MAXLEN", "~", self.maxlen, "*",
                                                 "ts", f"{redis_time(now_raw):.6f}", *fields))]
        return s(entry_id)

    # ------------------------------------------------------------------ holds
    def _hold_field(self, queue_id: str, mta: str) -> str:
        return f"{mta}/{queue_id}"

    def add_hold(self, hold: Hold) -> Plan[None]:
        qid, mta, ip = valid_queue_id(hold.queue_id), valid_mta(hold.mta), valid_ip(hold.ip)
        reason = valid_text(hold.reason)
        domain = valid_domain(hold.domain) if hold.domain else None
        if not (isinstance(hold.since, (int, float)) and math.isfinite(hold.since) and hold.since >= 0):
            raise ValueError(f"not a valid hold time: {hold.since!r}")
        field = self._hold_field(qid, mta)
        now_raw, old_ip = yield [Call(None, command=("TIME",)), Call(None, command=("HGET", self.keys.hold_index,
                                                                                     field))]
        since = hold.since or redis_time(now_raw)
        doc = json.dumps({"q": qid, "m": mta, "ip": ip, "s": since, "r": reason, "d": domain},
                         separators=(",", ":"))
        calls = [Call(None, command=("HSET", self.keys.hold_index, field, ip)),
                 Call(None, command=("HSET", self.ip(ip).keys.holds, field, doc))]
        if old_ip and s(old_ip) != ip:
            calls.append(Call(None, command=("HDEL", self.ip(valid_ip(s(old_ip))).keys.holds, field)))
        yield calls

    def remove_hold(self, queue_id: str, mta: str) -> Plan[bool]:
        field = self._hold_field(valid_queue_id(queue_id), valid_mta(mta))
        (ip,) = yield [Call(None, command=("HGET", self.keys.hold_index, field))]
        if not ip:
            return False
        yield [Call(None, command=("HDEL", self.ip(valid_ip(s(ip))).keys.holds, field)),
               Call(None, command=("HDEL", self.keys.hold_index, field))]
        return True

    def holds(self, ip: str | None = None) -> Plan[list[Hold]]:
        if ip is not None:
            ips: list[str] = [valid_ip(ip)]
        else:
            (indexed,) = yield [Call(None, command=("HVALS", self.keys.hold_index))]
            ips = sorted({valid_ip(e.ip) for e in self.config.pool} | {valid_ip(s(v)) for v in indexed or []})
        if not ips:
            return []
        raws = yield [Call(None, command=("HVALS", self.ip(i).keys.holds)) for i in ips]
        out = [_hold(doc) for raw in raws for doc in raw or []]
        return sorted(out, key=lambda h: (h.since, h.mta, h.queue_id))

    def holds_due(self, limit: int | None = None) -> Plan[list[Hold]]:
        """Holds to release now: their IP may send again ("cooldown-over"), or the MTA's
        queue lifetime is about to run out ("deadline": since + queue_lifetime - release_margin)."""
        held = yield from self.holds()
        if not held:
            return []
        ips = sorted({h.ip for h in held})
        raws = yield [Call(None, command=("TIME",))] + [
            Call(None, command=("HMGET", self.ip(i).keys.state, "hd", "cu", "pu")) for i in ips]
        now = redis_time(raws[0])
        free = {ip: not r[0] and int(r[1] or 0) / US <= now and int(r[2] or 0) / US <= now
                for ip, r in zip(ips, raws[1:])}
        margin = self.config.holds.queue_lifetime - self.config.holds.release_margin
        due = []
        for h in held:
            if free[h.ip]:
                due.append(replace(h, due="cooldown-over"))
            elif h.since + margin <= now:
                due.append(replace(h, due="deadline"))
        return due[:limit] if limit is not None else due


def _action_args(a: Any) -> list[Any]:
    """Validate one policy Action and flatten it for apply.lua."""
    from governor.policy import ACTION_KINDS

    if a.kind not in ACTION_KINDS:
        raise ValueError(f"unknown action kind {a.kind!r}")
    seconds, factor = float(a.seconds), float(a.factor)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"action {a.kind}: bad seconds {a.seconds!r}")
    if a.kind == "slow" and not (math.isfinite(factor) and 0 < factor <= 1):
        raise ValueError(f"action slow: factor must be in (0, 1], got {a.factor!r}")
    if a.kind == "per_connection" and int(a.value) < 1:
        raise ValueError(f"action per_connection: value must be >= 1, got {a.value!r}")
    reason = reply_text(a.reason)[:64]
    return [a.kind, _us(seconds), repr(min(max(factor, 1e-6), 1.0)), int(a.level), int(a.value), reason]


def _factor_at(f0: Any, fs: Any, fr: Any, t: int) -> float:
    """lib.lua ``factor_at`` (the ramp), for the Cluster fallback that reads state client-side."""
    if f0 is None:
        return 1.0
    f0, fs, fr = float(f0), int(fs or 0), int(fr or 0)
    if t < fs:
        return f0
    if fr <= 0 or t >= fs + fr:
        return 1.0
    return f0 + (1.0 - f0) * (t - fs) / fr


def _offer(slots: int, f0: Any, fs: Any, fr: Any, now: int) -> int:
    return active_slots(SlotPlan(slots, 1), _factor_at(f0, fs, fr, now))


def _slot_at(offered: Sequence[int], left: int) -> tuple[int, int]:
    """The (1-based IP index, slot) at position ``left`` of the slot-major order (assign.lua)."""
    for j in range(1, max(offered) + 1):
        for i, k in enumerate(offered, 1):
            if k >= j:
                if left == 0:
                    return i, j
                left -= 1
    raise ValueError("position beyond the offered slots")  # pragma: no cover - left < sum(offered)


def redis_time(raw: Any) -> float:
    """TIME reply (redis-py gives (sec, usec)) -> seconds."""
    sec, usec = raw
    return int(sec) + int(usec) / US


def _hold(doc: Any) -> Hold:
    d = json.loads(s(doc))
    return Hold(queue_id=d["q"], mta=d["m"], ip=d["ip"], since=float(d["s"]), reason=d.get("r", ""),
                domain=d.get("d"))


def _audit_entry(item: Any) -> AuditEntry:
    entry_id, fields = item
    f = {s(k): s(v) for k, v in (fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2]))}
    base = {k: f.pop(k, "") for k in ("ip", "action", "reason", "reply", "who", "queue_id")}
    ts = float(f.pop("ts", "0") or 0)
    return AuditEntry(id=s(entry_id), ts=ts, extra=f, **base)
