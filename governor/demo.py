"""The demo: real Postfix delivering to a simulated Yahoo, blind versus governed.

Everything runs on loopback and is private to the demo: a throwaway redis-server,
the Yahoo MX simulator (127.0.0.1, with a plain sink for other domains), and a
private Postfix whose four egress IPs are 127.0.0.2–127.0.0.5.

1. **Blind**: Postfix as installed — one smtp transport per IP, Debian's default
   concurrency (20 per destination), no governor. The simulator allows 5 connections
   and ``sim_rate`` messages a minute per IP and answers the rest with TSS04, which
   Postfix retries at once: the deferrals pile up.
2. **Governed**: the same Postfix finished by ``governor postfix-config --apply``,
   with ``governor serve`` (transport map + status filter), ``governor milter`` and
   ``governor queue-agent``. A few thousand messages, Yahoo recipients mixed with
   other domains, drain at the pace Yahoo tolerates. Midway "Yahoo" throttles one IP
   (TSS04: it cools down, its queued mail is held and re-routed, it ramps back) and
   blocks another (TS03: it stays held until an admin releases it, its traffic fails
   over).

The summary compares what the simulator saw from each, and shows delivered counts,
deferrals by code, held/released mail and the drain time against the ideal.

This module also holds the governed Postfix lab (:class:`PostfixLab`) that the demo,
the end-to-end tests (tests/e2e/conftest.py) and bench/postfix_overhead.py share.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import socket as _socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
from rich.console import Console
from rich.table import Table

from governor.classify import classify
from governor.config import Config
from governor.lab.postfix import PostfixInstance
from governor.redisproc import RedisProc
from governor.sim import SimProcess, ephemeral_settings
from governor.sim.settings import Endpoint

POOL = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
YAHOO_DOMAINS = ("yahoo.com", "aol.com", "ymail.com", "rocketmail.com", "yahoo.co.uk")
OTHER_DOMAINS = ("example.org", "example.net")


# =========================================================================== governed Postfix lab
CLI_MODULES = ("governor.cli.postfix_cmds", "governor.cli.serve_cmd")
_LAUNCH = (
    "import importlib, sys\n"
    "for m in {modules!r}:\n"
    "    try:\n        importlib.import_module(m)\n"
    "    except ImportError:\n        pass\n"
    "from governor.cli import main\n"
    "main(prog_name='governor')\n"
)


def have_serve() -> bool:
    """True when `governor serve` exists (governor/cli/serve_cmd.py)."""
    return importlib.util.find_spec("governor.cli.serve_cmd") is not None


def postfix_lab_problem(standin: bool = False) -> str | None:
    """Why a governed Postfix lab cannot run here (None: it can). ``standin``: the
    caller can stand in for `governor serve` itself."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    if shutil.which("postfix") is None:
        return "postfix is not installed (scripts/setup.sh)"
    if not (have_serve() or standin):
        return ("governor serve not available (governor/cli/serve_cmd.py); "
                "GOVERNOR_E2E_STANDIN=1 runs the tests' socketmap stand-in")
    return None


def governor_argv(*args: str) -> list[str]:
    """argv that runs ``governor ARGS`` in this interpreter, with every command module loaded."""
    return [sys.executable, "-c", _LAUNCH.format(modules=CLI_MODULES), *args]


