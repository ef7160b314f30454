"""The Yahoo MX simulator through real SMTP clients (smtplib, swaks, raw sockets) on loopback.

Every client binds its own source address in 127.0.0.0/8, so each test IP is a
separate "sending IP" for the simulator. Loops are bounded, waits have timeouts.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from governor.sim import SimProcess, SimThread, Simulator
from governor.sim.control import request
from governor.sim.settings import Endpoint, Settings

Addr = tuple[str, int]
MSG = b"From: sender@example.com\r\nSubject: sim test\r\n\r\nhello\r\n"
PYTHON_SIM = [sys.executable, "-m", "governor.sim"]

pytestmark = pytest.mark.timeout(60)


def sim_settings(**kw: Any) -> Settings:
    return Settings.from_mapping({"listen": ["127.0.0.1:0"], **kw})


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimThread]]:
    started: list[SimThread] = []

    def factory(**kw: Any) -> SimThread:
        sim = SimThread(sim_settings(**kw)).start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop(timeout=2)


def kind_of(code: int, text: bytes | str) -> str:
    """Name a reply the way the stats do (independent of the project's classifier)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for code_name in ("TSS04", "TS01", "TS02", "TS03"):
        if f"[{code_name}]" in text:
            return code_name
    if "Max message per connection" in text:
        return "max_per_conn"
    if "delivery error: dd" in text:
        return "dd"
    if "[160]" in text:
        return "defer"
    return str(code)


class Seen:
    """Tally of what a client saw, plus the full reply texts (for the classifier test)."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.texts: dict[str, str] = {}
        self.connections = 0
        self.recipients = 0

    def note(self, code: int, text: bytes | str) -> str:
        kind = kind_of(code, text)
        self.kinds[kind] += 1
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.setdefault(kind, f"{code} {text}")
        return kind


def run_session(addr: Addr, src: str, messages: int = 1, rcpts: Sequence[str] = ("user@yahoo.com",),
                seen: Seen | None = None) -> list[str]:
    """One connection from ``src``: per message 'ok' (plus refused-recipient kinds) or the 421 kind."""
    seen = seen or Seen()
    seen.connections += 1
    out: list[str] = []
    try:
        smtp = smtplib.SMTP(addr[0], addr[1], local_hostname="client.example", timeout=10,
                            source_address=(src, 0))
    except smtplib.SMTPConnectError as exc:
        return [seen.note(exc.smtp_code, exc.smtp_error)]
    with smtp:
        for _ in range(messages):
            try:
                refused = smtp.sendmail("sender@example.com", list(rcpts), MSG)
            except smtplib.SMTPSenderRefused as exc:
                out.append(seen.note(exc.smtp_code, exc.smtp_error))
                break
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [seen.note(c, t) for c, t in exc.recipients.values()]
                out.extend(codes)
                if any(c == 421 for c, _ in exc.recipients.values()):
                    break
                smtp.rset()
                continue
            out.extend(seen.note(c, t) for c, t in refused.values())
            seen.recipients += len(rcpts) - len(refused)
            seen.kinds["ok"] += 1
            out.append("ok")
    return out


def swaks(addr: Addr, src: str, to: str = "user@yahoo.com") -> str:
    """Send one message with swaks; return its transcript."""
    proc = subprocess.run(
        ["swaks", "--server", addr[0], "--port", str(addr[1]), "--local-interface", src,
         "--to", to, "--from", "sender@example.com", "--helo", "client.example", "--timeout", "10"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    return proc.stdout + proc.stderr


def raw_exchange(addr: Addr, src: str, payload: bytes, timeout: float = 5.0) -> list[str]:
    """Send ``payload`` at once (pipelined) and read replies until the server closes."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((src, 0))
        sock.connect(addr)
        sock.recv(4096)  # greeting
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().splitlines()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def ip_stats(sim: SimThread | SimProcess, ip: str) -> dict[str, Any]:
    return sim.stats(include_times=False)["ips"][ip]


# -- behaviour ----------------------------------------------------------------------------------


def test_polite_clients_never_see_tss04(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim()
    addr = sim.addresses[0]
    for src in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        for _ in range(2):  # 40 messages per IP in 2 connections: under every default limit
            assert run_session(addr, src, 20) == ["ok"] * 20
    assert "250 ok dirdel" in swaks(addr, "127.0.0.14")
    stats = sim.stats()
    for src, n in (("127.0.0.11", 40), ("127.0.0.12", 40), ("127.0.0.13", 40), ("127.0.0.14", 1)):
        ip = stats["ips"][src]
        assert ip["accepted"] == n and sum(ip["replies"].values()) == 0 and ip["standing"] == "ok"
        assert len(ip["accept_times"]) == n
    assert stats["total"]["accepted"] == 121 and stats["total"]["replies"]["TSS04"] == 0


def test_eight_parallel_connections_get_exactly_three_tss04(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim()
    addr = sim.addresses[0]
    barrier = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        with smtplib.SMTP(*addr, local_hostname="client.example", timeout=10,
                          source_address=("127.0.0.21", 0)) as smtp:
            smtp.ehlo()
            barrier.wait(timeout=10)  # all 8 connections are open at the same time
            try:
                smtp.sendmail("sender@example.com", ["user@yahoo.com"], MSG)
                outcome = "ok"
            except smtplib.SMTPSenderRefused as exc:
                outcome = kind_of(exc.smtp_code, exc.smtp_error)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == ["TSS04"] * 3 + ["ok"] * 5
    ip = ip_stats(sim, "127.0.0.21")
    assert ip["replies"]["TSS04"] == 3 and ip["accepted"] == 5 and ip["concurrency_hwm"] == 8
    assert run_session(addr, "127.0.0.22") == ["ok"]  # another IP is not affected


def test_tss04_closes_the_session_and_drops_pipelined_commands(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(max_conn=1)
    addr = sim.addresses[0]
    with smtplib.SMTP(*addr, local_hostname="c.example", timeout=10, source_address=("127.0.0.23", 0)):
        lines = raw_exchange(addr, "127.0.0.23", b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n"
                                                 b"RCPT TO:<u@yahoo.com>\r\nDATA\r\n")
    assert "250-PIPELINING" in lines
    assert lines[-1].startswith("421 4.7.0 [TSS04] Messages from 127.0.0.23 temporarily deferred")
    assert not any(line.startswith(("503", "354")) for line in lines)  # nothing after the 421


def test_rate_limit_gives_tss04_then_penalty(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(max_rate=10, penalty=30)
    addr = sim.addresses[0]
    assert run_session(addr, "127.0.0.31", 12) == ["ok"] * 10 + ["TSS04"]
    transcript = swaks(addr, "127.0.0.31")  # a retry inside the penalty window
    assert ("421 4.7.0 [TSS04] Messages from 127.0.0.31 temporarily deferred due to unexpected "
            "volume or user complaints - 4.16.55.1; https://postmaster.yahooinc.com/error-codes") in transcript
    ip = ip_stats(sim, "127.0.0.31")
    assert ip["replies"]["TSS04"] == 2 and ip["violations"] == 2 and ip["standing"] == "TSS04"
    assert 25 < ip["penalty_remaining"] <= 30
    assert run_session(addr, "127.0.0.32", 3) == ["ok"] * 3


def test_blind_retry_escalates_to_ts02_then_ts03_and_stays(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(max_rate=2, rate_window=1, penalty=1.5, ts02_after=3, ts03_after=5)
    addr = sim.addresses[0]
    seen = run_session(addr, "127.0.0.33", 3)
    for _ in range(6):  # a retry loop that ignores the deferrals
        seen += run_session(addr, "127.0.0.33")
    assert seen == ["ok", "ok", "TSS04", "TSS04", "TS02", "TS02", "TS03", "TS03", "TS03"]
    time.sleep(1.7)  # penalty and rate window are over; TS03 is not
    assert run_session(addr, "127.0.0.33") == ["TS03"]
    assert ip_stats(sim, "127.0.0.33")["standing"] == "TS03"
    sim.reset_ip("127.0.0.33")  # Yahoo's postmaster releases the IP
    assert run_session(addr, "127.0.0.33", 2) == ["ok", "ok"]


def test_connect_stage_and_rcpt_stage(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(max_conn=1, stage="connect")
    addr = sim.addresses[0]
    with smtplib.SMTP(*addr, local_hostname="c.example", timeout=10, source_address=("127.0.0.34", 0)):
        assert run_session(addr, "127.0.0.34") == ["TSS04"]  # instead of the 220 greeting
    sim.set("stage", "rcpt")
    sim.reset_ip("127.0.0.35")
    sim.set("max_rate", 1)
    lines = raw_exchange(addr, "127.0.0.35", b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@yahoo.com>\r\n"
                                             b"DATA\r\nx\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@yahoo.com>\r\n")
    assert lines[-3:-1] == ["250 ok dirdel", "250 OK"] and "[TSS04]" in lines[-1]


def test_cold_ip_gets_ts01_after_its_budget(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(cold_budget=5, cold_ips=["127.0.0.41"])
    addr = sim.addresses[0]
    seen = Seen()
    assert run_session(addr, "127.0.0.41", 7, seen=seen) == ["ok"] * 5 + ["TS01"]
    assert seen.texts["TS01"] == ("421 4.7.0 [TS01] Messages from 127.0.0.41 temporarily deferred due "
                                  "to user complaints - 4.16.55.1; https://postmaster.yahooinc.com/error-codes")
    assert run_session(addr, "127.0.0.42", 7) == ["ok"] * 7  # warm IP
    sim.cold("127.0.0.43")  # marked cold at run time, through the control interface
    sim.set("cold_budget", 2)
    assert run_session(addr, "127.0.0.43", 3) == ["ok", "ok", "TS01"]
    assert ip_stats(sim, "127.0.0.41")["cold_used"] == 5


def test_dd_and_per_recipient_deferrals(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim()
    addr = sim.addresses[0]
    seen = Seen()
    rcpts = ["user@yahoo.com", "nouser@yahoo.com", "unknown.x@ymail.com", "complain@aol.com"]
    assert sorted(run_session(addr, "127.0.0.51", 2, rcpts, seen)) == sorted(["dd", "dd", "defer", "ok"] * 2)
    assert seen.texts["dd"] == ("554 delivery error: dd This user doesn't have a yahoo.com account "
                                "(nouser@yahoo.com) [0] - mta1234.mail.gq1.yahoo.com")
    assert seen.texts["defer"] == "451 Message temporarily deferred - [160]"
    transcript = swaks(addr, "127.0.0.52", to="nouser@sbcglobal.net")
    assert "554 delivery error: dd This user doesn't have a sbcglobal.net account (nouser@sbcglobal.net)" in transcript
    ip = ip_stats(sim, "127.0.0.51")
    assert (ip["accepted"], ip["recipients"], ip["replies"]["dd"], ip["replies"]["defer"]) == (2, 2, 4, 2)
    assert ip["violations"] == 0


def test_max_messages_per_connection(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim()
    addr = sim.addresses[0]
    seen = Seen()
    assert run_session(addr, "127.0.0.53", 25, seen=seen) == ["ok"] * 20 + ["max_per_conn"]
    assert seen.texts["max_per_conn"] == "421 Max message per connection reached, closing transmission channel"
    ip = ip_stats(sim, "127.0.0.53")
    assert ip["violations"] == 0 and ip["standing"] == "ok" and ip["replies"]["max_per_conn"] == 1
    assert run_session(addr, "127.0.0.53") == ["ok"]  # reconnecting is fine


def test_ipv6_peer_gets_the_ipv6_form(make_sim: Callable[..., SimThread]) -> None:
    if not have_ipv6_loopback():
        pytest.skip("kernel has no ::1")
    sim = make_sim(listen=["[::1]:0", "127.0.0.1:0"], max_rate=1)
    v6 = next(a for a in sim.addresses if a[0] == "::1")
    seen = Seen()
    assert run_session(v6, "::1", 2, seen=seen) == ["ok", "TSS04"]
    assert seen.texts["TSS04"].startswith("421 4.7.0 [TSS04] Messages from ::1 temporarily deferred")
    assert ip_stats(sim, "::1")["replies"]["TSS04"] == 1


def test_listeners_share_one_per_ip_view(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(listen=["127.0.0.1:0", "127.0.0.2:0", "127.0.0.3:0"], max_rate=5, penalty=0)
    addrs = sim.addresses
    seen = [run_session(addrs[i % 3], "127.0.0.54")[0] for i in range(7)]
    assert seen == ["ok"] * 5 + ["TSS04"] * 2
    listeners = sim.stats()["listeners"]
    assert sorted(listeners.values()) == [2, 2, 3]


def test_stats_match_what_the_clients_saw(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(listen=["127.0.0.1:0", "127.0.0.2:0"], max_rate=30, max_conn=3, penalty=0.5,
                   ts02_after=8, ts03_after=12, cold_ips=["127.0.0.74"], cold_budget=4)
    addrs = sim.addresses
    rcpt_mix = ["user@yahoo.com", "nouser@yahoo.com", "complain@yahoo.com", "other@aol.com"]
    plan = {  # source IP → (connections, messages per connection, recipients)
        "127.0.0.71": (3, 5, ["a@yahoo.com"]),
        "127.0.0.72": (6, 22, ["b@yahoo.com"]),
        "127.0.0.73": (4, 3, rcpt_mix),
        "127.0.0.74": (3, 3, ["c@yahoo.com", "d@yahoo.com"]),
    }
    seen = {ip: Seen() for ip in plan}

    def client(ip: str, conns: int, msgs: int, rcpts: list[str]) -> None:
        for i in range(conns):
            run_session(addrs[i % 2], ip, msgs, rcpts, seen[ip])

    threads = [threading.Thread(target=client, args=(ip, *p)) for ip, p in plan.items()]
    threads += [threading.Thread(target=client, args=("127.0.0.72", 3, 22, ["e@yahoo.com"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_until(lambda: sim.stats(include_times=False)["total"]["open"] == 0)
    stats = sim.stats()
    for ip, s in seen.items():
        got = stats["ips"][ip]
        assert got["connections"] == s.connections, ip
        assert got["accepted"] == s.kinds["ok"], ip
        assert got["recipients"] == s.recipients, ip
        assert {k: v for k, v in got["replies"].items() if v} == \
               {k: v for k, v in s.kinds.items() if k != "ok"}, ip
        assert len(got["accept_times"]) == got["accepted"]
    assert seen["127.0.0.72"].kinds["TSS04"] > 0 and seen["127.0.0.74"].kinds["TS01"] > 0
    assert sum(stats["listeners"].values()) == stats["total"]["connections"]


def test_sink_accepts_everything_and_counts_separately(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(sink=["127.0.0.1:0"], max_rate=1)
    sink = sim.sink_addresses[0]
    assert run_session(sink, "127.0.0.81", 30, ["x@gmail.com", "nouser@gmail.com"]) == ["ok"] * 30
    stats = sim.stats()
    assert stats["sink"]["ips"]["127.0.0.81"] == {"connections": 1, "accepted": 30, "recipients": 60}
    assert "127.0.0.81" not in stats["ips"] and stats["total"]["connections"] == 0


def test_simulator_api_with_aiosmtplib() -> None:
    """The asyncio API (start/stop/stats/reset) with aiosmtplib clients bound to their source IP."""
    aiosmtplib = pytest.importorskip("aiosmtplib")

    async def session(sim: Simulator, src: str, messages: int) -> list[str]:
        ep = sim.addresses[0]
        smtp = aiosmtplib.SMTP(hostname=ep.host, port=ep.port, source_address=(src, 0),
                               local_hostname="c.example", timeout=10)
        await smtp.connect()
        out: list[str] = []
        try:
            for _ in range(messages):
                try:
                    await smtp.sendmail("sender@example.com", ["user@yahoo.com"], MSG)
                    out.append("ok")
                except aiosmtplib.SMTPSenderRefused as exc:
                    out.append(kind_of(exc.code, exc.message))
                    break
        finally:
            if smtp.is_connected:
                await smtp.quit()
        return out

    async def scenario() -> tuple[list[list[str]], dict[str, Any], dict[str, Any]]:
        sim = Simulator(sim_settings(max_rate=3, penalty=0))
        await sim.start()
        try:
            seen = [await session(sim, "127.0.0.96", 2), await session(sim, "127.0.0.96", 2)]
            seen += await asyncio.gather(*(session(sim, f"127.0.0.{97 + i}", 3) for i in range(3)))
            before = sim.stats()
            sim.reset()
            return seen, before, sim.stats()
        finally:
            await sim.stop(timeout=2)

    seen, before, after = asyncio.run(scenario())
    assert seen == [["ok", "ok"], ["ok", "TSS04"]] + [["ok"] * 3] * 3
    assert before["ips"]["127.0.0.96"]["replies"]["TSS04"] == 1 and before["total"]["accepted"] == 12
    assert after["ips"] == {} and after["total"]["accepted"] == 0


# -- control interface, process, CLI ---------------------------------------------------------------


def test_control_over_tcp(make_sim: Callable[..., SimThread]) -> None:
    sim = make_sim(control="127.0.0.1:0")
    assert sim.sim is not None and sim.sim.control_address is not None
    host, port = sim.sim.control_address.rsplit(":", 1)
    ctl = Endpoint(host, int(port))
    assert request(ctl, "ping")["listen"] == [f"{h}:{p}" for h, p in sim.addresses]
    assert request(ctl, "set max_conn 7")["settings"]["max_conn"] == 7
    assert request(ctl, "set max_conn 0") == {"ok": False, "error": "max_conn: must be >= 1, got 0"}
    assert not request(ctl, "set listen 127.0.0.1:25")["ok"]
    assert not request(ctl, "frobnicate")["ok"]
    assert not request(ctl, "block not-an-ip")["ok"]


def test_sim_process_control_block_and_sigterm(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    settings = sim_settings(stats_file=str(stats_file), shutdown_timeout=3)
    with SimProcess(settings) as sim:
        addr = sim.addresses[0]
        assert run_session(addr, "127.0.0.61", 3) == ["ok"] * 3
        sim.block("127.0.0.62")
        assert "<** 421 4.7.1 [TS03] All messages from 127.0.0.62 will be permanently deferred" \
            in swaks(addr, "127.0.0.62")
        sim.unblock("127.0.0.62")
        assert run_session(addr, "127.0.0.62") == ["ok"]
        dumped = sim.dump(tmp_path / "dump.json")
        assert json.loads(dumped.read_text())["ips"]["127.0.0.61"]["accepted"] == 3
        assert sim.command("help")["ok"] and not sim.command("reset-ip")["ok"]
        # one idle session and one in the middle of DATA when SIGTERM arrives
        idle = smtplib.SMTP(*addr, local_hostname="c.example", timeout=10, source_address=("127.0.0.63", 0))
        busy = socket.create_connection(addr, timeout=10, source_address=("127.0.0.64", 0))
        busy.recv(1024)
        busy.sendall(b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@yahoo.com>\r\nDATA\r\nSubject: x\r\n")
        wait_until(lambda: b"354" in busy.recv(4096, socket.MSG_PEEK))
        started = time.monotonic()
        sim.signal(signal.SIGTERM)
        time.sleep(0.3)
        busy.sendall(b"\r\nbody\r\n.\r\n")
        tail = b""
        while chunk := busy.recv(4096):
            tail += chunk
        busy.close()
        assert tail.decode().splitlines()[-1] == "250 ok dirdel"  # the transaction finished, then EOF
        with pytest.raises(smtplib.SMTPServerDisconnected):
            idle.noop()
        idle.close()
        assert sim.proc is not None and sim.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    stats = json.loads(stats_file.read_text())
    assert stats["ips"]["127.0.0.61"]["accepted"] == 3
    assert stats["ips"]["127.0.0.64"]["accepted"] == 1
    assert stats["ips"]["127.0.0.62"]["replies"]["TS03"] == 1
    assert stats["total"]["open"] == 0


def test_sigterm_aborts_a_stuck_session_within_the_bound(tmp_path: Path) -> None:
    settings = sim_settings(stats_file=str(tmp_path / "s.json"), shutdown_timeout=0.5)
    with SimProcess(settings) as sim:
        stuck = socket.create_connection(sim.addresses[0], timeout=10, source_address=("127.0.0.65", 0))
        stuck.sendall(b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@yahoo.com>\r\nDATA\r\nhalf a mess")
        time.sleep(0.2)
        started = time.monotonic()
        assert sim.stop(timeout=10) == 0
        assert time.monotonic() - started < 3
        stuck.close()
    assert json.loads((tmp_path / "s.json").read_text())["ips"]["127.0.0.65"]["accepted"] == 0


@pytest.mark.parametrize("bad", ["0.0.0.0:2525", "192.0.2.1:25", "[::]:2525", "localhost:2525"])
def test_cli_refuses_non_loopback(bad: str) -> None:
    proc = subprocess.run([*PYTHON_SIM, "--listen", bad], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "loopback" in proc.stderr or "literal IP" in proc.stderr


def test_cli_refuses_non_loopback_in_config_and_sink(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("max_conn: 3\nlisten: ['10.1.2.3:2525']\n")
    proc = subprocess.run([*PYTHON_SIM, "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"{cfg}:2:" in proc.stderr and "loopback" in proc.stderr
    proc = subprocess.run([*PYTHON_SIM, "--sink", "198.51.100.7:25"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "loopback" in proc.stderr


def test_cli_reports_address_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([*PYTHON_SIM, "--listen", f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=30)
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1" in proc.stderr


def test_cli_help_explains_every_option_with_its_default() -> None:
    from governor.sim.cli import standalone

    options = [p for p in standalone.params if p.name != "help"]
    assert len(options) >= 22
    for param in options:
        assert param.help and len(param.help) > 30 and "[default:" in param.help, param.name
    proc = subprocess.run([*PYTHON_SIM, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for param in options:
        assert param.opts[-1] in proc.stdout
    for needle in ("TSS04", "TS02", "TS03", "TS01", "CONTROL PROTOCOL", "reset-ip", "SIGTERM",
                   "loopback", "EXIT STATUS", "STATS"):
        assert needle in proc.stdout


def test_governor_sim_is_registered_on_the_main_cli() -> None:
    from click.testing import CliRunner

    from governor.cli import main

    result = CliRunner().invoke(main, ["sim", "--help"])
    assert result.exit_code == 0 and "--max-conn" in result.output
    assert "sim" in main.commands


GOVERNOR_SCRIPT = shutil.which("governor", path=str(Path(sys.executable).parent))


def test_console_script_runs_sim_help() -> None:
    assert GOVERNOR_SCRIPT is not None, "the governor console script is not installed in the venv"
    proc = subprocess.run([GOVERNOR_SCRIPT, "sim", "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--max-per-conn" in proc.stdout


# -- the project's classifier reads the simulator right -----------------------------------------


def test_replies_are_classified_right(make_sim: Callable[..., SimThread]) -> None:
    from governor.classify import classify

    sim = make_sim(max_rate=2, rate_window=60, penalty=30, ts02_after=3, ts03_after=4,
                   cold_ips=["127.0.0.92"], cold_budget=0)
    addr = sim.addresses[0]
    seen = Seen()
    run_session(addr, "127.0.0.91", 21, ["nouser@yahoo.com", "complain@aol.com", "u@yahoo.com"], seen)
    for _ in range(3):
        run_session(addr, "127.0.0.91", 1, seen=seen)
    run_session(addr, "127.0.0.92", 1, seen=seen)
    sim.set("max_rate", 1000)
    run_session(addr, "127.0.0.93", 21, seen=seen)
    expected = {"TSS04": "TSS04", "TS02": "TS02", "TS03": "TS03", "TS01": "TS01",
                "dd": "DD_USER_UNKNOWN", "max_per_conn": "MAX_MSG_PER_CONN", "defer": "DEFER_160"}
    assert set(seen.texts) >= set(expected)
    if have_ipv6_loopback():
        six = make_sim(listen=["[::1]:0"], max_rate=1)
        run_session(six.addresses[0], "::1", 2, seen=(v6 := Seen()))
        assert v6.texts["TSS04"].startswith("421 4.7.0 [TSS04] Messages from ::1 ")
        assert classify(v6.texts["TSS04"]).code == "TSS04"
    for kind, code in expected.items():
        assert classify(seen.texts[kind]).code == code, seen.texts[kind]
