"""governor serve as a process: socket mode and ownership (another user cannot connect),
stale/live/foreign socket files, SIGTERM shutdown within the grace period, detaching
with a pidfile, start-up errors, --help, and the key=value log lines."""
from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
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

import pytest

from governor import logsetup
from governor.config import Config, load_config_text
from governor.daemon import DaemonError, SocketSpec, ThreadedDaemon, bind_unix
from governor.lab import readsocket

ROOT = Path(__file__).resolve().parent.parent
SERVE = "import governor.cli.serve_cmd; from governor.cli import main; main(prog_name='governor')"
POOL = "pool:\n  - {ip: 192.0.2.10, name: yahoo-ip1}\n  - {ip: 192.0.2.11, name: yahoo-ip2}\n"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="gd-", dir="/tmp")
    os.chmod(path, 0o755)  # other users must be able to reach the socket to be refused by its mode
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config_text(url: str, sockdir: str) -> str:
    return (f"{POOL}redis: {{url: \"{url}\", socket_timeout: 1s}}\ndomains: {{dns: false}}\n"
            "logging: {syslog: false, stderr: true, level: info}\n"
            f"sockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock}}\n")


def make_config(url: str, sockdir: str, sockets: str = "") -> Config:
    text = (f"{POOL}domains: {{dns: false}}\n"
            f"sockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock{sockets}}}\n")
    cfg = load_config_text(text, "daemon-test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url))


ask = readsocket


def connect_as(path: str, uid: int, gid: int, groups: list[int]) -> int:
    """Fork a child that drops to uid/gid and tries to connect: 0 connected, 13 EACCES."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --------------------------------------------------------------------------- sockets
def test_socket_mode_default_0660(redis_url: str, sockdir: str) -> None:
    with ThreadedDaemon(make_config(redis_url, sockdir)):
        for name in ("exim.sock", "map.sock"):
            st = os.stat(f"{sockdir}/{name}")
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert not os.path.exists(f"{sockdir}/exim.sock") and not os.path.exists(f"{sockdir}/map.sock")


@ROOT_ONLY
def test_socket_ownership_keeps_other_users_out(redis_url: str, sockdir: str) -> None:
    """mode 0660 owner root group nogroup: a member of nogroup may connect, nobody else."""
    nogroup = grp.getgrnam("nogroup").gr_gid
    nobody = pwd.getpwnam("nobody").pw_uid
    with ThreadedDaemon(make_config(redis_url, sockdir, ", owner: root, group: nogroup, mode: \"0660\"")):
        for path in (f"{sockdir}/exim.sock", f"{sockdir}/map.sock"):
            st = os.stat(path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, nogroup, 0o660)
            assert connect_as(path, nobody, nogroup, [nogroup]) == 0
            assert connect_as(path, nobody, 12345, [12345]) == 13
        assert ask(f"{sockdir}/exim.sock", "held gmail.com") == "OK held=no"


@ROOT_ONLY
def test_socket_mode_0600_refuses_the_group(redis_url: str, sockdir: str) -> None:
    nogroup = grp.getgrnam("nogroup").gr_gid
    with ThreadedDaemon(make_config(redis_url, sockdir, ", group: nogroup, mode: \"0600\"")):
        path = f"{sockdir}/exim.sock"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert connect_as(path, pwd.getpwnam("nobody").pw_uid, nogroup, [nogroup]) == 13


@pytest.mark.parametrize("field, value, message", [
    ("owner", "no-such-user-gx", "sockets.owner: no such user 'no-such-user-gx'"),
    ("group", "no-such-group-gx", "sockets.group: no such group 'no-such-group-gx'"),
])
def test_unknown_owner_or_group_is_a_clear_error(redis_url: str, sockdir: str, field: str, value: str,
                                                 message: str) -> None:
    with pytest.raises(DaemonError, match=re.escape(message)):
        with ThreadedDaemon(make_config(redis_url, sockdir, f", {field}: {value}")):
            pass  # pragma: no cover
    assert os.listdir(sockdir) == []  # nothing half-created


def test_stale_live_and_foreign_socket_files(redis_url: str, sockdir: str) -> None:
    path = f"{sockdir}/exim.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: replaced
    with ThreadedDaemon(make_config(redis_url, sockdir)):
        assert ask(path, "held gmail.com") == "OK held=no"
        with pytest.raises(DaemonError, match="in use by another process"):  # a second daemon is refused
            bind_unix(path, 0o660)
    Path(path).write_text("not a socket")
    with pytest.raises(DaemonError, match="exists and is not a socket"):
        with ThreadedDaemon(make_config(redis_url, sockdir)):
            pass  # pragma: no cover
    assert Path(path).read_text() == "not a socket"
    with pytest.raises(DaemonError, match="longer than 107 bytes"):
        bind_unix("/tmp/" + "x" * 120, 0o660)


def test_socket_specs() -> None:
    assert SocketSpec.parse("unix:/a/b.sock") == SocketSpec("unix", path="/a/b.sock")
    assert SocketSpec.parse("/a/b.sock").path == "/a/b.sock"
    assert SocketSpec.parse("inet:127.0.0.1:10025") == SocketSpec("inet", host="127.0.0.1", port=10025)
    assert SocketSpec.parse("inet:[::1]:10025").host == "::1"
    for bad in ("inet:127.0.0.1", "inet:h:0", "relative.sock", "unix:rel"):
        with pytest.raises(DaemonError):
            SocketSpec.parse(bad)


def test_socketmap_on_inet(redis_url: str, sockdir: str) -> None:
    from governor.adapters.socketmap import NetstringReader, encode
    from governor.redisproc import free_port

    port = free_port()
    cfg = make_config(redis_url, sockdir)
    cfg = dataclasses.replace(cfg, sockets=dataclasses.replace(cfg.sockets, socketmap=f"inet:127.0.0.1:{port}"))
    with ThreadedDaemon(cfg), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(encode("transport *"))
        assert NetstringReader().feed(s.recv(100)) == [b"NOTFOUND "]


# --------------------------------------------------------------------------- the process
def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", SERVE, "serve", *args]


def start_serving(cfg_path: Path, sockdir: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(serve_cmd("--config", str(cfg_path), "--foreground", *extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (os.path.exists(f"{sockdir}/exim.sock") and os.path.exists(f"{sockdir}/map.sock")):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=5)
            raise AssertionError(f"serve did not start ({proc.returncode}): {err}")
        time.sleep(0.02)
    return proc


def test_sigterm_finishes_in_flight_requests_and_exits_0(redis_url: str, sockdir: str, tmp_path: Path) -> None:
    import concurrent.futures

    cfg_path = tmp_path / "governor.yaml"
    one = "pool:\n  - {ip: 192.0.2.10, name: yahoo-ip1}\nlimits: {per_ip: {messages_per_minute: 30}}\n"
    cfg_path.write_text(config_text(redis_url, sockdir).replace(POOL, one) + "exim: {wait: 2.5s}\n")
    proc = start_serving(cfg_path, sockdir)
    try:
        path = f"{sockdir}/exim.sock"
        assert ask(path, "acquire yahoo.com auto - -").startswith("OK governed=yes")
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(path)  # connected, never sends: closed at shutdown
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(ask, path, "acquire yahoo.com auto - -")  # 2 s to the next slot: it waits
            time.sleep(0.3)
            assert not waiting.done()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # the waiting request is answered at once (DEFER: it did not get its slot)
            assert waiting.result(timeout=5) == "DEFER retry=2 reason=rate"
            assert time.monotonic() - t0 < 1
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - t0
        silent.settimeout(1)
        assert silent.recv(10) == b""
        silent.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and took < 5, (proc.returncode, took, err)
    assert "event=start" in err and "event=stop unfinished=0" in err
    assert not os.path.exists(f"{sockdir}/exim.sock") and not os.path.exists(f"{sockdir}/map.sock")


def test_detaches_with_a_pidfile(redis_url: str, sockdir: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "governor.yaml"
    cfg_path.write_text(config_text(redis_url, sockdir))
    pidfile = tmp_path / "serve.pid"
    done = subprocess.run(serve_cmd("--config", str(cfg_path), "--pidfile", str(pidfile)), cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())  # written before the starting process returned: it listens
    try:
        assert ask(f"{sockdir}/exim.sock", "acquire gmail.com auto - -") == "OK governed=no"
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists() and not os.path.exists(f"{sockdir}/exim.sock")


def test_start_up_errors(redis_url: str, sockdir: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "governor.yaml"
    cfg_path.write_text(config_text(redis_url, sockdir))
    Path(f"{sockdir}/exim.sock").write_text("precious")
    fg = subprocess.run(serve_cmd("--config", str(cfg_path), "--foreground"), cwd=ROOT, capture_output=True,
                        text=True, timeout=30)
    assert fg.returncode == 1 and "exists and is not a socket; refusing to replace it" in fg.stderr
    bg = subprocess.run(serve_cmd("--config", str(cfg_path)), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bg.returncode == 1 and "exists and is not a socket" in bg.stderr  # reported by the starting process
    cfg_path.write_text("mode: sometimes\n")
    bad = subprocess.run(serve_cmd("--config", str(cfg_path), "--foreground"), cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "mode" in bad.stderr


def test_help_reads_like_a_man_page() -> None:
    done = subprocess.run(serve_cmd("--help"), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for words in ("--foreground", "--pidfile", "sockets.exim", "sockets.socketmap", "SIGTERM", "Exit status",
                  "acquire <domain> <ip|auto> <msgid|-> <rcpt|->", "status-<egress>", "fail-open", "Examples"):
        assert words in done.stdout, words


# --------------------------------------------------------------------------- logging
def test_kv_lines() -> None:
    assert logsetup.kv(event="feedback", ip="192.0.2.10", code=None, actions="pause,slow") == \
        "event=feedback ip=192.0.2.10 code=- actions=pause,slow"
    assert logsetup.kv(reply='421 "x"\r\ny', empty="", eq="a=b") == 'reply="421 \\"x\\"  y" empty="" eq="a=b"'
    assert len(logsetup.kv(v="x" * 1000)) == len("v=") + 300


def test_log_setup_falls_back_to_stderr_without_syslog(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from governor.config import Logging

    monkeypatch.setattr(logsetup, "SYSLOG_SOCKETS", ("/nonexistent/log",))
    log = logsetup.setup(Logging(ident="gx-test", level="notice"))
    try:
        log.info("hidden")
        log.log(logsetup.NOTICE, logsetup.kv(event="start"))
    finally:
        logsetup.shutdown()
    err = capsys.readouterr().err
    assert re.search(r"gx-test\[\d+\]: NOTICE event=start", err) and "hidden" not in err
    assert logsetup.LEVELS["notice"] == logsetup.NOTICE and logging.getLevelName(logsetup.NOTICE) == "NOTICE"


def test_metrics_endpoint_counts_decisions_and_feedback(redis_url: str, sockdir: str, tmp_path: Path) -> None:
    """A scrape of the daemon's /metrics shows the counters moving and the store's gauges."""
    import urllib.request

    from governor.redisproc import free_port

    port = free_port()
    cfg_path = tmp_path / "governor.yaml"
    cfg_path.write_text(config_text(redis_url, sockdir) + f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    proc = start_serving(cfg_path, sockdir)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def count(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    try:
        before = scrape()
        ip = ask(f"{sockdir}/exim.sock", "acquire yahoo.com auto - -").split("ip=")[1].split()[0]
        ask(f"{sockdir}/exim.sock", f"report {ip} yahoo.com msg:defer - - SMTP error from remote mail server "
            f"after MAIL FROM:<a@b.example>: 421 4.7.0 [TSS04] Messages from {ip} temporarily deferred")
        time.sleep(1.2)  # past the per-IP gauges' one-second cache
        after = scrape()
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert count(after, 'governor_decisions_total{reason="ok",result="granted"}') == \
        count(before, 'governor_decisions_total{reason="ok",result="granted"}') + 1
    assert count(after, f'governor_replies_total{{code="TSS04",ip="{ip}"}}') == 1
    assert count(after, 'governor_actions_total{kind="pause"}') == 1
    assert f'governor_cooldown_active{{ip="{ip}",reason="TSS04"}} 1.0' in after
