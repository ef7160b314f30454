"""Pure tests of the simulator's per-IP state machine and settings (fake clock, no sockets)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from governor.sim import replies
from governor.sim.settings import Endpoint, Settings, SettingsError, parse_endpoint
from governor.sim.state import Conn, SimState


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make(clock: FakeClock | None = None, **kw) -> tuple[SimState, FakeClock]:
    clock = clock or FakeClock()
    return SimState(dataclasses.replace(Settings(), **kw), clock), clock


def deliver(state: SimState, conn: Conn, rcpt: str = "user@yahoo.com") -> str:
    """One message on ``conn``: 'ok' or the kind of the reply that stopped it."""
    reply = state.mail(conn)
    if reply is not None:
        return reply.kind
    reply = state.rcpt(conn, rcpt)
    if reply is not None:
        state.rset(conn)
        return reply.kind
    state.data(conn, 1)
    return "ok"


def session(state: SimState, ip: str, messages: int) -> list[str]:
    """Connect, send up to ``messages``, stop at the first closing reply, disconnect."""
    conn, reply = state.connect(ip)
    out: list[str] = []
    if reply is not None:
        out.append(reply.kind)
    else:
        for _ in range(messages):
            out.append(deliver(state, conn))
            if out[-1] != "ok":
                break
    state.disconnect(conn)
    return out


# -- limits -------------------------------------------------------------------------------


def test_polite_sender_never_deferred() -> None:
    state, clock = make()
    for _ in range(30):  # 30 connections x 3 messages, 2 s apart: 90 msgs/min < 100
        assert session(state, "192.0.2.1", 3) == ["ok"] * 3
        clock.advance(2.0)
    ip = state.stats()["ips"]["192.0.2.1"]
    assert ip["accepted"] == 90 and sum(ip["replies"].values()) == 0 and ip["violations"] == 0


def test_concurrency_excess_gets_tss04_at_mail() -> None:
    state, _ = make()
    conns = [state.connect("192.0.2.2") for _ in range(8)]
    assert all(reply is None for _, reply in conns)  # stage mail: verdict waits for MAIL
    kinds = [deliver(state, c) for c, _ in conns]
    assert kinds == ["ok"] * 5 + ["TSS04"] * 3
    st_ip = state.stats()["ips"]["192.0.2.2"]
    assert st_ip["concurrency_hwm"] == 8 and st_ip["replies"]["TSS04"] == 3


def test_concurrency_at_connect_stage() -> None:
    state, _ = make(stage="connect")
    replies_ = [state.connect("192.0.2.3")[1] for _ in range(8)]
    assert [r.kind if r else None for r in replies_] == [None] * 5 + ["TSS04"] * 3
    assert all(r.close for r in replies_ if r)


def test_freed_slot_admits_again_after_penalty() -> None:
    state, clock = make(penalty=10)
    conns = [state.connect("192.0.2.4")[0] for _ in range(6)]
    assert deliver(state, conns[5]) == "TSS04"
    for c in conns:
        state.disconnect(c)
    assert session(state, "192.0.2.4", 1) == ["TSS04"]  # inside the penalty window
    clock.advance(10.5)
    assert session(state, "192.0.2.4", 1) == ["ok"]


def test_rate_window_slides() -> None:
    state, clock = make(max_rate=5, penalty=0)
    assert session(state, "192.0.2.5", 6) == ["ok"] * 5 + ["TSS04"]
    clock.advance(59.0)
    assert session(state, "192.0.2.5", 1) == ["TSS04"]  # all 5 still inside 60 s
    clock.advance(1.5)
    assert session(state, "192.0.2.5", 5) == ["ok"] * 5


def test_reservation_counts_messages_in_flight() -> None:
    state, _ = make(max_rate=1)
    a, _ = state.connect("192.0.2.6")
    b, _ = state.connect("192.0.2.6")
    assert state.mail(a) is None
    assert state.mail(b).kind == "TSS04"  # a's message is in flight: no overshoot
    state.rset(a)
    c, _ = state.connect("192.0.2.7")
    assert state.mail(c) is None  # other IP, own budget


def test_rset_and_disconnect_release_reservation() -> None:
    state, _ = make(max_rate=1, penalty=0)
    a, _ = state.connect("192.0.2.8")
    assert state.mail(a) is None
    state.rset(a)
    assert state.mail(a) is None
    state.disconnect(a)
    assert state.record("192.0.2.8").inflight == 0
    assert session(state, "192.0.2.8", 1) == ["ok"]


def test_max_per_connection_is_not_a_penalty() -> None:
    state, _ = make()
    assert session(state, "192.0.2.9", 21) == ["ok"] * 20 + ["max_per_conn"]
    ip = state.stats()["ips"]["192.0.2.9"]
    assert ip["replies"]["max_per_conn"] == 1 and ip["violations"] == 0 and ip["standing"] == "ok"
    assert session(state, "192.0.2.9", 1) == ["ok"]
    assert replies.max_per_conn().text == (
        "421 Max message per connection reached, closing transmission channel")


# -- penalty and escalation ------------------------------------------------------------------


def test_retry_inside_penalty_restarts_it() -> None:
    state, clock = make(max_rate=1, rate_window=1, penalty=10, ts02_after=100, ts03_after=100)
    assert session(state, "198.51.100.1", 2) == ["ok", "TSS04"]
    for _ in range(5):  # blind retry every 8 s: never 10 s of quiet
        clock.advance(8)
        assert session(state, "198.51.100.1", 1) == ["TSS04"]
    clock.advance(10.5)
    assert session(state, "198.51.100.1", 1) == ["ok"]
    assert state.record("198.51.100.1").violations == 6


def test_escalation_to_ts02_then_ts03_is_sticky() -> None:
    state, clock = make(max_rate=1, rate_window=1, penalty=5, ts02_after=3, ts03_after=5)
    ip = "198.51.100.2"
    seen = session(state, ip, 2)
    for _ in range(6):
        clock.advance(1)
        seen += session(state, ip, 1)
    assert seen == ["ok", "TSS04", "TSS04", "TS02", "TS02", "TS03", "TS03", "TS03"]
    clock.advance(7 * 86400)  # a week of silence changes nothing
    assert session(state, ip, 1) == ["TS03"]
    assert state.stats()["ips"][ip]["standing"] == "TS03"
    state.reset_ip(ip)
    assert session(state, ip, 1) == ["ok"]
    counts = state.stats()["ips"][ip]["replies"]
    assert (counts["TSS04"], counts["TS02"], counts["TS03"]) == (2, 2, 4)


def test_escalated_verdict_follows_stage() -> None:
    state, _ = make(penalty=60, ts02_after=1, ts03_after=2, max_rate=1, stage="rcpt")
    conn, reply = state.connect("198.51.100.3")
    assert reply is None and deliver(state, conn) == "ok"
    assert state.mail(conn) is None  # verdict deferred to RCPT
    assert state.rcpt(conn, "x@yahoo.com").kind == "TS02"


def test_quiet_period_forgets_violations_but_not_escalation() -> None:
    state, clock = make(max_rate=1, rate_window=1, penalty=1, ts02_after=3, ts03_after=10,
                        violation_reset=3600)
    ip = "198.51.100.4"
    assert session(state, ip, 2) == ["ok", "TSS04"]
    clock.advance(0.5)
    assert session(state, ip, 1) == ["TSS04"]
    clock.advance(3600)
    assert session(state, ip, 2) == ["ok", "TSS04"]
    assert state.record(ip).violations == 1  # counted from zero again
    clock.advance(0.5)
    session(state, ip, 1)
    clock.advance(0.5)
    assert session(state, ip, 1) == ["TS02"]
    clock.advance(86400)
    assert session(state, ip, 1) == ["TS02"]  # sticky: no auto-downgrade


def test_blocked_ip_gets_ts03_at_connect_whatever_the_stage() -> None:
    state, _ = make(stage="mail", blocked_ips=("203.0.113.9",))
    conn, reply = state.connect("203.0.113.9")
    assert reply is not None and reply.kind == "TS03" and reply.close
    assert "All messages from 203.0.113.9 will be permanently deferred" in reply.text
    state.disconnect(conn)
    state.set_blocked("203.0.113.9", False)
    assert session(state, "203.0.113.9", 1) == ["ok"]


# -- cold IPs and recipients -----------------------------------------------------------------


def test_cold_ip_budget_then_ts01() -> None:
    state, clock = make(cold_ips=("203.0.113.1",), cold_budget=5, cold_window=100, ts02_after=50)
    assert session(state, "203.0.113.1", 6) == ["ok"] * 5 + ["TS01"]
    assert session(state, "203.0.113.1", 1) == ["TS01"]  # still spent, no TSS04 penalty
    assert session(state, "203.0.113.2", 6) == ["ok"] * 6  # warm IP unaffected
    clock.advance(100.5)
    assert session(state, "203.0.113.1", 1) == ["ok"]
    assert state.stats()["ips"]["203.0.113.1"]["replies"]["TS01"] == 2


def test_cold_ip_retry_loop_escalates_to_ts02() -> None:
    state, _ = make(cold_ips=("203.0.113.3",), cold_budget=0, ts02_after=3, ts03_after=9)
    kinds = [session(state, "203.0.113.3", 1)[0] for _ in range(4)]
    assert kinds == ["TS01", "TS01", "TS02", "TS02"]


def test_recipient_patterns() -> None:
    state, _ = make()
    conn, _ = state.connect("192.0.2.20")
    assert state.mail(conn) is None
    dd = state.rcpt(conn, "nouser@yahoo.co.uk")
    assert dd.kind == "dd" and not dd.close
    assert dd.text == ("554 delivery error: dd This user doesn't have a yahoo.co.uk account "
                       "(nouser@yahoo.co.uk) [0] - mta1234.mail.gq1.yahoo.com")
    defer = state.rcpt(conn, "complain-7@aol.com")
    assert defer.kind == "defer" and defer.text == "451 Message temporarily deferred - [160]"
    assert state.rcpt(conn, "nousers@yahoo.com") is None  # no separator: ordinary user
    assert state.rcpt(conn, "someone@yahoo.com") is None
    state.data(conn, 2)
    ip = state.stats()["ips"]["192.0.2.20"]
    assert (ip["accepted"], ip["recipients"], ip["replies"]["dd"], ip["replies"]["defer"]) == (1, 2, 1, 1)
    assert ip["violations"] == 0


def test_ipv6_peer_gets_ipv6_text() -> None:
    state, _ = make(max_rate=1)
    assert session(state, "2001:db8:0:0::25", 2) == ["ok", "TSS04"]
    assert replies.tss04("2001:db8::25").text.startswith(
        "421 4.7.0 [TSS04] Messages from 2001:db8::25 temporarily deferred")
    assert "2001:db8::25" in state.stats()["ips"]


# -- accounting and control -------------------------------------------------------------------


def test_reset_keeps_live_connections_counted() -> None:
    state, _ = make(max_conn=2)
    a, _ = state.connect("192.0.2.30")
    b, _ = state.connect("192.0.2.30")
    state.reset()
    assert state.stats()["ips"]["192.0.2.30"]["open"] == 2
    c, _ = state.connect("192.0.2.30")
    assert deliver(state, c) == "TSS04"
    for conn in (a, b, c):
        state.disconnect(conn)
        state.disconnect(conn)  # idempotent
    assert state.stats()["total"]["open"] == 0


def test_stats_timestamps() -> None:
    state, clock = make()
    session(state, "192.0.2.31", 2)
    clock.advance(5)
    session(state, "192.0.2.31", 1)
    ip = state.stats()["ips"]["192.0.2.31"]
    assert ip["accept_times"] == [clock.t - 5, clock.t - 5, clock.t]
    assert (ip["first_accept"], ip["last_accept"]) == (clock.t - 5, clock.t)
    assert "accept_times" not in state.stats(include_times=False)["ips"]["192.0.2.31"]


# -- invariants under arbitrary traffic --------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["connect", "mail", "rcpt", "data", "rset", "close", "tick"]),
              st.integers(0, 7), st.integers(0, 2)),
    max_size=250,
)


@hsettings(max_examples=150, deadline=None)
@given(OPS)
def test_limits_hold_under_any_interleaving(ops: list[tuple[str, int, int]]) -> None:
    """Whatever clients do, no IP ever exceeds its rate, concurrency or per-connection limit."""
    state, clock = make(max_conn=3, max_rate=4, rate_window=10, max_per_conn=2, penalty=3,
                        ts02_after=6, ts03_after=12)
    ips = ["192.0.2.1", "192.0.2.2", "::1"]
    conns: list[tuple[Conn, bool]] = []  # (conn, in_transaction)
    for op, n, k in ops:
        live = [c for c in conns if c[0].open]
        if op == "tick":
            clock.advance(n * 0.7)
        elif op == "connect":
            conn, reply = state.connect(ips[k])
            if reply is not None and reply.close:
                state.disconnect(conn)
            conns.append((conn, False))
        elif live:
            idx = n % len(live)
            conn, _ = live[idx]
            if op == "mail":
                reply = state.mail(conn)
                if reply is not None and reply.close:
                    state.disconnect(conn)
            elif op == "rcpt" and conn.reserved:
                reply = state.rcpt(conn, ["u@yahoo.com", "nouser@yahoo.com", "defer@x.com"][k])
                if reply is not None and reply.close:
                    state.disconnect(conn)
            elif op == "data" and conn.reserved:
                state.data(conn, 1)
            elif op == "rset":
                state.rset(conn)
            elif op == "close":
                state.disconnect(conn)
        admitted = [c for c, _ in conns if c.open and c.pending is None]
        for ip in ips:
            rec = state.record(ip)
            assert 0 <= rec.inflight <= rec.open
            assert sum(1 for c in admitted if c.ip == rec.ip) <= 3
            times = rec.accept_times
            assert all(b >= a for a, b in zip(times, times[1:]))
            for t in times:  # any window of 10 s holds at most 4 accepts
                assert sum(1 for u in times if t <= u < t + 10) <= 4
        assert all(c.accepted <= 2 for c, _ in conns)
    total = state.stats()["total"]
    assert total["accepted"] == sum(c.accepted for c, _ in conns)


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0.0.0.0:25", "192.0.2.1:2525", "[::]:25", "10.0.0.1:2525",
                                  "[2001:db8::1]:25", "[::ffff:127.0.0.1]:25"])
def test_non_loopback_refused(text: str) -> None:
    with pytest.raises(SettingsError, match="loopback addresses only"):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["localhost:2525", "127.0.0.1", "127.0.0.1:99999", ""])
def test_malformed_endpoint_refused(text: str) -> None:
    with pytest.raises(SettingsError):
        parse_endpoint(text)


def test_loopback_endpoints_parse() -> None:
    assert parse_endpoint("127.0.0.9:2525") == Endpoint("127.0.0.9", 2525)
    assert parse_endpoint("[::1]:0") == Endpoint("::1", 0)
    assert str(Endpoint("::1", 25)) == "[::1]:25"


def test_settings_validation() -> None:
    with pytest.raises(SettingsError, match="ts03_after"):
        Settings.from_mapping({"ts02_after": 10, "ts03_after": 5})
    with pytest.raises(SettingsError, match="max_conn"):
        Settings.from_mapping({"max_conn": 0})
    with pytest.raises(SettingsError, match="stage"):
        Settings.from_mapping({"stage": "data"})
    with pytest.raises(SettingsError, match="dd_pattern"):
        Settings.from_mapping({"dd_pattern": "(unclosed"})
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.from_mapping({"max_conns": 3})
    s = Settings.from_mapping({"max-rate": "250", "cold_ips": ["::FFFF:127.0.0.3", "127.0.0.4"]})
    assert s.max_rate == 250 and s.cold_ips == ("127.0.0.3", "127.0.0.4")


def test_yaml_errors_carry_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "sim.yaml"
    good.write_text("listen: ['127.0.0.2:2525', '[::1]:2525']\nmax_conn: 7\ncold_ips: [127.0.0.9]\n")
    s = Settings.from_yaml(good)
    assert s.max_conn == 7 and s.listen[1] == Endpoint("::1", 2525) and s.cold_ips == ("127.0.0.9",)
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_conn: 7\n\nlisten: ['192.0.2.1:25']\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml:3: .*loopback"):
        Settings.from_yaml(bad)


def test_yaml_settings_are_checked_as_a_whole(tmp_path) -> None:
    """Raising both escalation thresholds in one file is valid even past the old ts03 default."""
    from governor.sim.settings import Settings, SettingsError

    path = tmp_path / "sim.yaml"
    path.write_text("ts02_after: 60\nts03_after: 90\n")
    s = Settings.from_yaml(path)
    assert (s.ts02_after, s.ts03_after) == (60, 90)
    path.write_text("ts02_after: 60\nts03_after: 10\n")
    with pytest.raises(SettingsError, match=r"sim.yaml:1: ts03_after \(10\) must be >= ts02_after \(60\)"):
        Settings.from_yaml(path)