def governor_yaml(*, redis_url: str, workdir: Path, nexthop: str, postfix_dir: Path, pool: Sequence[str] = POOL,
                  redis_down: str = "fail-open", holds_action: str = "hold", time_scale: float = 0.001,
                  rate: float = 300, concurrency: int = 5, extra: str = "",
                  domains: str = "{dns: false}") -> str:
    """governor.yaml for a lab: loopback egress IPs, sockets in ``workdir``, Yahoo's hours
    in seconds (``time_scale``), no DNS (the domain list decides)."""
    gov = workdir / "gov"
    ips = "\n".join(f"  - {{ip: {ip}, name: yahoo-ip{i + 1}}}" for i, ip in enumerate(pool))
    return (
        f"time_scale: {time_scale}\n"
        f"redis_down: {redis_down}\n"
        f"redis: {{url: '{redis_url}', prefix: lab, socket_timeout: 0.5, connect_timeout: 0.5}}\n"
        f"pool:\n{ips}\n"
        f"limits: {{per_ip: {{concurrency: {concurrency}, messages_per_minute: {rate}, burst: 0, "
        f"messages_per_connection: 20}}}}\n"
        f"domains: {domains}\n"
        f"holds: {{action: {holds_action}}}\n"
        f"sockets: {{socketmap: 'unix:{gov}/socketmap.sock', milter: 'unix:{gov}/milter.sock', "
        f"exim: '{gov}/exim.sock', group: postfix, mode: '0660'}}\n"
        f"postfix: {{config_directory: '{postfix_dir}', nexthop: '{nexthop}'}}\n"
        f"metrics: {{listen: null}}\n"
        f"logging: {{syslog: false, stderr: true}}\n"
        f"{extra}"
    )


