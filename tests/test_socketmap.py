"""Postfix socketmap: the netstring codec (with hypothesis), the transport map (slot
transports from the store's assign), the status-<name> delivery status filter
(classified, recorded, always NOTFOUND at once), fail modes and unknown maps."""
from __future__ import annotations

import collections
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
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.adapters.socketmap import NetstringError, NetstringReader, encode
from governor.config import Config, load_config_text
from governor.daemon import ThreadedDaemon
from governor.policy import Action
from governor.redisproc import RedisProc
from governor.store import Store

IPS = ("192.0.2.10", "192.0.2.11")
POOL = "pool:\n" + "".join(f"  - {{ip: {ip}, name: yahoo-ip{i + 1}}}\n" for i, ip in enumerate(IPS))
LIMITS = "limits: {per_ip: {concurrency: 5, messages_per_minute: 100}}\n"  # 5 slots x 3 s per IP
NEXTHOP = "[127.0.0.1]:2525"
TSS04 = ("4.7.0 host 127.0.0.1[127.0.0.1] said: 421 4.7.0 [TSS04] Messages from 127.0.0.3 temporarily deferred "
         "due to unexpected volume or user complaints - 4.16.56; see https://postmaster.yahooinc.com/error-codes "
         "(in reply to MAIL FROM command)")
SENT = "2.0.0 host 127.0.0.1[127.0.0.1] said: 250 ok dirdel (in reply to end of DATA command)"
SLOT = re.compile(r"OK (yahoo-ip[12]-s[1-5]):\[127\.0\.0\.1\]:2525")


# --------------------------------------------------------------------------- codec
def test_netstring_encode_and_decode() -> None:
    assert encode("transport *") == b"11:transport *,"
    assert encode(b"") == b"0:,"
    r = NetstringReader()
    assert r.feed(b"11:transport *,0:,5:he") == [b"transport *", b""]
    assert r.pending == 4
    assert r.feed(b"llo") == []
    assert r.feed(b",") == [b"hello"]
    assert r.pending == 0
    payload = "OK yahoo-ip1-s3:[127.0.0.1]:2525 é".encode()
    assert NetstringReader().feed(encode(payload)) == [payload]


@pytest.mark.parametrize("bad", [b"x:", b":", b"1x:a,", b"-1:a,", b" 1:a,", b"3:abc;", b"1234567:", b"100001:",
                                 b"0000000:", b"3:abcd,"])
def test_malformed_netstrings_raise(bad: bytes) -> None:
    with pytest.raises(NetstringError):
        NetstringReader().feed(bad)


def test_netstring_limit_is_100000() -> None:
    big = b"x" * 100_000
    assert NetstringReader().feed(encode(big)) == [big]
    with pytest.raises(NetstringError):
        NetstringReader().feed(b"100001:")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes, chunk: int) -> None:
    r = NetstringReader()
    try:
        for i in range(0, len(data), chunk):
            for payload in r.feed(data[i:i + chunk]):
                assert isinstance(payload, bytes) and len(payload) <= 100_000
    except NetstringError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8), st.integers(1, 64))
def test_round_trip_in_any_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode(p) for p in payloads)
    r = NetstringReader()
    got = [p for i in range(0, len(stream), chunk) for p in r.feed(stream[i:i + chunk])]
    assert got == payloads and r.pending == 0


