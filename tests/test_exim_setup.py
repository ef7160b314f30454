"""governor.exim_setup and ``governor exim-config``: the generated Exim snippets.

Text-level checks run anywhere; the Exim checks (``-bV`` syntax check of the
split and monolithic forms, ``-bP``/``-be``/``-bt`` of the routers and transports
against a stand-in socket) need root and the extracted Exim 4.96 binary.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.cli import main
from governor.config import load_config_text
from governor.exim_setup import (
    EximSetup,
    EximSetupError,
    assemble,
    conf_d_files,
    exim_time,
    expand_blocks,
    render,
    setup_from_config,
)
from governor.lab.exim import EximConfig, EximInstance, GovernedEximConfig, lab_unavailable

POOL_YAML = """
pool:
  - {ip: 127.0.0.2, name: yahoo-ip1}
  - {ip: 127.0.0.3, name: yahoo-ip2, concurrency: 3}
  - {ip: 127.0.0.4, name: yahoo-ip3, enabled: false}
limits: {per_ip: {messages_per_connection: 12}}
"""


needs_exim = pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")


def make_setup(extra: str = "", sock: str = "/run/yahoo-governor/exim.sock", **overrides: object) -> EximSetup:
    cfg = load_config_text(POOL_YAML + f"sockets: {{exim: {sock}}}\n" + extra)
    return setup_from_config(cfg, **overrides)


# --------------------------------------------------------------------------- text
def test_macros_reflect_the_pool() -> None:
    files = render(make_setup(), "split")
    macros = files["main/00_yahoo-governor_macros"]
    assert "YAHOO_GOVERNOR_ENABLE = yes" in macros
    assert "YAHOO_GOVERNOR_SOCKET = /run/yahoo-governor/exim.sock" in macros
    assert "YAHOO_GOVERNOR_TIMEOUT = 3s" in macros
    assert "YAHOO_GOVERNOR_PER_CONNECTION = 12" in macros
    assert "YAHOO_GOVERNOR_FAIL_CLOSED" not in macros.split("# --- building blocks")[0].split("\n.ifdef")[0]
    assert "YAHOO_GOVERNOR_WHEN_HELD_FREEZE = yes" in macros  # holds.action: hold (default)
    assert "YAHOO_GOVERNOR_RCPT_HOOK = yes" in macros
    assert re.search(r"^domainlist yahoo_governor_domains = yahoo\.com : .*aol\.com", macros, re.M)
    assert "yahoo.co.jp" not in macros  # bundled "never" list

    transports = files["transport/30_yahoo-governor"]
    blocks = re.findall(r"^(yahoo_ip\d):\n((?:  .*\n|\.\S.*\n)+)", transports, re.M)
    assert [name for name, _ in blocks] == ["yahoo_ip1", "yahoo_ip2"]  # disabled IP left out
    one, two = (body for _, body in blocks)
    assert "interface = 127.0.0.2" in one and "max_parallel = 5" in one
    assert "interface = 127.0.0.3" in two and "max_parallel = 3" in two
    for body in (one, two):
        assert "max_rcpt = 1" in body and "multi_domain = false" in body
        assert "connection_max_messages = YAHOO_GOVERNOR_PER_CONNECTION" in body
    assert "report 127.0.0.3 $domain $event_name" in two
    assert "@" + "IP@" not in transports


def test_fail_closed_and_held_action_and_monolithic_files() -> None:
    setup = make_setup("redis_down: fail-closed\nholds: {action: tempfail}\n")
    assert setup.fail_closed and setup.held_action == "defer"
    mono = render(setup, "monolithic")
    assert list(mono) == ["yahoo-governor-main.conf", "yahoo-governor-acl.conf", "yahoo-governor-routers.conf",
                          "yahoo-governor-transports.conf", "yahoo-governor-retry.conf"]
    main_text = mono["yahoo-governor-main.conf"]
    assert "YAHOO_GOVERNOR_FAIL_CLOSED = yes" in main_text
    assert "YAHOO_GOVERNOR_RCPT_HOOK" not in main_text.split("\n\n")[0]  # Debian hook only in split
    assert "hold_domains =" in main_text  # main/95 merged into the main file


def test_no_macro_name_is_a_prefix_of_another() -> None:
    """Exim replaces a macro wherever its name starts a word: YAHOO_GOVERNOR_X would
    eat the start of YAHOO_GOVERNOR_X_Y."""
    text = "".join(render(make_setup("redis_down: fail-closed\n", route_list="* h::25", route_self="send")).values())
    names = set(re.findall(r"^(YAHOO_GOVERNOR_[A-Z_]+)\s*=", text, re.M))
    assert len(names) > 15
    clashes = [(a, b) for a in names for b in names if a != b and b.startswith(a)]
    assert clashes == []


def test_settings_that_would_lose_or_stall_mail_are_refused() -> None:
    with pytest.raises(EximSetupError, match="longer than exim.wait"):
        make_setup("exim: {wait: 3s, readsocket_timeout: 3}\n")
    with pytest.raises(EximSetupError, match="retry cutoff"):
        make_setup("holds: {queue_lifetime: 12h, release_margin: 1h}\n")
    with pytest.raises(EximSetupError, match="no enabled egress IP"):
        setup_from_config(load_config_text(""))


def test_retry_rules_and_time_format() -> None:
    setup = make_setup()
    retry = conf_d_files(setup)["retry/25_yahoo-governor"]
    assert re.search(r"^yahoo\.com  \*  F,5d,1m$", retry, re.M)
    assert exim_time(432000) == "5d" and exim_time(90) == "90s" and exim_time(0.4) == "1s"
    assert exim_time(7200) == "2h" and exim_time(604800) == "1w"
    scaled = make_setup("time_scale: 0.001\n")
    assert "F,432s,1s" in conf_d_files(scaled)["retry/25_yahoo-governor"]


def test_expand_blocks_and_assemble() -> None:
    tpl = "# @X@ head\n@BLOCK_START@\nx = @X@\n@BLOCK_END@\ntail\n"
    assert expand_blocks(tpl, [{"X": "1"}, {"X": "2"}]) == "# 1 head\nx = 1\nx = 2\ntail\n"
    out = assemble({"main/00_a": "M\n", "router/150_b": "R\n"}, {"routers": "dnslookup\n", "": "own main\n"})
    assert out.index("M") < out.index("own main") < out.index("begin routers") < out.index("R") \
        < out.index("dnslookup")


def test_cli_prints_and_writes(tmp_path: Path) -> None:
    cfg = tmp_path / "governor.yaml"
    cfg.write_text(POOL_YAML)
    runner = CliRunner()
    res = runner.invoke(main, ["-c", str(cfg), "exim-config"])
    assert res.exit_code == 0, res.output
    assert "# ==> transport/30_yahoo-governor <==" in res.output
    res = runner.invoke(main, ["-c", str(cfg), "exim-config", "--monolithic", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == "yahoo-governor-acl.conf"
    bad = tmp_path / "bad.yaml"
    bad.write_text(POOL_YAML + "exim: {wait: 9s}\n")
    res = runner.invoke(main, ["-c", str(bad), "exim-config"])
    assert res.exit_code == 2 and "exim.wait" in res.output


# --------------------------------------------------------------------------- with Exim
class Answering:
    """A one-line-in, one-line-out AF_UNIX server, like the governor's Exim socket."""

    def __init__(self, path: Path, answer: Callable[[str], str]) -> None:
        self.path, self.answer = path, answer
        self.requests: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline().decode().strip()
                self.requests.append(line)
                conn.sendall(self.answer(line).encode())

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gov-eset-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def lab_instance(setup: EximSetup, layout: str) -> EximInstance:
    base = EximConfig(sink_port=2525, acl_smtp_rcpt="acl_yahoo_governor_check_rcpt")
    return EximInstance(config_text=GovernedEximConfig(setup, base, layout=layout), queue_interval=None)