class GovernedPostfix(PostfixInstance):
    """A lab Postfix whose configuration is finished by ``governor postfix-config --apply``
    every time it is written (so ``start()`` runs the real command on the real files)."""

    def __init__(self, workdir: Path, governor_config: Path, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.governor_config = governor_config
        self.applied = ""

    def write_config(self) -> None:
        super().write_config()
        proc = subprocess.run(governor_argv("-c", str(self.governor_config), "postfix-config", "--apply",
                                            "--config-directory", str(self.config_dir)),
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"governor postfix-config --apply failed: {proc.stderr.strip()}")
        self.applied = proc.stdout


class Child:
    """A governor subprocess with its own log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool] | None = None, timeout: float = 20.0) -> Child:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready is not None and not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def socketmap_answers(path: str, key: str, timeout: float = 2.0) -> str | None:
    """One socketmap(5) request; the reply text, or None when the server does not answer."""
    data = key.encode()
    try:
        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"%d:%s," % (len(data), data))
            reply = b""
            while not reply.endswith(b","):
                chunk = s.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return reply.split(b":", 1)[1][:-1].decode(errors="replace")


@dataclass
class LabOptions:
    """What differs between lab runs."""

    redis_down: str = "fail-open"
    holds_action: str = "hold"
    time_scale: float = 0.001
    rate: float = 300
    concurrency: int = 5
    sim_rate: int = 300
    sim_conn: int = 5
    sim_penalty: float = 2.0
    sim_ts02_after: int = 1000   # the tests want no escalation; the demo's blind run does
    sim_ts03_after: int = 2000
    governed: bool = True      # False: plain per-IP transports, no governor at all
    milter: bool = True
    agent: bool = True
    extra_yaml: str = ""
    postfix_main: dict[str, str] = field(default_factory=dict)
    sim_extra: dict[str, Any] = field(default_factory=dict)         # more simulator settings (rate_window …)
    transport_qmgr: dict[str, str] = field(default_factory=dict)    # plain runs: per-IP transport qmgr settings
    domains_yaml: str = "{dns: false}"                               # governor.yaml's domains: mapping


class PostfixLab:
    """Everything a governed Postfix needs, private and on loopback; a context manager."""

    def __init__(self, workdir: Path | None = None, options: LabOptions | None = None) -> None:
        self.opts = options or LabOptions()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gpl-", dir="/tmp"))
        self._own_workdir = workdir is None
        self.redis: RedisProc | None = None
        self.sim: SimProcess | None = None
        self.pf: PostfixInstance | None = None
        self.children: dict[str, Child] = {}
        self.config_path = self.workdir / "governor.yaml"
        self.cfg: Config | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostfixLab:
        os.chmod(self.workdir, 0o755)
        try:
            self.redis = RedisProc(workdir=self.workdir / "redis").start()
            self.sim = SimProcess(ephemeral_settings(
                sink=(Endpoint("127.0.0.1", 0),), max_conn=self.opts.sim_conn, max_rate=self.opts.sim_rate,
                penalty=self.opts.sim_penalty, ts02_after=self.opts.sim_ts02_after,
                ts03_after=self.opts.sim_ts03_after, **self.opts.sim_extra)).start()
            self._write_config()
            if self.opts.governed:
                self.start_serve()
                if self.opts.milter:
                    self.start_milter()
            self.pf = self._postfix().start()
            if self.opts.governed and self.opts.agent:
                self.start_agent()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        from governor.config import load_config

        (self.workdir / "gov").mkdir(exist_ok=True)
        shutil.chown(self.workdir / "gov", group="postfix")
        os.chmod(self.workdir / "gov", 0o2750)
        assert self.redis is not None
        self.config_path.write_text(governor_yaml(
            redis_url=self.redis.url, workdir=self.workdir, nexthop=self.nexthop,
            postfix_dir=self.workdir / "pf" / "etc", redis_down=self.opts.redis_down,
            holds_action=self.opts.holds_action, time_scale=self.opts.time_scale, rate=self.opts.rate,
            concurrency=self.opts.concurrency, extra=self.opts.extra_yaml, domains=self.opts.domains_yaml))
        self.cfg = load_config(self.config_path)

    def _postfix(self) -> PostfixInstance:
        main_cf = {"relayhost": self.sink_nexthop, **self.opts.postfix_main}
        if self.opts.governed:
            return GovernedPostfix(self.workdir / "pf", self.config_path, main_cf=main_cf)
        pf = PostfixInstance(self.workdir / "pf", main_cf=main_cf)
        names = []
        for i, ip in enumerate(POOL):
            names.append(pf.add_smtp_transport(f"yahoo-ip{i + 1}", bind_address=ip,
                                               qmgr=self.opts.transport_qmgr or None))
        pf.postconf(transport_maps="randmap:{" + ",".join(f"{n}:{self.nexthop}" for n in names) + "}")
        return pf

    def start_serve(self) -> Child:
        assert self.cfg is not None
        path = self.cfg.sockets.socketmap.removeprefix("unix:")
        child = Child("serve", governor_argv("-c", str(self.config_path), "serve", "--foreground"),
                      self.workdir / "serve.log")
        self.children["serve"] = child.start(lambda: socketmap_answers(path, "transport *") is not None)
        return child

    def start_milter(self) -> Child:
        assert self.cfg is not None
        path = Path(self.cfg.sockets.milter.removeprefix("unix:"))
        child = Child("milter", governor_argv("-c", str(self.config_path), "milter"), self.workdir / "milter.log")
        self.children["milter"] = child.start(lambda: path.is_socket() and path.stat().st_mode & 0o060 == 0o060)
        return child

    def start_agent(self) -> Child:
        child = Child("queue-agent", governor_argv("-c", str(self.config_path), "queue-agent", "--mta", "postfix"),
                      self.workdir / "queue-agent.log")
        self.children["queue-agent"] = child.start()
        return child

    def stop(self) -> None:
        """Queue agent first, then Postfix (its smtpd processes hold milter connections
        that libmilter would wait for), then the milter, serve, the simulator and Redis."""
        if "queue-agent" in self.children:
            self.children["queue-agent"].stop()
        if self.pf is not None:
            try:
                self.pf.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        for name in ("milter", "serve"):
            if name in self.children:
                self.children[name].stop()
        if self.sim is not None:
            self.sim.close()
        if self.redis is not None:
            self.redis.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostfixLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ addresses
    @property
    def nexthop(self) -> str:
        assert self.sim is not None
        host, port = self.sim.addresses[0]
        return f"[{host}]:{port}"

    @property
    def sink_nexthop(self) -> str:
        assert self.sim is not None
        host, port = self.sim.sink_addresses[0]
        return f"[{host}]:{port}"

    # ------------------------------------------------------------------ observing
    def store(self) -> Any:
        from governor.store import Store

        assert self.cfg is not None
        return Store.connect(self.cfg)

    def delivered(self) -> tuple[int, int]:
        """(Yahoo recipients the simulator accepted, other recipients the sink accepted)."""
        assert self.sim is not None
        stats = self.sim.stats(include_times=False)
        return (sum(ip["recipients"] for ip in stats["ips"].values()), stats["sink"]["total"]["recipients"])

    def wait_delivered(self, yahoo: int, other: int = 0, timeout: float = 120.0,
                       tick: Callable[[], None] | None = None) -> float:
        """Seconds until the simulator and the sink saw at least that many recipients."""
        start = time.monotonic()
        while True:
            got = self.delivered()
            if got[0] >= yahoo and got[1] >= other:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"delivered {got} of {(yahoo, other)} after {timeout}s; "
                                   f"queue: {len(self.pf.queue()) if self.pf else '?'}")
            if tick is not None:
                tick()
            time.sleep(0.1)

    def logs(self) -> str:
        """Every child's log and the Postfix maillog tail (for failure messages)."""
        parts = [f"--- {c.name} ---\n{c.log_text()[-4000:]}" for c in self.children.values()]
        if self.pf is not None:
            parts.append(f"--- maillog ---\n{self.pf.log_text()[-4000:]}")
        return "\n".join(parts)


# --------------------------------------------------------------------------- injection
@dataclass
class Outcome:
    """What smtpd answered for one message: accepted recipients, refused ones with replies."""

    seq: int
    accepted: list[str]
    refused: dict[str, str]
    queue_id: str | None = None
    error: str = ""


async def _inject_async(port: int, messages: Sequence[tuple[int, Sequence[str]]], connections: int,
                        sender: str) -> list[Outcome]:
    todo = list(reversed(messages))
    out: list[Outcome] = []

    async def worker() -> None:
        client: aiosmtplib.SMTP | None = None
        while todo:
            seq, rcpts = todo.pop()
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False,
                                         local_hostname="inject.lab.test")
                await client.connect()
            out.append(await _send(client, seq, list(rcpts), sender))
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()

    await asyncio.gather(*(worker() for _ in range(max(1, min(connections, len(messages))))))
    return sorted(out, key=lambda o: o.seq)


