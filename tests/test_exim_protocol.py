"""The Exim line protocol against a real daemon and a real redis-server: every request
kind, pacing by waiting for a rate slot, releases by (message id, recipient), bounded
and hostile input (ERR, nothing written to Redis), fail-open/closed with Redis killed,
and recovery without a restart."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governor.adapters.exim_socket import LeaseBook, Refused, parse
from governor.config import Config, load_config_text
from governor.daemon import ThreadedDaemon
from governor.lab import readsocket
from governor.policy import Action
from governor.redisproc import RedisProc
from governor.store import Store

IP1, IP2, IP3 = "192.0.2.10", "192.0.2.11", "192.0.2.12"
POOL = f"""
pool:
  - {{ip: {IP1}, name: yahoo-ip1}}
  - {{ip: {IP2}, name: yahoo-ip2}}
  - {{ip: {IP3}, name: yahoo-ip3}}
"""
HIGH = "limits: {per_ip: {concurrency: 1000, messages_per_minute: 1000000}}\n"
MSGID = "1xVXpg-0002Es-1T"
TSS04 = ("SMTP error from remote mail server after pipelined MAIL FROM:<a@example.org> SIZE=1470: "
         "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user "
         "complaints - 4.16.56; see https://postmaster.yahooinc.com/error-codes")
GRANTED = re.compile(r"OK governed=yes ip=(?P<ip>[0-9.]+) transport=(?P<t>yahoo_ip[123]) "
                     r"lease=(?P<lease>(?P=ip)\|[0-9a-f]{16}) per_connection=20")


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="gx-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(url: str, sockdir: str, text: str = POOL + HIGH, **changes: Any) -> Config:
    text += (f"\nsockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock}}\n"
             "domains: {dns: false}\n")
    cfg = load_config_text(text, "exim-test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url), **changes)


ask = readsocket


@pytest.fixture
def serve(redis_url: str, sockdir: str) -> Iterator[Any]:
    """serve(**config changes) -> the Exim socket path of a running daemon."""
    running: list[ThreadedDaemon] = []

    def start(text: str = POOL + HIGH, **changes: Any) -> str:
        d = ThreadedDaemon(make_config(redis_url, sockdir, text, **changes)).__enter__()
        running.append(d)
        return f"{sockdir}/exim.sock"

    yield start
    for d in running:
        d.stop()


@pytest.fixture
def store(redis_url: str, sockdir: str) -> Iterator[Store]:
    s = Store.connect(make_config(redis_url, sockdir))
    yield s
    s.close()


# --------------------------------------------------------------------------- acquire
def test_acquire_governed_not_governed_and_explicit_ip(serve: Any) -> None:
    path = serve()
    m = GRANTED.fullmatch(ask(path, f"acquire yahoo.com auto {MSGID} u@yahoo.com"))
    assert m, "granted reply"
    assert m["t"] == f"yahoo_ip{[IP1, IP2, IP3].index(m['ip']) + 1}"
    assert ask(path, "acquire gmail.com auto - -") == "OK governed=no"
    assert ask(path, "acquire ATT.net. auto - -") in ("OK governed=no", "OK governed=yes")  # MX decides; no DNS
    m = GRANTED.fullmatch(ask(path, f"acquire aol.com {IP2} - -"))
    assert m and m["ip"] == IP2
    assert ask(path, "acquire yahoo.com 192.0.2.99 - -") == "ERR ip 192.0.2.99 is not an enabled pool IP"


def test_denials_name_the_reason_and_whole_seconds(serve: Any, store: Store) -> None:
    path = serve()
    for ip in (IP1, IP2, IP3):
        store._execute([store.plans.apply_call(ip, [Action("pause", seconds=90.5, reason="TSS04")], "")])
    assert ask(path, "acquire yahoo.com auto - -") == "DEFER retry=91 reason=cooldown:TSS04"
    store._execute([store.plans.apply_call(IP2, [Action("hold_ip", reason="TS03")], "")])
    assert ask(path, f"acquire yahoo.com {IP2} - -") == "DEFER retry=86400 reason=held:TS03"
    store.resume(IP1, "ops")
    store.pause("provider", 30, "incident", "ops")
    assert ask(path, f"acquire yahoo.com {IP1} - -") == "DEFER retry=30 reason=provider-paused"


def test_rate_denial_beyond_the_wait_budget_defers(serve: Any) -> None:
    one = f"pool:\n  - {{ip: {IP1}, name: yahoo-ip1}}\nlimits: {{per_ip: {{messages_per_minute: 1}}}}\n"
    path = serve(one)
    assert GRANTED.fullmatch(ask(path, "acquire yahoo.com auto - -"))
    t0 = time.monotonic()
    assert ask(path, "acquire yahoo.com auto - -") == "DEFER retry=60 reason=rate"
    assert time.monotonic() - t0 < 0.5  # 60 s is beyond exim.wait: no waiting


def test_wait_for_a_slot_paces_successive_acquires(serve: Any) -> None:
    """600/min, burst 0: a queue runner's successive acquires are answered ~100 ms apart
    (the daemon waits for the slot instead of deferring)."""
    one = f"pool:\n  - {{ip: {IP1}, name: yahoo-ip1}}\nlimits: {{per_ip: {{concurrency: 50, messages_per_minute: 600}}}}\n"
    path = serve(one)
    times = []
    for _ in range(8):
        assert GRANTED.fullmatch(ask(path, "acquire yahoo.com auto - -"))
        times.append(time.monotonic())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.085 < g < 0.2 for g in gaps), gaps
    # several runners at once: all granted, spread 100 ms apart by the shared GCRA
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        def timed(_: int) -> tuple[str, float]:
            reply = ask(path, "acquire yahoo.com auto - -")
            return reply, time.monotonic()

        results = list(pool.map(timed, range(6)))
    assert all(GRANTED.fullmatch(r) for r, _ in results)
    done = sorted(t for _, t in results)
    assert done[-1] - done[0] > 0.4 and all(b - a > 0.05 for a, b in zip(done, done[1:]))


# --------------------------------------------------------------------------- release / report
def test_release_by_lease(serve: Any) -> None:
    path = serve()
    lease = GRANTED.fullmatch(ask(path, "acquire yahoo.com auto - -"))["lease"]
    assert ask(path, f"release {lease}") == "OK released=yes"
    assert ask(path, f"release {lease}") == "OK released=no"
    assert ask(path, "release 192.0.2.10|nothex").startswith("ERR bad lease")


def test_report_releases_the_lease_by_message_id_and_recipient(serve: Any, redis_client: redis.Redis) -> None:
    """Exim's $address_data is stale in msg:delivery: the daemon remembers the lease."""
    path = serve()
    m = GRANTED.fullmatch(ask(path, f"acquire yahoo.com auto {MSGID} u1@yahoo.com"))
    leases_key = f"gov:{{{m['ip']}}}:leases"
    assert redis_client.zcard(leases_key) == 1
    assert ask(path, f"report - yahoo.com msg:delivery {MSGID} u1@yahoo.com 250 OK id=1") == "OK code=- actions=-"
    assert redis_client.zcard(leases_key) == 0
    assert ask(path, f"release {m['lease']}") == "OK released=no"
    # success events may carry no text at all
    m = GRANTED.fullmatch(ask(path, f"acquire yahoo.com auto {MSGID} u2@yahoo.com"))
    assert ask(path, f"report - yahoo.com msg:delivery {MSGID} u2@yahoo.com") == "OK code=- actions=-"
    assert ask(path, f"release {m['lease']}") == "OK released=no"


