"""governor.store against a real redis-server: GCRA, leases, cooldowns, holds, escalation,
pick, monitor mode, NOSCRIPT/restart recovery, audit, and hostile input."""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from governor.classify import classify
from governor.config import Config, load_config_text
from governor.policy import Action
from governor.redisproc import RedisProc
from governor.store import AsyncStore, Decision, Hold, Store
from governor.store.keys import KeyScheme, parse_lease, reply_text

IP1, IP2, IP3 = "192.0.2.10", "192.0.2.11", "192.0.2.12"
POOL = f"""
pool:
  - {{ip: {IP1}}}
  - {{ip: {IP2}}}
  - {{ip: {IP3}}}
"""
US = 1e-6

TSS04 = "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1"
TS01 = "421 4.16.55 [TS01] Messages from 192.0.2.10 temporarily deferred due to excessive user complaints"
TS02 = "421 4.16.56 [TS02] Messages from 192.0.2.10 temporarily deferred due to excessive user complaints"
TS03 = ("421 4.7.1 [TS03] All messages from 192.0.2.10 will be permanently deferred; Retrying will NOT succeed. "
        "See https://postmaster.yahooinc.com/error-codes")
MAXCONN = "421 Max message per connection reached, closing transmission channel"


def make_config(url: str, limits: str = "concurrency: 100, messages_per_minute: 600", extra: str = "",
                pool: str = POOL, **changes: Any) -> Config:
    text = f"{pool}\nlimits:\n  per_ip: {{{limits}}}\n{extra}"
    cfg = load_config_text(text, "test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url), **changes)


@pytest.fixture
def make_store(redis_url: str) -> Iterator[Any]:
    stores: list[Store] = []

    def make(**kwargs: Any) -> Store:
        pick = kwargs.pop("pick", "script")
        store = Store.connect(make_config(redis_url, **kwargs), pick=pick)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def apply(store: Store, ip: str, *actions: Action, reply: str = "") -> None:
    """Apply policy actions directly (the store's half of record())."""
    store._execute([store.plans.apply_call(ip, list(actions), reply)])


def wait_granted(store: Store, ip: str | None = None, limit: float = 5.0) -> Decision:
    deadline = time.monotonic() + limit
    while True:
        d = store.acquire(ip)
        if d.granted or time.monotonic() > deadline:
            return d
        time.sleep(min(d.retry_after, 0.5) + 0.0005)


# --------------------------------------------------------------------------- GCRA
def test_gcra_spacing_is_exact(make_store: Any) -> None:
    """600/min: grants never closer than 100 ms; a denial's retry_after is exact."""
    store = make_store()
    first = store.acquire(IP1)
    assert first.granted and first.reason == "ok" and first.lease.startswith(IP1 + "|")
    denied = store.acquire(IP1)
    assert not denied.granted and denied.reason == "rate" and denied.lease is None
    # exact: the next slot is first.now + 100 ms, both read from Redis TIME
    assert denied.now + denied.retry_after == pytest.approx(first.now + 0.1, abs=2 * US)
    grants = [first.now]
    while len(grants) < 8:
        d = store.acquire(IP1)
        if d.granted:
            grants.append(d.now)
        else:
            time.sleep(d.retry_after)
    gaps = [b - a for a, b in zip(grants, grants[1:])]
    assert min(gaps) >= 0.1 - 2 * US
    assert max(gaps) < 0.1 + 0.1  # sleeping retry_after lands on (or just after) the next slot


def test_sustained_rate_matches_limit(make_store: Any) -> None:
    store = make_store(limits="concurrency: 100, messages_per_minute: 1200")  # 50 ms
    grants: list[float] = []
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        d = store.acquire(IP1)
        if d.granted:
            grants.append(d.now)
            store.release(d.lease)
        else:  # wake 1 ms early and ask again, as a client that cares about its slot would
            time.sleep(max(0.0, d.retry_after - 0.001))
    rate = (len(grants) - 1) / (grants[-1] - grants[0])
    assert rate == pytest.approx(20.0, rel=0.03)
    assert all(b - a >= 0.05 - 2 * US for a, b in zip(grants, grants[1:]))


def test_burst_allows_back_to_back_then_spaces(make_store: Any) -> None:
    store = make_store(limits="concurrency: 100, messages_per_minute: 600, burst: 3")
    ds = [store.acquire(IP1) for _ in range(5)]
    assert [d.granted for d in ds] == [True, True, True, True, False]
    # 4 grants advanced the TAT by 400 ms; tolerance 300 ms: next slot = first + 100 ms
    assert ds[4].now + ds[4].retry_after == pytest.approx(ds[0].now + 0.1, abs=2 * US)


def test_denial_does_not_consume_budget(make_store: Any) -> None:
    store = make_store(limits="concurrency: 1, messages_per_minute: 600")
    first = store.acquire(IP1)
    slot = first.now + 0.1
    for _ in range(30):  # rate denials: the allowed time never moves
        d = store.acquire(IP1)
        assert not d.granted
        assert d.now + d.retry_after >= slot - 2 * US
        if d.reason == "rate":
            assert d.now + d.retry_after == pytest.approx(slot, abs=2 * US)
    time.sleep(max(0.0, slot - store.now()) + 0.001)
    blocked = store.acquire(IP1)  # the lease is still held: concurrency, and no TAT move
    assert blocked.reason == "concurrency" and not blocked.granted
    assert store.release(first.lease)
    second = store.acquire(IP1)
    assert second.granted and store.release(second.lease)
    # the denied attempts consumed nothing: the next slot is one interval after this grant
    third = store.acquire(IP1)
    assert third.reason == "rate"
    assert third.now + third.retry_after == pytest.approx(max(slot, second.now) + 0.1, abs=2 * US)


# --------------------------------------------------------------------------- leases
def test_concurrency_cap_and_lease_expiry(make_store: Any) -> None:
    store = make_store(limits="concurrency: 2, messages_per_minute: 60000000, lease_ttl: 0.3s")
    a, b = store.acquire(IP1), store.acquire(IP1)
    assert a.granted and b.granted
    c = store.acquire(IP1)
    assert not c.granted and c.reason == "concurrency"
    # retry_after = when the oldest lease expires
    assert c.now + c.retry_after == pytest.approx(a.now + 0.3, abs=2 * US)
    time.sleep(c.retry_after + 0.002)
    d = store.acquire(IP1)
    assert d.granted  # the expired lease was purged inside the script
    assert store.release(a.lease) is False  # expired leases cannot be released
    assert store.release(d.lease) is True


def test_release_is_idempotent(make_store: Any) -> None:
    store = make_store()
    d = store.acquire(IP1)
    assert store.release(d.lease) is True
    assert store.release(d.lease) is False
    assert store.release(f"{IP1}|0123456789abcdef") is False
    at = store.release_at(store.acquire(IP2).lease)
    assert at is not None and abs(at - store.now()) < 1.0


def test_lease_holder_label(make_store: Any) -> None:
    store = make_store()
    d = store.acquire(IP1, holder="milter:123@host-a")
    assert d.lease.endswith("|milter:123@host-a")
    assert parse_lease(d.lease) == (IP1, d.lease.split("|", 1)[1])
    assert store.release(d.lease)
    with pytest.raises(ValueError):
        store.acquire(IP1, holder="bad holder")


# --------------------------------------------------------------------------- cooldown / hold / provider
def test_record_tss04_cools_the_ip_with_reason_and_reply(make_store: Any) -> None:
    store = make_store(extra="time_scale: 0.0001")  # 2 h -> 0.72 s
    actions = store.record(IP1, classify(TSS04), "someone@yahoo.com", queue_id="4Zx9Q12abc", mta="postfix")
    assert [a.kind for a in actions] == ["count_deferral", "pause", "slow", "hold_queue"]
    d = store.acquire(IP1)
    assert not d.granted and d.reason == "cooldown:TSS04"
    assert d.retry_after == pytest.approx(0.72, abs=0.05)
    st = store.ip_state(IP1)
    assert st.cooldown_until == pytest.approx(d.now + d.retry_after, abs=2 * US)
    assert st.deferrals == 1 and st.recent_pauses == 1 and st.rate_factor == 0.5
    status = {s.ip: s for s in store.status()}[IP1]
    assert status.cooldown_reason == "TSS04" and status.cooldown_reply == TSS04
    assert status.cooldown_start == pytest.approx(status.cooldown_until - 0.72, abs=0.001)
    assert status.hold_queue_until == pytest.approx(status.cooldown_until, abs=2 * US)
    assert store.acquire(IP2).granted  # other IPs keep flowing
    time.sleep(d.retry_after + 0.002)
    assert store.acquire(IP1).granted


def test_pause_uses_max_semantics_and_resume_ends_it(make_store: Any) -> None:
    store = make_store()
    store.pause(IP1, 30, "maintenance", "alice")
    store.pause(IP1, 1, "shorter", "bob")  # never shortens a running pause
    d = store.acquire(IP1)
    assert d.reason == "cooldown:admin" and d.retry_after == pytest.approx(30, abs=0.1)
    apply(store, IP1, Action("pause", seconds=5, reason="TSS04"))  # a stale, shorter pause: no effect
    assert store.acquire(IP1).reason == "cooldown:admin"
    store.resume(IP1, "alice")
    assert store.acquire(IP1).granted


def test_hold_ip_until_admin_release(make_store: Any) -> None:
    store = make_store()
    store.record(IP1, classify(TS03))
    d = store.acquire(IP1)
    assert not d.granted and d.reason == "held:TS03"
    assert d.retry_after == store.config.escalation.max_pause  # nominal: only an admin ends it
    st = store.ip_state(IP1)
    assert st.held and st.level == 3
    assert {s.ip: s for s in store.status()}[IP1].hold_queue_until == -1  # until released
    store.resume(IP1, "alice")  # resume ends cooldowns, not holds
    assert store.acquire(IP1).reason == "held:TS03"
    assert store.release_ip(IP1, "alice") is True
    assert store.release_ip(IP1, "alice") is False
    assert store.acquire(IP1).granted
    assert store.ip_state(IP1).level == 3  # releasing the hold does not lower the level


def test_provider_pause_and_resume(make_store: Any) -> None:
    store = make_store()
    store.pause("provider", 20, "yahoo incident", "ops")
    for ip in (IP1, IP2, IP3):
        d = store.acquire(ip)
        assert not d.granted and d.reason == "provider-paused"
    d = store.acquire()
    assert not d.granted and d.reason == "provider-paused" and d.retry_after == pytest.approx(20, abs=0.1)
    assert all(s.provider_paused_until > s.now for s in store.status())
    store.resume(IP2, "ops")  # an IP resume does not lift the provider pause
    assert store.acquire(IP2).reason == "provider-paused"
    store.resume("provider", "ops")
    assert store.acquire().granted
    actions = [e.action for e in store.audit()]
    assert actions.count("admin:provider-pause") == 1 and actions.count("admin:provider-resume") == 1


# --------------------------------------------------------------------------- escalation
def test_level_only_goes_up_until_reset(make_store: Any) -> None:
    store = make_store(extra="time_scale: 0.0001")
    store.record(IP1, classify(TS02))
    assert store.ip_state(IP1).level == 2
    store.record(IP1, classify(TS01))  # level-1 reaction: never lowers
    apply(store, IP1, Action("escalate", level=1, reason="stale"))
    assert store.ip_state(IP1).level == 2
    before = store.ip_state(IP1)
    assert before.recent_pauses == 1  # the TS01 arrived during the TS02 cooldown: an extension
    assert store.reset_level(IP1, "alice") is True
    after = store.ip_state(IP1)
    assert after.level == 0 and after.recent_pauses == 0


def test_repeated_pauses_lengthen(make_store: Any) -> None:
    store = make_store(extra="time_scale: 0.00001")  # TSS04 pause 72 ms
    store.record(IP1, classify(TSS04))
    first = store.ip_state(IP1)
    time.sleep(max(0.0, first.cooldown_until - store.now()) + 0.002)
    store.record(IP1, classify(TSS04))
    second = store.ip_state(IP1)
    assert second.recent_pauses == 2
    pause = [e for e in store.audit() if e.action == "pause"][-1]
    assert float(pause.extra["seconds"]) == pytest.approx(0.144)  # 72 ms x repeat_factor 2
    assert second.cooldown_until == pytest.approx(pause.ts + 0.144, abs=2 * US)


def test_per_connection_only_lowers(make_store: Any) -> None:
    store = make_store()
    assert store.acquire(IP1).per_connection == 20
    store.record(IP1, classify(MAXCONN))
    assert store.acquire(IP2).per_connection == 20
    d = store.acquire(IP1)
    assert d.per_connection == 10
    apply(store, IP1, Action("per_connection", value=15))
    assert {s.ip: s for s in store.status()}[IP1].per_connection == 10


# --------------------------------------------------------------------------- ramp
def test_ramp_factor_stretches_the_gcra_interval(make_store: Any) -> None:
    """After a pause, slow(0.5, ramp R): interval = 100 ms / factor(t), factor 0.5 -> 1 over R."""
    store = make_store()
    apply(store, IP1, Action("pause", seconds=0.2, reason="TSS04"), Action("slow", factor=0.5, seconds=2.0))
    cu = store.ip_state(IP1).cooldown_until
    time.sleep(max(0.0, cu - store.now()) + 0.001)
    checked = 0
    while checked < 4:
        g = wait_granted(store, IP1)
        d = store.acquire(IP1)
        assert not d.granted and d.reason == "rate"
        factor = 0.5 + 0.5 * min(1.0, (g.now - cu) / 2.0)
        interval = round(100000 / factor) * US
        assert d.now + d.retry_after == pytest.approx(g.now + interval, abs=2 * US)
        checked += 1
    assert store.ip_state(IP1).rate_factor > 0.5
    time.sleep(2.0)
    assert store.ip_state(IP1).rate_factor == 1.0


def test_slow_never_raises_a_lower_factor(make_store: Any) -> None:
    store = make_store()
    apply(store, IP1, Action("slow", factor=0.25, seconds=100))
    apply(store, IP1, Action("slow", factor=0.5, seconds=100))
    assert store.ip_state(IP1).rate_factor == pytest.approx(0.25, abs=0.001)
    apply(store, IP1, Action("slow", factor=0.1, seconds=100))
    assert store.ip_state(IP1).rate_factor == pytest.approx(0.1, abs=0.001)


def test_pause_after_slow_delays_the_ramp(make_store: Any) -> None:
    store = make_store()
    apply(store, IP1, Action("slow", factor=0.5, seconds=0.5))
    apply(store, IP1, Action("pause", seconds=10, reason="TS01"))
    time.sleep(0.6)  # the ramp would be over by now, but it restarts when the pause ends
    assert store.ip_state(IP1).rate_factor == 0.5
    # a finished ramp is not revived by a later pause
    apply(store, IP2, Action("slow", factor=0.5, seconds=0.05))
    time.sleep(0.06)
    store.pause(IP2, 5, "x", "t")
    assert store.ip_state(IP2).rate_factor == 1.0


# --------------------------------------------------------------------------- warm-up
def test_warmup_daily_cap_doubles(make_store: Any) -> None:
    day = 0.4
    pool = f"pool:\n  - {{ip: {IP1}, cold: true}}\n  - {{ip: {IP2}}}\n"
    store = make_store(pool=pool, limits="concurrency: 100, messages_per_minute: 1000000",
                       extra="warmup: {initial_per_day: 3, double_every_days: 1}", time_scale=day / 86400)
    now = store.now()
    time.sleep((day - now % day) + 0.01)  # start right after a day boundary
    grants = [store.acquire(IP1) for _ in range(3)]
    assert all(g.granted for g in grants)
    d = store.acquire(IP1)
    assert not d.granted and d.reason == "warmup"
    boundary = (int(d.now / day) + 1) * day
    assert d.now + d.retry_after == pytest.approx(boundary, abs=1e-3)
    st = {s.ip: s for s in store.status()}
    assert (st[IP1].warmup_cap, st[IP1].warmup_used, st[IP2].warmup_cap) == (3, 3, None)
    assert store.acquire(IP2).granted  # warm IPs have no daily cap
    time.sleep(d.retry_after + 0.01)
    day2 = [store.acquire(IP1) for _ in range(7)]
    assert [g.granted for g in day2] == [True] * 6 + [False]


# --------------------------------------------------------------------------- pick
@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_pick_least_loaded_and_skips_blocked(make_store: Any, pick: str) -> None:
    store = make_store(limits="concurrency: 2, messages_per_minute: 60000000", pick=pick)
    leases = [store.acquire() for _ in range(3)]
    assert sorted(d.ip for d in leases) == [IP1, IP2, IP3]  # fewest leases first
    store.pause(IP1, 1000, "x", "t")  # longer than the lease TTL
    store.record(IP2, classify(TS03))
    more = store.acquire()
    assert more.granted and more.ip == IP3
    full = store.acquire()
    assert not full.granted and full.ip == IP3 and full.reason == "concurrency"
    assert full.retry_after == pytest.approx(store.config.limits.lease_ttl, abs=0.1)


@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_pick_prefers_earliest_tat_and_names_earliest_budget(make_store: Any, pick: str) -> None:
    store = make_store(pick=pick)
    order = []
    for _ in range(3):
        d = store.acquire()
        assert d.granted
        order.append(d.ip)
        store.release(d.lease)
    assert sorted(order) == [IP1, IP2, IP3]  # equal leases: the idlest TAT wins, so it rotates
    denied = store.acquire()
    assert not denied.granted and denied.reason == "rate" and denied.ip == order[0]
    store.pause(IP1, 3, "a", "t")
    store.pause(IP2, 1, "b", "t")
    store.pause(IP3, 2, "c", "t")
    d = store.acquire()
    assert not d.granted and d.ip == IP2 and d.reason == "cooldown:admin"
    assert d.retry_after == pytest.approx(1, abs=0.05)


def test_pick_all_held_and_empty_pool(make_store: Any) -> None:
    store = make_store()
    for ip in (IP1, IP2, IP3):
        store.record(ip, classify(TS03.replace(IP1, ip)))
    d = store.acquire()
    assert not d.granted and d.reason == "held:TS03"
    empty = make_store(pool="pool: []")
    d = empty.acquire()
    assert (d.granted, d.reason, d.ip) == (False, "no-ip", None)


# --------------------------------------------------------------------------- monitor mode
def test_monitor_mode_grants_and_says_what_would_deny(make_store: Any) -> None:
    store = make_store(limits="concurrency: 1, messages_per_minute: 600", mode="monitor")
    first = store.acquire(IP1)
    assert first.granted and not first.monitor and first.reason == "ok"
    second = store.acquire(IP1)
    assert second.granted and second.monitor and second.reason == "concurrency"
    assert {s.ip: s for s in store.status()}[IP1].leases == 2  # the real load is visible
    store.release(first.lease)
    store.release(second.lease)
    third = store.acquire(IP1)
    assert third.granted and third.monitor and third.reason == "rate"
    # the override did not move the TAT: the would-be slot is still first + 100 ms
    assert third.now + third.retry_after == pytest.approx(first.now + 0.1, abs=2 * US)
    store.record(IP1, classify(TSS04))
    st = store.ip_state(IP1)
    assert st.cooldown_until == 0 and st.deferrals == 1 and st.rate_factor == 1.0
    actions = [e.action for e in store.audit()]
    assert actions == ["count_deferral", "would:pause", "would:slow", "would:hold_queue"]
    store.pause(IP2, 10, "admin pauses are recorded", "ops")
    d = store.acquire(IP2)
    assert d.granted and d.monitor and d.reason == "cooldown:admin"


# --------------------------------------------------------------------------- resilience
def test_noscript_recovery_after_script_flush(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    assert store.acquire(IP1).granted
    redis_client.script_flush()
    d = store.acquire(IP2)
    assert d.granted
    redis_client.script_flush()
    assert store.release(d.lease)
    redis_client.script_flush()
    store.record(IP1, classify(TSS04))
    redis_client.script_flush()
    assert len(store.status()) == 3  # pipelined scripts reload too
    redis_client.script_flush()
    store.pause("provider", 5, "x", "t")


def test_dropped_connection_is_retried_once(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    assert store.acquire(IP1).granted
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    assert store.acquire(IP2).granted


def test_store_survives_a_redis_restart() -> None:
    with RedisProc() as rp:
        store = Store.connect(make_config(rp.url))
        first = store.acquire(IP1)
        assert first.granted
        rp.kill()
        with pytest.raises(redis.ConnectionError):
            store.acquire(IP1)
        rp.start()
        d = store.acquire(IP1)  # dead pooled connection replaced, scripts reloaded (NOSCRIPT)
        assert d.granted
        assert store.release(d.lease)
        assert store.release(first.lease) is False  # state was lost with the restart
        store.close()


def test_async_store_survives_a_redis_restart() -> None:
    async def run(rp: RedisProc) -> None:
        store = AsyncStore.connect(make_config(rp.url))
        assert (await store.acquire(IP1)).granted
        rp.kill()
        rp.start()
        d = await store.acquire(IP1)
        assert d.granted and await store.release(d.lease)
        await store.aclose()

    with RedisProc() as rp:
        asyncio.run(run(rp))


# --------------------------------------------------------------------------- audit
def test_audit_entries_for_automatic_and_admin_actions(make_store: Any) -> None:
    store = make_store()
    t0 = store.now()
    store.record(IP1, classify(TSS04), "a@yahoo.com", queue_id="4Zx9Q12abc", mta="postfix")
    store.pause(IP2, 60, "planned work", "alice")
    store.release_ip(IP1, "bob")
    entries = store.audit()
    assert [e.action for e in entries] == ["count_deferral", "pause", "slow", "hold_queue", "admin:pause",
                                           "admin:release-ip"]
    pause = entries[1]
    assert (pause.ip, pause.reason, pause.reply, pause.who, pause.queue_id) == (IP1, "TSS04", TSS04, "policy",
                                                                                  "4Zx9Q12abc")
    assert pause.extra["mta"] == "postfix" and pause.extra["domain"] == "yahoo.com"
    assert float(pause.extra["seconds"]) == 7200.0 and pause.ts >= t0
    admin = entries[4]
    assert (admin.ip, admin.who, admin.reason) == (IP2, "alice", "planned work")
    assert [e.action for e in store.audit(count=2)] == ["admin:pause", "admin:release-ip"]
    assert store.audit(since=store.now() + 10) == []
    assert len(store.audit(since=t0)) == 6


def test_audit_stream_is_capped(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    cfg = dataclasses.replace(store.config, redis=dataclasses.replace(store.config.redis, audit_maxlen=100))
    small = Store(store.client, cfg)
    for _ in range(300):
        small.pause(IP1, 1, "x", "t")
    assert redis_client.xlen(small.plans.keys.audit) < 300


def test_reply_text_is_cut_to_512_bytes() -> None:
    assert len(reply_text("é" * 600).encode()) <= 512
    assert reply_text("a\r\nb\x00c") == "a  b c"


# --------------------------------------------------------------------------- holds
def test_holds_registry(make_store: Any) -> None:
    store = make_store(extra="time_scale: 0.0001\nholds: {queue_lifetime: 5d, release_margin: 12h}")
    store.record(IP1, classify(TSS04))
    store.add_hold(Hold("4Zx9Q12abc", "postfix", IP1, reason="TSS04", domain="yahoo.com"))
    store.add_hold(Hold("1tXyZa-000Abc-0A", "exim", IP2, reason="TS01"))
    store.add_hold(Hold("OLD1", "postfix", IP3, since=store.now() - 40.0, reason="TS03"))
    store.record(IP3, classify(TS03.replace(IP1, IP3)))
    store.pause(IP2, 60, "x", "t")
    assert [h.queue_id for h in store.holds()] == ["OLD1", "4Zx9Q12abc", "1tXyZa-000Abc-0A"]
    assert [h.queue_id for h in store.holds(IP1)] == ["4Zx9Q12abc"]
    assert {s.ip: s.holds for s in store.status()} == {IP1: 1, IP2: 1, IP3: 1}
    # IP1 cooling, IP2 paused, IP3 held but OLD1 is past lifetime - margin (43.2 s - 4.32 s)
    due = store.holds_due()
    assert [(h.queue_id, h.due) for h in due] == [("OLD1", "deadline")]
    time.sleep(0.75)  # IP1's 0.72 s cooldown ends
    due = {h.queue_id: h.due for h in store.holds_due()}
    assert due == {"OLD1": "deadline", "4Zx9Q12abc": "cooldown-over"}
    store.add_hold(Hold("4Zx9Q12abc", "postfix", IP2))  # moved to another IP
    assert [h.ip for h in store.holds() if h.queue_id == "4Zx9Q12abc"] == [IP2]
    assert store.remove_hold("4Zx9Q12abc", "postfix") is True
    assert store.remove_hold("4Zx9Q12abc", "postfix") is False
    assert {s.ip: s.holds for s in store.status()} == {IP1: 0, IP2: 1, IP3: 1}


# --------------------------------------------------------------------------- status
def test_status_reports_each_pool_ip(make_store: Any) -> None:
    store = make_store(limits="concurrency: 5, messages_per_minute: 600")
    d = store.acquire(IP1)
    store.acquire(IP1)  # rate denial
    store.record(IP2, classify(TS02.replace(IP1, IP2)))
    st = {s.ip: s for s in store.status()}
    one = st[IP1]
    assert (one.leases, one.concurrency, one.rate_now, one.rate_allowed) == (1, 5, 1, 600.0)
    assert one.last_limit == "rate" and one.budget_at == pytest.approx(d.now + 0.1, abs=2 * US)
    two = st[IP2]
    assert two.level == 2 and two.cooling and two.deferrals == 1 and two.rate_factor == 0.25
    assert two.rate_allowed == 150.0 and two.recent_pauses == 1
    assert [s.name for s in store.status()] == ["yahoo-ip1", "yahoo-ip2", "yahoo-ip3"]


# --------------------------------------------------------------------------- time, urls
def test_times_come_from_redis(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    sec, usec = redis_client.time()
    d = store.acquire(IP1)
    assert 0 <= d.now - (sec + usec / 1e6) < 0.5
    assert abs(store.now() - d.now) < 0.5


def test_connect_urls(redis_proc: RedisProc) -> None:
    for url in (redis_proc.url, redis_proc.tcp_url, "redis+unix://" + str(redis_proc.unixsocket)):
        with Store.connect(make_config(url)) as store:
            assert store.acquire(IP1).reason in ("ok", "rate")
    # Sentinel and Cluster: tests/test_store_ha.py; an unknown scheme is refused without the password
    cfg = load_config_text("redis: {sentinel: {master: m, nodes: ['127.0.0.1:26379']}}")
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, sentinel=None, url="memcached://u:pw@x"))
    with pytest.raises(ValueError, match="unsupported") as err:
        Store.connect(cfg)
    assert "pw" not in str(err.value)


def test_works_with_a_client_that_does_not_decode(redis_url: str) -> None:
    """Store(client, config) accepts any redis.Redis, bytes replies included."""
    client = redis.Redis.from_url(redis_url)  # decode_responses=False
    store = Store(client, make_config(redis_url, extra="time_scale: 0.0001"))
    store.record(IP1, classify(TSS04), queue_id="Q1", mta="exim")
    assert store.acquire(IP1).reason == "cooldown:TSS04"
    store.add_hold(Hold("Q1", "exim", IP1, reason="TSS04"))
    assert store.holds()[0].reason == "TSS04"
    assert {s.ip: s.cooldown_reason for s in store.status()}[IP1] == "TSS04"
    assert store.audit()[0].action == "count_deferral"
    client.close()


def test_ipv6_is_normalised(make_store: Any) -> None:
    store = make_store(pool="pool:\n  - {ip: '2001:db8::10'}\n")
    d = store.acquire("2001:DB8:0:0::10")
    assert d.granted and d.ip == "2001:db8::10" and d.lease.startswith("2001:db8::10|")
    assert store.plans.keys.ip("2001:db8::10").leases == "gov:{2001:db8::10}:leases"
    assert store.release(d.lease)


def test_key_prefix_is_configurable(redis_url: str, redis_client: redis.Redis) -> None:
    cfg = make_config(redis_url)
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, prefix="gt1"))
    with Store.connect(cfg) as store:
        store.acquire(IP1)
    assert sorted(redis_client.keys("*")) == [b"gt1:{192.0.2.10}:leases", b"gt1:{192.0.2.10}:state"]
    with pytest.raises(ValueError):
        KeyScheme("gov}{x")


# --------------------------------------------------------------------------- async parity
def test_async_store_same_surface(redis_url: str) -> None:
    async def run() -> None:
        store = AsyncStore.connect(make_config(redis_url, extra="time_scale: 0.0001"))
        d = await store.acquire()
        assert d.granted
        assert (await store.acquire(d.ip)).reason == "rate"
        assert await store.release(d.lease) and not await store.release(d.lease)
        actions = await store.record(IP1, classify(TSS04), "x@yahoo.com", queue_id="Q1", mta="postfix")
        assert "pause" in [a.kind for a in actions]
        assert (await store.ip_state(IP1)).recent_pauses == 1
        await store.pause("provider", 5, "x", "ops")
        assert (await store.acquire(IP2)).reason == "provider-paused"
        await store.resume("provider", "ops")
        await store.add_hold(Hold("Q1", "postfix", IP1))
        assert [h.queue_id for h in await store.holds()] == ["Q1"]
        assert await store.holds_due() == []
        assert await store.remove_hold("Q1", "postfix")
        assert await store.reset_level(IP1, "ops") is True
        assert not await store.release_ip(IP1, "ops")
        assert len(await store.status()) == 3
        assert [e.action for e in await store.audit()][-3:] == ["admin:provider-resume", "admin:reset-level",
                                                                 "admin:release-ip"]  # no-ops are audited too
        assert abs(await store.now() - d.now) < 5
        await store.aclose()

    asyncio.run(run())


# --------------------------------------------------------------------------- hostile input
HOSTILE = ["{", "}", "*", " ", "192.0.2.10 ", "192.0.2.10}", "{192.0.2.10}", "192.0.2.10\r\n", "\r\n",
           "192.0.2.10\x00", "\x00", "x" * 10240, "", "fe80::1%eth0", "fe80::1%{x}", "192.0.2.256", "*:*"]


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda v: repr(v)[:20])
def test_hostile_input_is_refused_before_any_key(make_store: Any, redis_client: redis.Redis, bad: str) -> None:
    store = make_store()
    ev = classify(TSS04)
    attempts = [
        lambda: store.acquire(bad),
        lambda: store.release(bad),
        lambda: store.release(f"{bad}|0123456789abcdef"),
        lambda: store.release(f"{IP1}|{bad}"),
        lambda: store.record(bad, ev),
        lambda: store.record(IP1, ev, queue_id=bad),
        lambda: store.record(IP1, ev, mta=bad),
        lambda: store.record(IP1, ev, domain=bad or "-"),  # "" means "no domain"
        lambda: store.ip_state(bad),
        lambda: store.pause(bad, 10, "r", "w"),
        lambda: store.resume(bad, "w"),
        lambda: store.release_ip(bad, "w"),
        lambda: store.reset_level(bad, "w"),
        lambda: store.add_hold(Hold(bad, "postfix", IP1)),
        lambda: store.add_hold(Hold("Q1", bad, IP1)),
        lambda: store.add_hold(Hold("Q1", "postfix", bad)),
        lambda: store.remove_hold(bad, "postfix"),
        lambda: store.holds(bad),
        lambda: store.acquire(IP1, provider=bad),
    ]
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{0,48}", bad):  # "" = no holder; "192.0.2.256" is a fine label
        attempts.append(lambda: store.acquire(IP1, holder=bad))
    if any(c in bad for c in "\r\n\x00") or len(bad) > 200:  # free text: one printable line, bounded
        attempts += [lambda: store.pause(IP1, 10, bad, "w"), lambda: store.resume(IP1, bad)]
    for i, attempt in enumerate(attempts):
        with pytest.raises(ValueError):
            attempt()
            print("attempt", i, "did not raise")  # pragma: no cover - shows which one
    assert redis_client.dbsize() == 0


def test_bad_numbers_are_refused(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    for seconds in (0, -1, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError):
            store.pause(IP1, seconds, "r", "w")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.audit(count=0)
    with pytest.raises(ValueError):
        apply(store, IP1, Action("slow", factor=float("nan"), seconds=1))
    assert redis_client.dbsize() == 0