async def _send(client: Any, seq: int, rcpts: list[str], sender: str) -> Outcome:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = f"lab #{seq}"
    msg["X-Lab-Seq"] = str(seq)
    msg.set_content("hello from the governed Postfix lab\n")
    try:
        refused, reply = await client.sendmail(sender, rcpts, msg.as_bytes())
    except aiosmtplib.SMTPRecipientsRefused as exc:
        await _rset(client)
        return Outcome(seq, [], {e.recipient: f"{e.code} {e.message}" for e in exc.recipients})
    except aiosmtplib.SMTPResponseException as exc:
        await _rset(client)
        return Outcome(seq, [], {}, error=f"{exc.code} {exc.message}")
    except (aiosmtplib.SMTPException, OSError) as exc:
        client.close()
        return Outcome(seq, [], {}, error=f"{type(exc).__name__}: {exc}")
    bad = {k: f"{v.code} {v.message}" for k, v in refused.items()}
    qid = reply.split("queued as ")[-1].strip() if "queued as" in reply else None
    return Outcome(seq, [r for r in rcpts if r not in bad], bad, qid)


async def _rset(client: Any) -> None:
    try:
        await client.rset()
    except Exception:  # noqa: BLE001 - the next message reconnects
        client.close()


def inject(port: int, messages: Sequence[tuple[int, Sequence[str]]], *, connections: int = 8,
           sender: str = "newsletter@lab.governor.test") -> list[Outcome]:
    """Send each (seq, recipients) as one message over ``connections`` SMTP sessions."""
    return asyncio.run(_inject_async(port, messages, connections, sender))


def yahoo_recipients(n: int, start: int = 0, tag: str = "u") -> list[tuple[int, list[str]]]:
    """``n`` one-recipient messages with distinct Yahoo-managed recipients (distinct
    recipients matter: qmgr caches the last (sender, recipient) answer for 30 s)."""
    domains = ("yahoo.com", "aol.com", "ymail.com", "rocketmail.com", "yahoo.co.uk")
    return [(i, [f"{tag}{i}@{domains[i % len(domains)]}"]) for i in range(start, start + n)]




