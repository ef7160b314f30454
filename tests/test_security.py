"""Security of the MTA-facing surfaces, against a running ``governor serve`` process,
a running ``governor milter`` process and a real redis-server.

- Socket ownership: both ``serve`` sockets and the milter socket get
  ``sockets.owner``/``group``/``mode`` before anyone can connect; a client running as
  ``nobody`` outside the group gets EACCES, one inside the group connects.
- Admin operations are unreachable from the MTA-facing sockets: every command word of
  the admin CLI is ``ERR`` on the Exim socket, an unknown map on the socketmap, and
  changes nothing.
- Hostile values (``{``, ``}``, ``*``, spaces, CR/LF, NUL, 10 kB, non-UTF-8) sent over
  the real sockets are refused (Exim: ``ERR``; socketmap: ``NOTFOUND``, or routed
  without being recorded; never an answer that bounces mail) and create no Redis key;
  the daemon keeps serving.
- The milter: hostile envelope values neither crash it nor reject mail.
"""
from __future__ import annotations

import dataclasses
import functools
import grp
import io
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import Milter
import pytest
import redis
from Milter import testctx

from governor.adapters.milter import MilterPolicy, make_factory
from governor.adapters.socketmap import NetstringReader, encode
from governor.lab import readsocket
from governor.config import load_config_text
from governor.domains import DomainSet
from governor.redisproc import RedisProc
from governor.store import Store
from governor.store.keys import valid_recipient

ROOT = Path(__file__).resolve().parent.parent
GOVERNOR = "import sys; from governor.cli import main; sys.exit(main(prog_name='governor'))"
IP1, IP2 = "192.0.2.10", "192.0.2.11"
POOL = f"pool:\n  - {{ip: {IP1}, name: yahoo-ip1}}\n  - {{ip: {IP2}, name: yahoo-ip2}}\n"
MSGID = "1xVXpg-0002Es-1T"
SLOT = re.compile(r"OK yahoo-ip[12]-s\d+:")  # routed to a slot transport (postfix.nexthop empty)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                               reason="needs root and setpriv (runs clients as nobody)")
# the system python: the venv may sit where nobody cannot reach it
CLIENT_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
CONNECT = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
           "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")


# --------------------------------------------------------------------------- helpers
def connect_as_nobody(path: str, group: str) -> int:
    """Connect to ``path`` as user nobody with only ``group``: 0 connected, 13 EACCES."""
    argv = ["setpriv", "--reuid", "nobody", "--regid", group, "--clear-groups", CLIENT_PYTHON, "-c", CONNECT, path]
    return subprocess.run(argv, timeout=30, capture_output=True).returncode


ask = functools.partial(readsocket, errors="replace")  # hostile input may echo bytes