@needs_exim
@pytest.mark.parametrize("layout", ["split", "monolithic"])
def test_generated_config_passes_exim_syntax_check(layout: str) -> None:
    setup = make_setup(route_list="* 127.0.0.1::2525 byname", route_self="send")
    inst = lab_instance(setup, layout)
    try:
        inst.prepare()  # runs exim -bV and raises on any config error
        assert "Exim version 4.96" in inst.run("-bV").stdout
        shown = inst.run("-bP", "transport", "yahoo_ip2").stdout
        assert "interface = 127.0.0.3" in shown and "max_parallel = 3" in shown
        assert "connection_max_messages = 12" in shown
        assert inst.expand("${extract{transport}{${substr_3:OK governed=yes ip=127.0.0.3 transport=yahoo_ip2}}}") \
            == "yahoo_ip2"
        assert "F,5d,1m" in inst.run("-brt", "someone@yahoo.com").stdout
        if layout == "monolithic":
            assert ".include " in inst.config_path.read_text()
    finally:
        inst.stop()


@needs_exim
@pytest.mark.parametrize("fail_mode", ["fail-open", "fail-closed"])
def test_router_answers_and_fail_modes(workdir: Path, fail_mode: str) -> None:
    """exim -bt through the generated routers: governed → per-IP transport; not
    governed → normal routing; DEFER → deferred; daemon down → the fail mode."""
    sock = workdir / "gov.sock"
    replies = {
        "yahoo.com": "OK governed=yes ip=127.0.0.3 transport=yahoo_ip2 lease=L1 per_connection=20",
        "aol.com": "DEFER retry=30 reason=cooldown-TSS04",
        "gmail.com": "OK governed=no",
    }
    server = Answering(sock, lambda line: replies.get(line.split()[1], "ERR ?"))
    setup = make_setup(f"redis_down: {fail_mode}\n", sock=str(sock),
                       route_list="* 127.0.0.1::2525 byname", route_self="send")
    inst = lab_instance(setup, "split")
    try:
        inst.prepare()
        out = inst.run("-bt", "u@yahoo.com", check=False).stdout
        assert "router = yahoo_governor_route, transport = yahoo_ip2" in out
        assert server.requests[-1] == "acquire yahoo.com auto - u@yahoo.com"
        out = inst.run("-bt", "u@aol.com", check=False).stdout
        assert "cannot be resolved at this time: governor: DEFER retry=30 reason=cooldown-TSS04" in out
        assert "router = to_sink, transport = remote_smtp" in inst.run("-bt", "g@gmail.com", check=False).stdout
        server.close()
        down_yahoo = inst.run("-bt", "u@yahoo.com", check=False).stdout
        down_gmail = inst.run("-bt", "g@gmail.com", check=False).stdout
        assert "router = to_sink, transport = remote_smtp" in down_gmail  # never blocked
        if fail_mode == "fail-open":
            assert "router = to_sink, transport = remote_smtp" in down_yahoo
        else:
            assert "cannot be resolved at this time: governor: DEFER retry=60 reason=governor-unreachable" \
                in down_yahoo
    finally:
        server.close()
        inst.stop()


@needs_exim
def test_rcpt_acl_defers_yahoo_while_held_and_fails_open(workdir: Path) -> None:
    sock = workdir / "gov.sock"
    held = {"yahoo.com": "OK held=yes"}
    server = Answering(sock, lambda line: held.get(line.split()[1], "OK held=no"))
    inst = lab_instance(make_setup("holds: {action: tempfail}\n", sock=str(sock)), "split")
    session = ("EHLO t\r\nMAIL FROM:<s@exim-lab.test>\r\nRCPT TO:<u@yahoo.com>\r\n"
               "RCPT TO:<g@gmail.com>\r\nQUIT\r\n")
    try:
        inst.prepare()
        out = inst.host_check(session)
        assert re.search(r"451[- ]4\.7\.1 Deliveries to yahoo\.com are paused", out)
        assert out.count("250 Accepted") == 1  # gmail.com
        server.close()  # daemon down: fail-open
        assert inst.host_check(session).count("250 Accepted") == 2
    finally:
        server.close()
        inst.stop()
