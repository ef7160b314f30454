"""Store.assign for Postfix: equal shares over the offered slots, cooling/held IPs offer
none, the ramp shrinks an IP's share, denials name the first cooldown to end, and the
recipient -> IP record (trimmed, capped) the queue agent reads back."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from governor.config import Config, Limits, load_config_text
from governor.policy import Action
from governor.store import AsyncStore, Store
from governor.store import plans as store_plans
from governor.transports import active_slots, slot_plan

IPS = ("192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13")
POOL = "pool:\n" + "".join(f"  - {{ip: {ip}, name: yahoo-ip{i + 1}}}\n" for i, ip in enumerate(IPS))


def make_config(url: str, pool: str = POOL, extra: str = "", **changes: Any) -> Config:
    text = f"{pool}\nlimits:\n  per_ip: {{concurrency: 5, messages_per_minute: 300}}\n{extra}"
    cfg = load_config_text(text, "assign.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url), **changes)


@pytest.fixture
def make_store(redis_url: str) -> Iterator[Any]:
    stores: list[Store] = []

    def make(pick: str = "script", **kwargs: Any) -> Store:
        store = Store.connect(make_config(redis_url, **kwargs), pick=pick)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def apply(store: Store, ip: str, *actions: Action) -> None:
    store._execute([store.plans.apply_call(ip, list(actions), "")])


def shares(store: Store, n: int) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((a.ip, a.slot) for a in (store.assign(f"r{i}@yahoo.com") for i in range(n)))


# --------------------------------------------------------------------------- spreading
@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_every_offered_slot_gets_an_equal_share(make_store: Any, pick: str) -> None:
    """4 IPs x 5 slots (300/min, concurrency 5 -> 5 slots x 1 s): 20 x 7 assignments give
    every (IP, slot) exactly 7, and consecutive recipients alternate between IPs."""
    store = make_store(pick)
    assert slot_plan(5, 300).slots == 5
    first = [store.assign(f"a{i}@yahoo.com") for i in range(8)]
    assert len({a.ip for a in first[:4]}) == 4 and len({a.ip for a in first[4:]}) == 4
    got = shares(store, 20 * 7 - 8) + collections.Counter((a.ip, a.slot) for a in first)
    assert set(got) == {(ip, s) for ip in IPS for s in range(1, 6)}
    assert set(got.values()) == {7}
    a = store.assign("x@yahoo.com")
    assert a.granted and a.reason == "ok" and a.offered == 20
    assert a.transport == f"yahoo-ip{IPS.index(a.ip) + 1}-s{a.slot}"


def test_postfix_headroom_offers_the_slots_of_the_lower_plan(make_store: Any) -> None:
    """300/min with 3 % headroom plans 4 slots x 1 s: assign hands out slots 1-4 only."""
    store = make_store(limits=Limits(concurrency=5, messages_per_minute=300, postfix_headroom=0.03))
    got = shares(store, 32)
    assert {slot for _, slot in got} == {1, 2, 3, 4} and set(got.values()) == {2}


@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_cooling_and_held_ips_get_nothing(make_store: Any, pick: str) -> None:
    store = make_store(pick)
    store.pause(IPS[0], 600, "maintenance", "ops")
    apply(store, IPS[1], Action("hold_ip", reason="TS03"))
    got = shares(store, 30)
    assert {ip for ip, _ in got} == {IPS[2], IPS[3]}
    assert set(got.values()) == {3}  # 10 offered slots, 30 assignments
    store.resume(IPS[0], "ops")
    assert {ip for ip, _ in shares(store, 15)} == {IPS[0], IPS[2], IPS[3]}


@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_ramp_factor_half_offers_two_of_five_slots(make_store: Any, pick: str) -> None:
    store = make_store(pick)
    apply(store, IPS[0], Action("slow", factor=0.5, seconds=3600, reason="TSS04"))
    assert active_slots(slot_plan(5, 300), 0.5) == 2
    got = shares(store, 17 * 4)
    assert sorted(s for ip, s in got if ip == IPS[0]) == [1, 2]
    assert set(got.values()) == {4} and len(got) == 17
    assert store.assign("y@yahoo.com").offered == 17


@pytest.mark.parametrize("pick", ["script", "sequential"])
def test_all_cooling_is_a_denial_naming_the_first_cooldown_to_end(make_store: Any, redis_client: redis.Redis,
                                                                  pick: str) -> None:
    store = make_store(pick)
    apply(store, IPS[0], Action("pause", seconds=300, reason="TSS04"))
    apply(store, IPS[1], Action("pause", seconds=100, reason="TSS04"))
    apply(store, IPS[2], Action("hold_ip", reason="TS03"))
    store.pause(IPS[3], 200, "x", "ops")
    before = redis_client.dbsize()
    a = store.assign("z@yahoo.com")
    assert not a.granted and a.transport is None and a.offered == 0
    assert (a.reason, a.ip) == ("cooldown:TSS04", IPS[1])
    assert 99 < a.retry_after <= 100
    assert redis_client.dbsize() == before  # a denial records nothing and counts nothing
    for ip in (IPS[0], IPS[1], IPS[3]):
        apply(store, ip, Action("hold_ip", reason="TS03"))
    held = store.assign("z@yahoo.com")
    assert (held.granted, held.reason, held.ip, held.retry_after) == (False, "held:TS03", None, 86400.0)


def test_provider_pause_denies_with_its_own_reason(make_store: Any) -> None:
    store = make_store()
    store.pause("provider", 60, "incident", "ops")
    a = store.assign("p@yahoo.com")
    assert (a.granted, a.reason) == (False, "provider-paused") and 59 < a.retry_after <= 60


def test_probe_counts_and_records_nothing(make_store: Any, redis_client: redis.Redis) -> None:
    store = make_store()
    p = store.assign("p@yahoo.com", probe=True)
    assert p.granted and p.ip is None and p.transport is None and p.offered == 20
    assert redis_client.dbsize() == 0
    store.pause("provider", 60, "incident", "ops")
    assert store.assign(probe=True).reason == "provider-paused"


def test_monitor_mode_assigns_anyway_and_says_why_it_would_not(make_store: Any) -> None:
    store = make_store(mode="monitor")
    for ip in IPS:
        store.pause(ip, 60, "x", "ops")
    a = store.assign("m@yahoo.com")
    assert a.granted and a.monitor and a.reason == "cooldown:admin" and a.transport


def test_empty_pool_is_no_ip(make_store: Any) -> None:
    a = make_store(pool="pool: []").assign("n@yahoo.com")
    assert (a.granted, a.reason, a.ip) == (False, "no-ip", None)


# --------------------------------------------------------------------------- the record
def test_recipient_recorded_and_found_again(make_store: Any) -> None:
    store = make_store()
    a = store.assign("User+Tag@Yahoo.COM")
    assert list(store.assignments(a.ip)) == ["User+Tag@Yahoo.COM"]  # kept exactly as Postfix asked
    assert abs(store.assignments(a.ip)["User+Tag@Yahoo.COM"] - a.now) < 1e-3
    b = store.assign("User+Tag@Yahoo.COM")  # asked again (retry after 30 s): the latest wins
    assert b.ip != a.ip
    assert store.assigned_ip(["User+Tag@Yahoo.COM", "never@yahoo.com"]) == {"User+Tag@Yahoo.COM": b.ip}
    assert store.assigned_ip([]) == {}
    none = store.assign(None)
    assert none.granted and all("@" in r for ip in IPS for r in store.assignments(ip))


def test_record_is_trimmed_to_the_queue_lifetime_and_capped(redis_url: str, redis_client: redis.Redis,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_plans, "ASSIGNED_MAX", 3)
    one = "pool:\n  - {ip: 192.0.2.10, name: yahoo-ip1}\n"
    extra = "holds: {queue_lifetime: 1s, release_margin: 500ms}\n"
    with Store.connect(make_config(redis_url, pool=one, extra=extra)) as store:
        store.assign("old@yahoo.com")
        time.sleep(1.1)
        for i in range(5):
            store.assign(f"new{i}@yahoo.com")
        assert set(store.assignments(IPS[0])) == {"new2@yahoo.com", "new3@yahoo.com", "new4@yahoo.com"}
        assert redis_client.zcard("gov:{192.0.2.10}:assigned") == 3
        assert 0 < redis_client.pttl("gov:{192.0.2.10}:assigned") <= 1000


HOSTILE = ["", "nobody", "a b@yahoo.com", "a@yahoo.com ", "a@yahoo.com\r\n", "a\x00@yahoo.com", "{a}@yahoo.com",
           "a@{yahoo.com}", "@yahoo.com", "a@", "x" * 250 + "@yahoo.com", "a\tb@yahoo.com", 42]


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda v: repr(v)[:20])
def test_hostile_recipients_are_refused_before_any_key(make_store: Any, redis_client: redis.Redis, bad: Any) -> None:
    store = make_store()
    with pytest.raises(ValueError):
        store.assign(bad)
    with pytest.raises(ValueError):
        store.assigned_ip(["ok@yahoo.com", bad])
    assert redis_client.dbsize() == 0


def test_async_twin(redis_url: str) -> None:
    async def run() -> None:
        for pipelined in (True, False):
            store = AsyncStore.connect(make_config(redis_url), pipelined=pipelined)
            got = collections.Counter()
            for a in await asyncio.gather(*(store.assign(f"q{i}@yahoo.com") for i in range(40))):
                got[(a.ip, a.slot)] += 1
            assert set(got.values()) == {2} and len(got) == 20
            assert (await store.assigned_ip(["q0@yahoo.com"]))["q0@yahoo.com"] in IPS
            assert "q0@yahoo.com" in await store.assignments((await store.assigned_ip(["q0@yahoo.com"]))["q0@yahoo.com"])
            assert (await store.assign(probe=True)).granted
            await store.aclose()

    asyncio.run(run())