# =========================================================================== the demo
@dataclass
class Options:
    messages: int = 2000          # governed run: messages injected (Yahoo and others)
    yahoo_share: float = 0.8      # share of them addressed to Yahoo-managed domains
    rate: float = 300.0           # per IP per minute, what the governor allows
    sim_rate: int = 300           # per IP per minute, what "Yahoo" tolerates
    blind_seconds: float = 10.0   # how long the blind Postfix is watched
    events: bool = True           # throttle one IP and block another midway
    deadline: float = 600.0


def demo_messages(n: int, yahoo_share: float) -> list[tuple[int, list[str]]]:
    """One recipient each; every ``1/(1-share)``-th one to another domain."""
    every = round(1 / (1 - yahoo_share)) if yahoo_share < 1 else 0
    out = []
    for i in range(n):
        if every and i % every == every - 1:
            out.append((i, [f"friend{i}@{OTHER_DOMAINS[i % len(OTHER_DOMAINS)]}"]))
        else:
            out.append((i, [f"user{i}@{YAHOO_DOMAINS[i % len(YAHOO_DOMAINS)]}"]))
    return out


@dataclass
class Watch:
    """What the governed run saw while it drained."""

    started: float = 0.0
    finished: float = 0.0
    events: list[str] = field(default_factory=list)
    throttled: str = POOL[1]
    blocked: str = POOL[3]


def _ip_word(s: Any) -> str:
    if s.held:
        return "HELD"
    if s.cooling:
        return f"cool {max(0.0, s.cooldown_until - s.now):.0f}s"
    if s.rate_factor < 0.999:
        return f"ramp {s.rate_factor:.0%}"
    return "ok"


def _progress(console: Console, lab: PostfixLab, store: Any, want: tuple[int, int], t0: float) -> None:
    got = lab.delivered()
    queue = Counter(m["queue_name"] for m in lab.pf.queue()) if lab.pf else Counter()
    states = "  ".join(f".{s.ip.rsplit('.', 1)[1]}:{_ip_word(s)}" for s in store.status())
    console.print(f"  {time.monotonic() - t0:5.1f}s  Yahoo {got[0]:5d}/{want[0]}  other {got[1]:4d}/{want[1]}  "
                  f"queue: {queue['active']:4d} active {queue['deferred']:3d} deferred {queue['hold']:3d} held"
                  f"   {states}", soft_wrap=True)


def _events(lab: PostfixLab, store: Any, watch: Watch, console: Console, want: int) -> Callable[[], None]:
    """Midway events: TSS04 on one IP at 30 % of the Yahoo mail, TS03 on another at 55 %."""
    assert lab.sim is not None
    done: set[str] = set()

    def tick() -> None:
        yahoo = lab.delivered()[0]
        if "tss04" not in done and yahoo >= 0.3 * want:
            done.add("tss04")
            lab.sim.limit(watch.throttled, "max_rate", 1)
            watch.events.append(f"Yahoo throttles {watch.throttled} (TSS04)")
            console.print(f"[yellow]  Yahoo throttles {watch.throttled}: TSS04 at its next MAIL FROM[/]")
        elif "tss04" in done and "forgive" not in done and any(
                s.ip == watch.throttled and s.cooling for s in store.status()):
            done.add("forgive")
            lab.sim.unlimit(watch.throttled)
            lab.sim.reset_ip(watch.throttled)
        if "ts03" not in done and yahoo >= 0.55 * want:
            done.add("ts03")
            lab.sim.block(watch.blocked)
            watch.events.append(f"Yahoo blocks {watch.blocked} (TS03 at connect)")
            console.print(f"[yellow]  Yahoo blocks {watch.blocked}: TS03 at its next connection[/]")

    return tick


def blind_run(opts: Options, console: Console) -> dict[str, Any]:
    """Postfix without the governor for ``blind_seconds``; the simulator's per-IP view."""
    with PostfixLab(options=LabOptions(governed=False, sim_rate=opts.sim_rate, sim_penalty=60.0,
                                       sim_ts02_after=20, sim_ts03_after=50)) as lab:
        assert lab.pf is not None and lab.sim is not None
        n = int(opts.blind_seconds * len(POOL) * opts.sim_rate / 60 * 2)
        inject(lab.pf.smtpd_port, yahoo_recipients(n, tag="blind"), connections=8)
        time.sleep(opts.blind_seconds)
        stats = lab.sim.stats(include_times=False)
    return stats