def test_report_of_tss04_cools_the_ip_and_releases_the_batch(serve: Any, redis_client: redis.Redis) -> None:
    path = serve(POOL.replace(f"  - {{ip: {IP2}, name: yahoo-ip2}}\n  - {{ip: {IP3}, name: yahoo-ip3}}\n", "") + HIGH)
    leases = [GRANTED.fullmatch(ask(path, f"acquire yahoo.com auto {MSGID} r{i}@yahoo.com"))["lease"]
              for i in range(3)]
    assert redis_client.zcard(f"gov:{{{IP1}}}:leases") == 3
    # msg:defer names only the first recipient of the batch, and carries the IP
    reply = ask(path, f"report {IP1} yahoo.com msg:defer {MSGID} r0@yahoo.com {TSS04}")
    assert reply.startswith("OK code=TSS04 actions=") and "pause" in reply.split("actions=")[1].split(",")
    assert redis_client.zcard(f"gov:{{{IP1}}}:leases") == 0
    assert all(ask(path, f"release {lease}") == "OK released=no" for lease in leases)
    assert re.fullmatch(r"DEFER retry=\d+ reason=cooldown:TSS04", ask(path, "acquire yahoo.com auto - -"))
    assert ask(path, "held yahoo.com") == "OK held=yes"