class Socketmap:
    """One Postfix-like socketmap connection: netstring requests, one answer each."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = NetstringReader()
        self.pending: list[bytes] = []

    def ask(self, payload: bytes) -> str:
        self.sock.sendall(encode(payload))
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("socketmap closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0).decode()

    def close(self) -> None:
        self.sock.close()


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    """Every key with its content (sorted sets without scores: times move)."""
    out: dict[bytes, Any] = {}
    for key in r.keys("*"):
        kind = r.type(key)
        if kind == b"zset":
            out[key] = sorted(r.zrange(key, 0, -1))
        elif kind == b"hash":
            out[key] = sorted(r.hkeys(key))
        elif kind == b"stream":
            out[key] = r.xlen(key)
        else:
            out[key] = kind
    return out


# --------------------------------------------------------------------------- governor serve
@dataclasses.dataclass
class Served:
    proc: subprocess.Popen[bytes]
    exim: str
    smap: str
    redis: redis.Redis
    sockdir: str

    def alive(self) -> bool:
        return self.proc.poll() is None


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A governor process logging to a file (a pipe nobody reads could fill and block it)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", GOVERNOR, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_for(paths: list[str], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"{proc.args!r} did not start ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="gsec-", dir="/tmp")
    os.chmod(path, 0o755)  # other users reach the socket files and are refused by their mode
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def served(redis_proc: RedisProc, sockdir: str) -> Iterator[Served]:
    """``governor serve --foreground`` with sockets group nogroup, mode 0660."""
    cfg = Path(sockdir) / "governor.yaml"
    cfg.write_text(
        f"{POOL}redis: {{url: \"{redis_proc.url}\"}}\ndomains: {{dns: false}}\nmetrics: {{listen: null}}\n"
        "logging: {syslog: false, stderr: true, level: info}\n"
        f"sockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock, "
        "owner: root, group: nogroup, mode: \"0660\"}\n")
    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    log = Path(sockdir) / "serve.log"
    proc = _start(["serve", "--config", str(cfg), "--foreground"], log)
    _wait_for([f"{sockdir}/exim.sock", f"{sockdir}/map.sock"], proc, log)
    try:
        yield Served(proc, f"{sockdir}/exim.sock", f"{sockdir}/map.sock", client, sockdir)
    finally:
        _stop(proc)
        client.close()


@pytest.fixture
def clean(served: Served) -> Served:
    """The running daemon on an empty Redis, checked alive before and after the test."""
    assert served.alive()
    served.redis.flushall()
    return served


def _normal_traffic(s: Served) -> None:
    """One valid request of each kind: the keys they create are the baseline."""
    lease = re.search(r"lease=(\S+)", ask(s.exim, f"acquire yahoo.com auto {MSGID} u@yahoo.com".encode()))
    assert lease, "a valid acquire must be granted"
    assert ask(s.exim, f"release {lease[1]}".encode()).startswith("OK released=")
    assert ask(s.exim, b"held yahoo.com") == "OK held=no"
    assert ask(s.exim, f"report {IP1} yahoo.com msg:delivery {MSGID} u@yahoo.com 250 ok".encode()).startswith("OK ")
    m = Socketmap(s.smap)
    try:
        routed = {m.ask(f"transport u{n}@yahoo.com".encode()).split("-s")[0] for n in range(4)}
        assert routed == {"OK yahoo-ip1", "OK yahoo-ip2"}  # both IPs' assigned sets exist
        assert m.ask(b"transport x{y}@yahoo.com").startswith("OK yahoo-ip")  # routed, not remembered
        assert m.ask(b"status-yahoo-ip1 2.0.0 host x[127.0.0.1] said: 250 ok") == "NOTFOUND "
    finally:
        m.close()


def _assert_healthy(s: Served) -> None:
    assert s.alive(), "governor serve died"
    assert ask(s.exim, b"acquire yahoo.com auto - -").startswith("OK governed=yes")
    m = Socketmap(s.smap)
    try:
        assert m.ask(b"transport v@yahoo.com").startswith("OK yahoo-ip")
    finally:
        m.close()


# --------------------------------------------------------------------------- socket ownership
@ROOT_ONLY
def test_serve_sockets_keep_other_users_out(served: Served) -> None:
    nogroup = grp.getgrnam("nogroup").gr_gid
    for path in (served.exim, served.smap):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, nogroup, 0o660)
        assert connect_as_nobody(path, "nogroup") == 0          # in the socket's group: may connect
        assert connect_as_nobody(path, "daemon") == 13          # anyone else: EACCES
        assert connect_as_nobody(path, "nogroup") == 0


@ROOT_ONLY
def test_milter_socket_keeps_other_users_out(redis_proc: RedisProc, sockdir: str) -> None:
    """libmilter creates the socket itself: owner-only until the mode is applied, then
    sockets.owner/group/mode."""
    cfg = Path(sockdir) / "milter.yaml"
    path = f"{sockdir}/milter/milter.sock"
    cfg.write_text(f"{POOL}redis: {{url: \"{redis_proc.url}\"}}\ndomains: {{dns: false}}\n"
                   "logging: {syslog: false, stderr: true}\n"
                   "sockets: {group: nogroup, mode: \"0660\"}\n")
    log = Path(sockdir) / "milter.log"
    proc = _start(["--config", str(cfg), "milter", "--socket", f"unix:{path}"], log)
    try:
        _wait_for([path], proc, log)
        nogroup = grp.getgrnam("nogroup").gr_gid
        deadline = time.monotonic() + 10
        while stat.S_IMODE(os.stat(path).st_mode) != 0o660 and time.monotonic() < deadline:
            time.sleep(0.02)  # the mode is applied just after libmilter listens
        st = os.stat(path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (nogroup, 0o660)
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) & 0o007 == 0  # directory: not for others
        os.chmod(os.path.dirname(path), 0o2755)  # let nobody reach the socket: its own mode must refuse
        assert connect_as_nobody(path, "daemon") == 13
        assert connect_as_nobody(path, "nogroup") == 0
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- admin words
def _admin_words() -> list[str]:
    """Every command and subcommand name of the admin CLI, plus words an attacker would try."""
    from governor.cli import main

    words: set[str] = set()

    def walk(cmd: click.Command) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                words.add(name)
                walk(sub)

    walk(main)
    return sorted(words | {"pause", "resume", "reset", "reset-level", "release-ip", "release-all", "flush",
                           "flushall", "flushdb", "hold", "unhold", "disable", "enable", "drain", "config",
                           "shutdown", "stop", "reload", "quit", "exit", "help", "eval", "keys", "del", "set",
                           "admin", "debug", "auth", "acl", "script", "PAUSE", "Release"})


ADMIN_WORDS = _admin_words()
ADMIN_ARGS = ["", f" {IP1}", " provider", f" {IP1} 60 test", " --all", f" {IP1} --reason x", " * 1h pwned"]


def test_admin_words_are_err_on_the_exim_socket_and_change_nothing(clean: Served) -> None:
    assert {"pause", "resume", "release", "release-ip", "reset-level", "holds", "status"} <= set(ADMIN_WORDS)
    _normal_traffic(clean)
    before = snapshot(clean.redis)
    for word in ADMIN_WORDS:
        for args in ADMIN_ARGS:
            reply = ask(clean.exim, (word + args).encode())
            assert reply.startswith("ERR "), (word, args, reply)  # "release"/"report": a bad or missing field
    assert snapshot(clean.redis) == before
    _assert_healthy(clean)


def test_admin_words_are_unknown_maps_on_the_socketmap(clean: Served) -> None:
    """An admin word as a map name is ``PERM unknown map`` (only a misconfigured Postfix
    could send one); as a transport key it is not an address: ``NOTFOUND``."""
    _normal_traffic(clean)
    before = snapshot(clean.redis)
    m = Socketmap(clean.smap)
    try:
        for word in ADMIN_WORDS:
            for args in ADMIN_ARGS:
                assert m.ask((word + (args or " x")).encode()) == "PERM unknown map", (word, args)
                assert m.ask(f"transport {word}{args}".encode()) == "NOTFOUND ", (word, args)
    finally:
        m.close()
    assert snapshot(clean.redis) == before
    _assert_healthy(clean)


# --------------------------------------------------------------------------- hostile values
HOSTILE = [b"{", b"}", b"*", b" ", b"\r", b"\n", b"\r\n", b"\x00", b"\t", b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
           b"x" * 10_240, b"{gov}", b"*:*", b"\x1b[31m"]
VALID_EXIM = [
    f"acquire yahoo.com auto {MSGID} u@yahoo.com".encode(),
    f"acquire yahoo.com {IP1} - -".encode(),
    f"release {IP1}|0123456789abcdef".encode(),
    f"report {IP1} yahoo.com msg:delivery {MSGID} u@yahoo.com 250 ok".encode(),
    f"report {IP1}|0123456789abcdef yahoo.com msg:defer {MSGID} u@yahoo.com".encode(),
    b"held yahoo.com",
]


def _exim_hostile_lines() -> Iterator[bytes]:
    """Each hostile value inside (and replacing) each field of each request."""
    for line in VALID_EXIM:
        words = line.split(b" ")
        for n in range(1, min(len(words), 6)):
            for junk in HOSTILE:
                if junk in (b" ", b"\n", b"\r\n") and (n == 5 or words[n] in (b"-", b"auto")):
                    continue  # splits into well-formed fields (or ends the line): not hostile there
                yield b" ".join([*words[:n], words[n][:3] + junk + words[n][3:], *words[n + 1:]])
                yield b" ".join([*words[:n], junk, *words[n + 1:]])


def test_hostile_values_on_the_exim_socket_are_err_and_create_no_keys(clean: Served) -> None:
    _normal_traffic(clean)
    before = snapshot(clean.redis)
    lines = list(_exim_hostile_lines()) + HOSTILE + [b"\xff" * 3000, b"{" * 100_000]
    assert len(lines) > 300
    for line in lines:
        reply = ask(clean.exim, line)
        assert reply.startswith("ERR ") and "\n" not in reply and "Traceback" not in reply, (line[:80], reply)
        assert len(reply) < 200  # never echoes a 10 kB value
    assert snapshot(clean.redis) == before
    _assert_healthy(clean)


def test_abrupt_and_garbage_connections_leave_the_daemon_serving(clean: Served) -> None:
    for data in (b"", b"acq", b"\x00" * 5000, os.urandom(70_000)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # write, then hang up without reading
            s.connect(clean.exim)
            try:
                s.sendall(data)
            except OSError:
                pass
    for garbage in (b"x", b"99999999:", b"5:abc", b"01:x,", b"3:abc;", os.urandom(2000)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(clean.smap)
            s.sendall(garbage)
            if garbage != b"5:abc":  # an incomplete netstring just waits (until the read timeout)
                try:
                    assert s.recv(100) == b""  # malformed framing: closed, nothing answered
                except ConnectionResetError:
                    pass
    assert clean.redis.dbsize() == 0
    _assert_healthy(clean)


def test_hostile_transport_keys_never_bounce_and_record_nothing(clean: Served) -> None:
    """transport map: a hostile key is ``NOTFOUND`` (not an address, or not a governed
    domain) or, for a governed domain, routed to a slot without being remembered;
    never ``PERM``/``TEMP`` and never a key or ZSET member carrying it."""
    _normal_traffic(clean)
    before = snapshot(clean.redis)
    m = Socketmap(clean.smap)
    try:
        for junk in HOSTILE:
            for key in (junk, b"u" + junk + b"@yahoo.com", b"u@yahoo.com" + junk, b"u@" + junk + b"yahoo.com",
                        junk + b"@" + junk, b"u@gmail.com" + junk, b"u@yahoo.com" + junk + b"x"):
                reply = m.ask(b"transport " + key)
                assert reply == "NOTFOUND " or SLOT.fullmatch(reply), (key[:60], reply)
            reply = m.ask(b"status-yahoo-ip1 4.7.0 host x[127.0.0.1] said: 421 " + junk)
            assert reply == "NOTFOUND "
    finally:
        m.close()
    time.sleep(0.2)  # status records run in the background
    after = snapshot(clean.redis)
    assert after.keys() == before.keys()
    for key, members in after.items():
        if key.endswith(b":assigned"):  # routed recipients: only addresses the store accepts (u*@yahoo.com is one)
            for new in set(members) - set(before[key]):
                assert valid_recipient(new.decode()) and not re.search(rb"[\s{}\x00-\x1f\x7f]", new), new
        else:
            assert members == before[key], key
    _assert_healthy(clean)


# --------------------------------------------------------------------------- milter
MILTER_CONFIG = POOL + "domains: {dns: false}\n"


class Ctx(testctx.TestCtx):
    """TestCtx that records quarantine() (TestCtx itself does not implement it)."""

    def __init__(self) -> None:
        super().__init__()
        self.quarantined: list[str] = []

    def quarantine(self, reason: str) -> None:
        self.quarantined.append(reason)


def _transaction(policy: MilterPolicy, rcpts: list[str], queue_id: str | None) -> list[int]:
    """connect, MAIL, RCPTs (with Postfix's {rcpt_addr}), DATA, EOM: every answer."""
    Milter.factory = make_factory(policy)
    ctx = Ctx()
    codes = [ctx._connect(), ctx._envfrom("<s@example.org>")]
    for rcpt in rcpts:
        ctx._setsymval("{rcpt_addr}", rcpt)
        ctx._setsymval("i", queue_id)
        codes.append(ctx._envrcpt(f"<{rcpt}>"))
        if codes[-1] == Milter.ACCEPT:
            return codes
    codes.append(ctx._data())
    ctx._body = io.BytesIO()
    codes.append(ctx._eom())
    return codes


HOSTILE_ADDRESSES = [
    "a" * 10_000 + "@yahoo.com", "u@" + "a" * 10_000 + ".com", "u\x00@yahoo.com", "u@yahoo.com\x00", "u@yah\x00oo.com",
    "u\udcff@yahoo.com", "u@yahoo\udcff.com", "\udcff\udcfe", "{u}@yahoo.com", "u@{yahoo.com}", "*@yahoo.com",
    "u@*", "u v@yahoo.com", "u@yahoo.com\r\nRCPT TO:<x@y>", "", "@", "<>", "u@", "@yahoo.com", "u@[192.0.2.1]",
]
HOSTILE_QUEUE_IDS = [None, "", "{x}", "*", "A B", "4ABC\x00", "x" * 10_000, "\udcff"]


@pytest.mark.parametrize("paused", [False, True], ids=["open", "all-paused"])
@pytest.mark.parametrize("action", ["hold", "tempfail"])
def test_milter_hostile_envelopes_never_crash_or_reject(redis_url: str, redis_client: redis.Redis,
                                                        paused: bool, action: str) -> None:
    cfg = load_config_text(MILTER_CONFIG + f"holds: {{action: {action}}}\n", "security.yaml")
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=redis_url))
    store = Store.connect(cfg)
    try:
        if paused:
            for ip in (IP1, IP2):
                store.pause(ip, 300, "test", "pytest")
        policy = MilterPolicy(cfg, store, DomainSet.from_config(cfg), ttl=0.0)
        before = snapshot(redis_client)
        allowed = {Milter.CONTINUE, Milter.ACCEPT, Milter.TEMPFAIL}
        for address in HOSTILE_ADDRESSES:
            for queue_id in HOSTILE_QUEUE_IDS:
                for rcpts in ([address], [address, "v@yahoo.com"]):
                    codes = _transaction(policy, rcpts, queue_id)
                    assert set(codes) <= allowed, (address[:40], queue_id, codes)
        if paused and action == "hold":  # the hold path ran, and refused every hostile queue id
            assert policy.counts["hold_skipped_registry"] > 0 and policy.counts["hold_skipped_no_queue_id"] > 0
        if paused and action == "tempfail":
            assert policy.counts["rcpt_tempfail"] > 0
        after = snapshot(redis_client)
        # a message held under a hostile queue id is never registered (no key, no field)
        holds = {k: v for k, v in after.items() if k not in before}
        assert holds == {}, holds
        for key in after:
            assert not re.search(rb"[\s{}*\x00-\x1f]", key.split(b"}", 1)[-1]), key
            if key in before and key.endswith(b":holds"):
                assert after[key] == before[key]
    finally:
        store.close()