def governed_run(opts: Options, console: Console) -> tuple[PostfixLab, dict[str, Any], Watch, dict[str, int]]:
    """Drain ``messages`` through the governed Postfix; returns the finished lab (stopped)."""
    msgs = demo_messages(opts.messages, opts.yahoo_share)
    want = (sum(1 for _, r in msgs if _is_yahoo(r[0])), sum(1 for _, r in msgs if not _is_yahoo(r[0])))
    lab = PostfixLab(options=LabOptions(rate=opts.rate, sim_rate=opts.sim_rate, time_scale=0.001))
    watch = Watch()
    lab.start()
    try:
        assert lab.pf is not None and lab.sim is not None
        store = lab.store()
        console.print(f"Postfix configured by `governor postfix-config --apply`: {lab.pf.applied.strip()}",
                      soft_wrap=True)
        watch.started = time.monotonic()
        inject(lab.pf.smtpd_port, msgs, connections=8)
        console.print(f"injected {len(msgs)} messages in {time.monotonic() - watch.started:.1f}s "
                      f"({want[0]} to Yahoo domains, {want[1]} to others)")
        tick = _events(lab, store, watch, console, want[0]) if opts.events else None
        last = 0.0

        def on_tick() -> None:
            nonlocal last
            if tick is not None:
                tick()
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                _progress(console, lab, store, want, watch.started)

        lab.wait_delivered(*want, timeout=opts.deadline, tick=on_tick)
        watch.finished = time.monotonic()
        _progress(console, lab, store, want, watch.started)
        stats = lab.sim.stats(include_times=False)
        status = {s.ip: s for s in store.status()}
        stats["governor"] = status
        store.close()
    finally:
        lab.stop()
    counts = agent_counts(lab)
    return lab, stats, watch, counts


def _is_yahoo(rcpt: str) -> bool:
    return rcpt.rpartition("@")[2] in YAHOO_DOMAINS


def agent_counts(lab: PostfixLab) -> dict[str, int]:
    """The queue agent's final counters (it logs them when it stops)."""
    child = lab.children.get("queue-agent")
    lines = [ln for ln in (child.log_text() if child else "").splitlines() if "scans=" in ln]
    found = re.findall(r"\b(held|released|deadline_released|scans)=(\d+)", lines[-1] if lines else "")
    return {k: int(v) for k, v in found}


def deferrals_by_code(lab: PostfixLab) -> Counter[str]:
    """Deferred delivery attempts of the slot transports, by reply code (from the maillog)."""
    out: Counter[str] = Counter()
    if lab.pf is None:
        return out
    for line in lab.pf.log_text().splitlines():
        m = re.search(r"postfix/yahoo-ip\d+-s\d+/smtp\[\d+\]: .* status=deferred \((.*)\)$", line)
        if m:
            c = classify(m.group(1))
            out[c.code or "other"] += 1
    return out


def _ip_table(stats: dict[str, Any], watch: Watch) -> Table:
    table = Table(title="governed Postfix: per egress IP (as the simulated Yahoo saw it)", title_justify="left")
    for col in ("egress IP", "delivered", "TSS04", "TS03", "max conc.", "governor state at the end"):
        table.add_column(col, justify="left" if col in ("egress IP", "governor state at the end") else "right")
    for ip in POOL:
        s = stats["ips"].get(ip, {"accepted": 0, "replies": {}, "concurrency_hwm": 0})
        st = stats["governor"][ip]
        state = _ip_word(st)
        if st.held:
            state = f"HELD ({st.held_reason}) until an admin releases it"
        table.add_row(ip, str(s["accepted"]), str(s["replies"].get("TSS04", 0)), str(s["replies"].get("TS03", 0)),
                      str(s["concurrency_hwm"]), state)
    return table