def test_report_by_lease_and_for_other_domains(serve: Any, redis_client: redis.Redis) -> None:
    path = serve()
    lease = GRANTED.fullmatch(ask(path, f"acquire yahoo.com {IP3} - -"))["lease"]
    # a Yahoo code on a non-Yahoo domain (misrouted) is classified but changes nothing
    assert ask(path, f"report {lease} gmail.com msg:defer - - {TSS04}") == "OK code=TSS04 actions=-"
    assert ask(path, f"release {lease}") == "OK released=no"
    assert not redis_client.exists(f"gov:{{{IP3}}}:defer")
    # connection events don't end the delivery attempt: nothing released
    lease = GRANTED.fullmatch(ask(path, f"acquire yahoo.com {IP3} - -"))["lease"]
    assert ask(path, f"report {lease} - tcp:connect - -") == "OK code=- actions=-"
    assert ask(path, f"release {lease}") == "OK released=yes"
    # an IP outside the pool is never recorded
    assert ask(path, f"report 203.0.113.9 yahoo.com msg:defer - - {TSS04}") == "OK code=TSS04 actions=-"
    assert not redis_client.exists("gov:{203.0.113.9}:state")


def test_held(serve: Any, store: Store) -> None:
    path = serve()
    assert ask(path, "held yahoo.com") == "OK held=no"
    for ip in (IP1, IP2):
        store.pause(ip, 60, "x", "ops")
    store._execute([store.plans.apply_call(IP3, [Action("hold_ip", reason="TS03")], "")])
    assert ask(path, "held yahoo.com") == "OK held=yes"
    assert ask(path, "held gmail.com") == "OK held=no"
    store.resume(IP1, "ops")
    assert ask(path, "held ymail.com") == "OK held=no"


def test_monitor_mode_grants_and_never_holds(serve: Any, store: Store) -> None:
    path = serve(mode="monitor")
    for ip in (IP1, IP2, IP3):
        store.pause(ip, 60, "x", "ops")
    reply = ask(path, "acquire yahoo.com auto - -")
    assert reply.startswith("OK governed=yes") and reply.endswith(" monitor=cooldown:admin")
    assert ask(path, "held yahoo.com") == "OK held=no"


