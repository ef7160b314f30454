"""Audit lines reach syslog: one ``action=... by=...`` key=value line per admin action
and per automatic reaction, with facility mail and the MTA queue id when there is one.

A real unix datagram socket stands in for /dev/log (``logging.syslog_socket``); the
datagrams are what rsyslog/journald would receive: ``<PRI>ident[pid]: message``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor import logsetup
from governor.adapters import feedback
from governor.adapters.queue_agent import QueueAgent, QueuedMessage
from governor.classify import classify
from governor.cli import main
from governor.config import load_config
from governor.domains import DomainSet
from governor.store import Store

IP1, IP2 = "192.0.2.10", "192.0.2.11"
TSS04 = ("host mx.yahoo.com[198.51.100.1] said: 421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred "
         "due to unexpected volume or user complaints - 4.16.55.1 (in reply to MAIL FROM command)")
TS03 = "421 4.7.1 [TS03] All messages from 192.0.2.11 will be permanently deferred; Retrying will NOT succeed."
LINE = re.compile(r"^<(\d+)>yahoo-governor\[(\d+)\]: (.*)$", re.S)
MAIL = 2  # syslog facility mail


class SyslogSocket:
    """A bound AF_UNIX datagram socket: what the governor's SysLogHandler writes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def lines(self, wait: float = 3.0, settle: float = 0.3) -> list[tuple[int, str]]:
        """(PRI, message) of every datagram until none came for ``settle`` s (at most ``wait`` s)."""
        out: list[tuple[int, str]] = []
        end = time.monotonic() + wait
        self.sock.settimeout(settle if out else wait)
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            m = LINE.match(data.decode().rstrip("\x00"))
            assert m, data
            out.append((int(m.group(1)), m.group(3)))
            self.sock.settimeout(settle)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[SyslogSocket]:
    s = SyslogSocket(tmp_path / "log.sock")
    yield s
    s.close()
    logsetup.shutdown()


@pytest.fixture
def cfg_path(tmp_path: Path, redis_url: str, syslog: SyslogSocket) -> str:
    path = tmp_path / "governor.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', prefix: sl{time.monotonic_ns()}}}\n"
                    f"pool:\n  - {{ip: {IP1}, name: ip-a}}\n  - {{ip: {IP2}, name: ip-b}}\n"
                    "domains: {dns: false}\n"
                    f"logging: {{syslog: true, syslog_socket: '{syslog.path}', level: warning}}\n")
    return str(path)


def run(cfg_path: str, *args: str):
    res = CliRunner().invoke(main, ["--config", cfg_path, *args], catch_exceptions=False)
    assert res.exit_code in (0, 1), res.output
    assert "action=" not in res.output  # audit lines go to syslog, never to the terminal
    return res


def fields(message: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', message)}


def test_admin_actions_are_syslogged_with_facility_mail(cfg_path: str, syslog: SyslogSocket) -> None:
    store = Store.connect(load_config(cfg_path))
    try:
        run(cfg_path, "pause", IP1, "--for", "4h", "--reason", "yahoo asked us to slow down")
        run(cfg_path, "resume", IP1)
        run(cfg_path, "pause", "provider", "--for", "10m", "--reason", "incident")
        store.record(IP2, classify(TS03), "u@aol.com", "aol.com")
        run(cfg_path, "release-ip", IP2)
        run(cfg_path, "reset-level", IP2)
    finally:
        store.close()
    got = syslog.lines()
    assert all(pri >> 3 == MAIL and pri & 7 == 5 for pri, _ in got), got   # mail.notice
    messages = [m for _, m in got]
    assert [fields(m)["action"] for m in messages] == ["pause", "resume", "pause", "release-ip", "reset-level"]
    first = messages[0]
    assert re.match(rf'^action=pause ip={re.escape(IP1)} by=\S+ reason="yahoo asked us to slow down" '
                    r"until=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ seconds=14400$", first), first
    assert fields(messages[2])["ip"] == "provider"
    assert fields(messages[3]) | {} == {"action": "release-ip", "ip": IP2, "by": fields(first)["by"],
                                        "changed": "yes"}


def test_automatic_reactions_carry_the_queue_id(cfg_path: str, syslog: SyslogSocket) -> None:
    cfg = load_config(cfg_path)
    logsetup.setup(cfg.logging)         # what `governor serve` / the agent do at start (level: warning)
    log = logging.getLogger("governor.daemon")
    store = Store.connect(cfg)
    try:
        fb = feedback.record_sync(store, IP1, classify(TSS04), log, mta="postfix", recipient="u@yahoo.com",
                                  queue_id="4ABC123DEF")
        assert "pause" in fb.actions
        queue = MemoryQueue({"7XYZ": QueuedMessage("7XYZ", ("v@yahoo.com",), "deferred", time.time(), TSS04)})
        agent = QueueAgent(cfg, store, queue, DomainSet.from_config(cfg), busy_scan=0.0, idle_scan=0.0)
        assert agent.step().held == ["7XYZ"]
    finally:
        store.close()
        logsetup.shutdown()
    messages = [m for pri, m in syslog.lines() if pri >> 3 == MAIL]
    by_action = {fields(m)["action"]: fields(m) for m in messages}
    pause = by_action["pause"]
    assert pause["ip"] == IP1 and pause["by"] == "policy" and pause["reason"] == "TSS04"
    assert pause["queue_id"] == "4ABC123DEF" and pause["mta"] == "postfix" and float(pause["seconds"]) > 0
    assert by_action["hold_queue"]["queue_id"] == "4ABC123DEF"
    hold = by_action["hold"]
    assert hold == {"action": "hold", "queue_id": "7XYZ", "ip": IP1, "by": "queue-agent",
                    "reason": "cooldown:TSS04", "mta": "postfix"}
    assert not any(fields(m).get("action") == "count_deferral" for m in messages)  # counters are not reactions


@dataclasses.dataclass
class MemoryQueue:
    """A minimal in-memory QueueBackend (the MTA side is tested against Postfix elsewhere)."""

    messages: dict[str, QueuedMessage]
    mta: str = "postfix"

    def list_governed(self, domains: DomainSet) -> list[QueuedMessage]:
        return list(self.messages.values())

    def hold(self, ids: list[str]) -> list[str]:
        for i in ids:
            self.messages[i] = dataclasses.replace(self.messages[i], state="hold")
        return [i for i in ids if i in self.messages]

    def release(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i in self.messages]


def test_no_syslog_socket_means_no_terminal_noise(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "governor.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', prefix: sl-none}}\npool: [{{ip: {IP1}}}]\n"
                    f"logging: {{syslog_socket: '{tmp_path}/absent.sock'}}\n")
    res = CliRunner().invoke(main, ["--config", str(path), "pause", IP1, "--for", "1m", "--reason", "x"])
    assert res.exit_code == 0 and res.output.strip() == f"{IP1}: paused for Yahoo for 1m (x)"


def test_syslog_socket_must_be_an_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "governor.yaml"
    path.write_text("logging: {syslog_socket: dev/log}\n")
    res = CliRunner().invoke(main, ["--config", str(path), "check-config"])
    assert res.exit_code == 2 and "logging.syslog_socket" in res.output and "absolute path" in res.output