def _contrast(blind: dict[str, Any], governed: dict[str, Any], opts: Options, watch: Watch) -> Table:
    table = Table(title="blind vs governed (as the simulated Yahoo saw it)", title_justify="left")
    for col in ("Postfix", "seconds", "delivered", "TSS04", "TS02", "TS03", "max conc. per IP"):
        table.add_column(col)

    def row(name: str, stats: dict[str, Any], seconds: float) -> None:
        replies: Counter[str] = Counter()
        for s in stats["ips"].values():
            replies.update(s["replies"])
        table.add_row(name, f"{seconds:.1f}", str(stats["total"]["accepted"]), str(replies["TSS04"]),
                      str(replies["TS02"]), str(replies["TS03"]),
                      str(max((s["concurrency_hwm"] for s in stats["ips"].values()), default=0)))

    row("blind: Debian defaults, 4 IPs", blind, opts.blind_seconds)
    row("governed: 4 IPs, 2 incidents", governed, watch.finished - watch.started)
    return table


def _summary(lab: PostfixLab, stats: dict[str, Any], watch: Watch, counts: dict[str, int], opts: Options) -> Table:
    yahoo = sum(s["recipients"] for s in stats["ips"].values())
    other = stats["sink"]["total"]["recipients"]
    msgs = demo_messages(opts.messages, opts.yahoo_share)
    want_yahoo = sum(1 for _, r in msgs if _is_yahoo(r[0]))
    ideal = want_yahoo / (len(POOL) * min(opts.rate, opts.sim_rate) / 60)
    took = watch.finished - watch.started
    codes = deferrals_by_code(lab)
    table = Table(title="summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("delivered", f"{yahoo}/{want_yahoo} Yahoo, {other}/{len(msgs) - want_yahoo} other")
    table.add_row("deferred by code", ", ".join(f"{k} {v}" for k, v in codes.most_common()) or "none")
    table.add_row("held / released", f"{counts.get('held', 0)} held, {counts.get('released', 0)} released "
                                     f"(paced), {counts.get('deadline_released', 0)} at the deadline")
    table.add_row("time vs ideal", f"{took:.1f}s vs {ideal:.1f}s with all 4 IPs all the time "
                                   f"({took / ideal:.2f}x; one IP cooled down, one was blocked)"
                  if opts.events else f"{took:.1f}s vs {ideal:.1f}s ({took / ideal:.2f}x)")
    table.add_row("incidents", "; ".join(watch.events) or "none")
    return table


def run(opts: Options | None = None, console: Console | None = None) -> int:
    """Run the whole demo; returns the process exit status (0: every message delivered)."""
    opts = opts or Options()
    console = console or Console()
    problem = postfix_lab_problem()
    if problem:
        console.print(f"[red]governor demo: {problem}[/]")
        return 1
    console.rule("1. Postfix as installed: no governor")
    blind = blind_run(opts, console)
    replies: Counter[str] = Counter()
    for s in blind["ips"].values():
        replies.update(s["replies"])
    console.print(f"in {opts.blind_seconds:.0f}s: {blind['total']['accepted']} delivered, {replies['TSS04']} TSS04, "
                  f"{replies['TS02']} TS02, {replies['TS03']} TS03 (up to "
                  f"{max((s['concurrency_hwm'] for s in blind['ips'].values()), default=0)} connections per IP)")
    console.rule("2. the same Postfix, governed")
    lab, stats, watch, counts = governed_run(opts, console)
    try:
        console.print(_ip_table(stats, watch))
        console.print(_contrast(blind, stats, opts, watch))
        console.print(_summary(lab, stats, watch, counts, opts))
        yahoo = sum(s["recipients"] for s in stats["ips"].values())
        other = stats["sink"]["total"]["recipients"]
        lost = opts.messages - yahoo - other
        console.print(f"governed: {yahoo + other}/{opts.messages} delivered in {watch.finished - watch.started:.1f}s, "
                      f"{lost} not delivered (nothing is ever dropped)")
        return 0 if lost == 0 else 1
    finally:
        lab.cleanup()