# --------------------------------------------------------------------------- bad input
BAD = [
    b"", b"acquire", b"acquire yahoo.com", b"acquire yahoo.com auto -", b"acquire yahoo.com auto - - -",
    b"acquire  yahoo.com auto - -", b"acquire yahoo.com auto - - ", b"ACQUIRE yahoo.com auto - -",
    b"acquire { auto - -", b"acquire } auto - -", b"acquire * auto - -", b"acquire yahoo.com{ auto - -",
    b"acquire yahoo..com auto - -", b"acquire -yahoo.com auto - -", b"acquire " + b"a" * 64 + b".com auto - -",
    b"acquire " + b"a." * 130 + b"com auto - -", b"acquire yahoo.com 192.0.2.256 - -", b"acquire yahoo.com * - -",
    b"acquire yahoo.com fe80::1%eth0 - -", b"acquire yahoo.com auto 1xVXpg-0002Es - -",
    b"acquire yahoo.com auto 1xVXpg-0002Es-1T{ - -", b"acquire yahoo.com auto - u@{yahoo.com}",
    b"acquire yahoo.com auto - nobody", b"acquire yahoo.com auto - " + b"x" * 250 + b"@yahoo.com",
    b"acquire yahoo.com\r auto - -", b"acquire yahoo.com auto - -\r", b"acquire yahoo.com\x00 auto - -",
    b"acquire yahoo.com\tauto - -", b"acquire yah\xffoo.com auto - -", b"\xff\xfe", b"x" * 10240,
    b"release", b"release 192.0.2.10", b"release 192.0.2.10|0123456789abcdef{", b"release {192.0.2.10}|0123456789abcdef",
    b"release 192.0.2.010|0123456789abcdef", b"held", b"held *", b"held yahoo.com extra",
    b"report", b"report - yahoo.com msg:delivery -", b"report - yahoo.com MSG:defer - -",
    b"report - yahoo.com msg:" + b"d" * 40 + b" - -", b"report 1.2.3 yahoo.com msg:defer - -",
    b"report - yahoo.com msg:defer - - 421 \x00", b"report - {} msg:defer - -", b"quit", b"*", b"{", b"}",
]


@pytest.mark.parametrize("line", BAD, ids=lambda b: repr(b)[:30])
def test_bad_requests_are_err_and_change_nothing(line: bytes) -> None:
    with pytest.raises(Refused):
        parse(line)


def test_bad_requests_over_the_socket(serve: Any, redis_client: redis.Redis) -> None:
    path = serve()
    for line in BAD:
        reply = ask(path, line)
        assert reply.startswith("ERR ") and "\n" not in reply and "Traceback" not in reply, (line, reply)
    assert ask(path, b"acquire yahoo.com\n auto - -").startswith("ERR usage: acquire")  # LF ends the line
    assert redis_client.dbsize() == 0
    assert ask(path, b"acquire yahoo.com auto - -", newline=False).startswith("OK governed=yes")  # EOF ends a line
    assert redis_client.dbsize() == 2  # the good one wrote the IP's leases and state


def test_oversized_line(serve: Any, redis_client: redis.Redis) -> None:
    path = serve()
    assert ask(path, b"held " + b"a" * 2044) == "ERR line too long (at most 2048 bytes)"
    text = "4" * (2048 - len("report - yahoo.com msg:defer - - "))
    assert ask(path, f"report - yahoo.com msg:defer - - {text}") == "OK code=- actions=-"  # exactly 2048: fine
    assert ask(path, b"x" * 100_000, newline=False) == "ERR line too long (at most 2048 bytes)"
    assert redis_client.dbsize() == 0


def test_slow_and_silent_clients_time_out(serve: Any) -> None:
    """5 s read timeout: a client that sends nothing, or half a line, gets ERR and is closed."""
    path = serve()

    def stall(first: bytes) -> tuple[str, float]:
        t0 = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(15)
            s.connect(path)
            s.sendall(first)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
        return out.decode(), time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        silent, partial = pool.map(stall, [b"", b"acquire yah"])
        assert ask(path, "held gmail.com") == "OK held=no"  # others are served meanwhile
    for reply, took in (silent, partial):
        assert reply.startswith("ERR read timeout") and 4.9 < took < 7


def test_two_hundred_clients_at_once(serve: Any) -> None:
    path = serve()
    lines = [f"acquire yahoo.com auto {MSGID} u{i}@yahoo.com" if i % 2 else "held aol.com" for i in range(200)]
    socks = []
    for line in lines:  # all connected and written before the first answer is read
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        socks.append(s)
    replies = []
    for s in socks:
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        s.close()
        replies.append(out.decode())
    assert sum(bool(GRANTED.fullmatch(r)) for r in replies) == 100
    assert replies.count("OK held=no") == 100