# --------------------------------------------------------------------------- live daemon
@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="gm-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(url: str, sockdir: str, **changes: Any) -> Config:
    text = (f"{POOL}{LIMITS}sockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock}}\n"
            f"domains: {{dns: false}}\npostfix: {{nexthop: \"{NEXTHOP}\"}}\n")
    cfg = load_config_text(text, "socketmap-test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url), **changes)


class Client:
    """Postfix's side: one connection, many requests."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = NetstringReader()
        self.replies: collections.deque[str] = collections.deque()

    def send(self, *requests: str | bytes) -> None:
        self.sock.sendall(b"".join(encode(r) for r in requests))

    def reply(self) -> str:
        while not self.replies:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.replies.extend(p.decode() for p in self.reader.feed(data))
        return self.replies.popleft()

    def ask(self, request: str | bytes) -> str:
        self.send(request)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(redis_url: str, sockdir: str) -> Iterator[Any]:
    running: list[ThreadedDaemon] = []
    clients: list[Client] = []

    def start(**changes: Any) -> Client:
        if not running:
            running.append(ThreadedDaemon(make_config(redis_url, sockdir, **changes)).__enter__())
        clients.append(Client(f"{sockdir}/map.sock"))
        return clients[-1]

    yield start
    for c in clients:
        c.close()
    for d in running:
        d.stop()


@pytest.fixture
def store(redis_url: str, sockdir: str) -> Iterator[Store]:
    s = Store.connect(make_config(redis_url, sockdir))
    yield s
    s.close()


def test_transport_map_routes_governed_recipients_to_slots(daemon: Any, store: Store) -> None:
    c = daemon()
    for key in ("*", "sender@example.org", "x@gmail.com", "postmaster", "@", "a@", "x@yahoo..com"):
        assert c.ask(f"transport {key}") == "NOTFOUND ", key
    first = c.ask("transport User+Tag@Yahoo.COM")
    assert SLOT.fullmatch(first)
    got = collections.Counter(SLOT.fullmatch(c.ask(f"transport r{i}@aol.com"))[1] for i in range(30))
    assert len(got) == 10 and set(got.values()) == {3}  # 2 IPs x 5 slots, equal shares
    assert store.assigned_ip(["User+Tag@Yahoo.COM", "r0@aol.com"]).keys() == {"User+Tag@Yahoo.COM", "r0@aol.com"}
    # an address the store won't keep (spaces in a quoted local part) is routed all the same
    assert SLOT.fullmatch(c.ask('transport "a b"@yahoo.com'))
    assert c.ask(b"transport \xff@yahoo.com") == "NOTFOUND "


def test_transport_map_follows_cooldowns_and_ramps(daemon: Any, store: Store) -> None:
    c = daemon()
    store._execute([store.plans.apply_call(IPS[0], [Action("pause", seconds=120, reason="TSS04")], "")])
    assert {SLOT.fullmatch(c.ask(f"transport a{i}@yahoo.com"))[1] for i in range(10)} == {
        f"yahoo-ip2-s{i}" for i in range(1, 6)}
    store._execute([store.plans.apply_call(IPS[1], [Action("pause", seconds=60, reason="TSS04")], "")])
    assert c.ask("transport b@yahoo.com") == (
        "OK retry:4.7.0 governor: no egress IP may send to Yahoo now (cooldown:TSS04)")
    store.resume(IPS[0], "ops")
    store.resume(IPS[1], "ops")
    store._execute([store.plans.apply_call(IPS[1], [Action("slow", factor=0.5, seconds=3600, reason="x")], "")])
    got = {SLOT.fullmatch(c.ask(f"transport c{i}@yahoo.com"))[1] for i in range(14)}
    assert got == {f"yahoo-ip1-s{i}" for i in range(1, 6)} | {"yahoo-ip2-s1", "yahoo-ip2-s2"}


def test_status_filter_records_in_the_background_and_answers_at_once(daemon: Any, store: Store,
                                                                     redis_client: redis.Redis) -> None:
    c = daemon()
    t0 = time.perf_counter()
    assert c.ask(f"status-yahoo-ip2 {SENT}") == "NOTFOUND "
    assert c.ask("status-yahoo-ip2 4.4.1 connect to 127.0.0.1[127.0.0.1]:2525: Connection refused") == "NOTFOUND "
    assert redis_client.dbsize() == 0  # nothing the policy could act on: no Redis round trip at all
    assert c.ask(f"status-yahoo-ip2 {TSS04}") == "NOTFOUND "
    assert time.perf_counter() - t0 < 0.1
    deadline = time.monotonic() + 5
    while store.ip_state(IPS[1]).cooldown_until == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    status = {s.ip: s for s in store.status()}
    assert status[IPS[1]].cooldown_reason == "TSS04" and status[IPS[0]].cooldown_until == 0
    assert [e.action for e in store.audit()][:1] == ["count_deferral"]
    assert SLOT.fullmatch(c.ask("transport after@yahoo.com"))[1].startswith("yahoo-ip1-")


def test_status_answers_stay_fast(daemon: Any) -> None:
    c = daemon()
    took = []
    for i in range(200):
        t0 = time.perf_counter()
        assert c.ask(f"status-yahoo-ip1 {TSS04 if i % 2 else SENT}") == "NOTFOUND "
        took.append(time.perf_counter() - t0)
    assert sorted(took)[int(0.99 * len(took))] < 0.05


def test_unknown_maps_and_pipelined_requests(daemon: Any) -> None:
    c = daemon()
    assert c.ask("nosuchmap key") == "PERM unknown map"
    assert c.ask("status-yahoo-ip9 4.7.0 x") == "PERM unknown map"
    assert c.ask("status-yahoo-ip1") == "NOTFOUND "
    assert c.ask("") == "PERM unknown map"
    c.send("transport *", "transport a@yahoo.com", "other x", f"status-yahoo-ip1 {SENT}", "transport b@yahoo.com")
    replies = [c.reply() for _ in range(5)]
    assert replies[0] == "NOTFOUND " and SLOT.fullmatch(replies[1]) and replies[2] == "PERM unknown map"
    assert replies[3] == "NOTFOUND " and SLOT.fullmatch(replies[4])


@pytest.mark.parametrize("garbage", [b"abc", b"12x:", b"5:abc,", b"3:abcX", b"9999999:"])
def test_malformed_netstring_closes_the_connection(daemon: Any, garbage: bytes) -> None:
    c = daemon()
    assert c.ask("transport *") == "NOTFOUND "
    c.sock.sendall(garbage)
    with pytest.raises(ConnectionError):
        c.reply()
    assert daemon().ask("transport *") == "NOTFOUND "  # the daemon still serves new connections


def test_idle_connections_are_closed_after_the_read_timeout(daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from governor.adapters import socketmap

    monkeypatch.setattr(socketmap.Connection, "timeout", 0.3)
    c = daemon()
    assert c.ask("transport *") == "NOTFOUND "
    time.sleep(0.8)
    with pytest.raises(ConnectionError):
        c.ask("transport *")  # Postfix retries a broken connection once, silently


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_down_then_back(sockdir: str, mode: str) -> None:
    with RedisProc() as rp:
        cfg = make_config(rp.url, sockdir, redis_down=mode)
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, socket_timeout=0.3, connect_timeout=0.3))
        with ThreadedDaemon(cfg):
            c = Client(f"{sockdir}/map.sock")
            assert SLOT.fullmatch(c.ask("transport a@yahoo.com"))
            rp.kill()
            down = [c.ask(f"transport d{i}@yahoo.com") for i in range(10)]
            if mode == "fail-open":
                assert {SLOT.fullmatch(r)[1] for r in down} == {f"yahoo-ip{i}-s{j}" for i in (1, 2) for j in range(1, 6)}
            else:
                assert down == ["OK retry:4.7.0 governor unavailable"] * 10
            assert c.ask(f"status-yahoo-ip1 {TSS04}") == "NOTFOUND "
            assert c.ask("transport *") == "NOTFOUND "
            rp.start()
            assert SLOT.fullmatch(c.ask("transport back@yahoo.com"))
            c.close()


def test_arbitrary_bytes_on_the_live_socket(daemon: Any) -> None:
    """Garbage either gets well-formed answers or a closed connection, never a dead daemon."""
    path = daemon().sock.getpeername()
    chunks = st.lists(st.sampled_from([encode("transport *"), encode("transport a@yahoo.com"), b"5:", b",", b"x",
                                       encode(f"status-yahoo-ip1 {TSS04}"), b"99999:", b"\x00"]) | st.binary(max_size=40),
                      max_size=6)

    @settings(max_examples=200, deadline=None, database=None)
    @given(chunks)
    def check(parts: list[bytes]) -> None:
        c = Client(path)
        try:
            c.sock.sendall(b"".join(parts))
            c.sock.shutdown(socket.SHUT_WR)
            data = b""
            try:
                while chunk := c.sock.recv(65536):
                    data += chunk
            except ConnectionResetError:  # dropped for a malformed netstring
                pass
            for reply in NetstringReader().feed(data):
                assert reply.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"PERM", b"TEMP")
        finally:
            c.close()

    check()
    assert daemon().ask("transport *") == "NOTFOUND "