# --------------------------------------------------------------------------- fuzzing
TOKENS = [b"acquire", b"release", b"report", b"held", b"yahoo.com", b"aol.com", b"gmail.com", b"auto", b"-",
          IP1.encode(), b"2001:db8::1", MSGID.encode(), b"u@yahoo.com", b"msg:defer", b"msg:delivery", b"tcp:connect",
          b"421", b"4.7.0", b"[TSS04]", b"250", b"{", b"}", b"*", b"\x00", b"\r", b"\xff", b"", b"%",
          IP1.encode() + b"|0123456789abcdef", b"x" * 3000]
LINES = st.one_of(
    st.lists(st.sampled_from(TOKENS) | st.binary(max_size=12), max_size=9).map(b" ".join),
    st.binary(max_size=300),
)


def _fuzz(path: str, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(LINES, st.booleans())
    def check(line: bytes, newline: bool) -> None:
        reply = ask(path, line, newline=newline)
        assert re.match(r"(OK|DEFER|ERR) ", reply) and "\n" not in reply, (line, reply)

    check()


def test_generated_requests_get_only_ok_defer_or_err(serve: Any) -> None:
    _fuzz(serve(), 1000)


@pytest.mark.slow
def test_generated_requests_ten_thousand(serve: Any) -> None:
    """10^4 generated lines (about 10-20 s)."""
    _fuzz(serve(), 10_000)


# --------------------------------------------------------------------------- Redis down
@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_down_then_back_without_restart(sockdir: str, mode: str) -> None:
    with RedisProc() as rp:
        cfg = make_config(rp.url, sockdir, redis_down=mode)
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, socket_timeout=0.3, connect_timeout=0.3))
        with ThreadedDaemon(cfg):
            path = f"{sockdir}/exim.sock"
            lease = GRANTED.fullmatch(ask(path, f"acquire yahoo.com auto {MSGID} a@yahoo.com"))["lease"]
            rp.kill()
            down = [ask(path, "acquire yahoo.com auto - -") for _ in range(3)]
            if mode == "fail-open":
                ips = [re.fullmatch(r"OK governed=yes ip=([0-9.]+) transport=yahoo_ip[123] lease=- "
                                    r"per_connection=20 failopen=yes", r)[1] for r in down]
                assert sorted(ips) == [IP1, IP2, IP3]  # round robin over the pool
            else:
                assert down == ["DEFER retry=60 reason=governor-unavailable"] * 3
            assert ask(path, "held yahoo.com") == "OK held=no"  # the fail mode is acquire's to apply
            assert ask(path, "acquire gmail.com auto - -") == "OK governed=no"  # needs no Redis
            assert ask(path, f"release {lease}") == "OK released=no lost=yes"
            assert ask(path, f"report {IP1} yahoo.com msg:defer - - {TSS04}") == "OK code=TSS04 actions=- lost=yes"
            rp.start()
            assert GRANTED.fullmatch(ask(path, "acquire yahoo.com auto - -"))
            assert ask(path, f"report {IP1} yahoo.com msg:defer - - {TSS04}").startswith("OK code=TSS04 actions=count")


# --------------------------------------------------------------------------- the lease book
def test_lease_book_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    book = LeaseBook(ttl=1000, limit=3)
    for i in range(5):
        assert book.put(MSGID, f"r{i}@y.com", f"{IP1}|{i:016x}") is None
    assert len(book) == 3 and book.pop(MSGID, "r0@y.com") is None and book.pop(MSGID, "r4@y.com")
    assert book.put(MSGID, "r3@y.com", "new") == f"{IP1}|{3:016x}"  # a new attempt replaces the old lease
    assert book.pop_message(MSGID, IP1) == [f"{IP1}|{2:016x}"]
    clock = [1000.0]
    monkeypatch.setattr("governor.adapters.exim_socket.time.monotonic", lambda: clock[0])
    short = LeaseBook(ttl=1)  # kept 10 minutes all the same: a late report still cleans up
    short.put(MSGID, None, "L")
    clock[0] += 2
    assert short.pop(MSGID, None) == "L"
    short.put(MSGID, None, "L")
    clock[0] += 601
    assert short.pop(MSGID, None) is None
