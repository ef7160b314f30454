"""Drain contenders: the MTA set-ups bench/drain.py compares, each on a fresh lab.

Every contender owns a private simulator (Yahoo listener + plain sink for other
domains), its own MTA and — when governed — its own redis-server and governor
processes, so each run starts clean. The set-ups:

* ``postfix_plain``   Postfix with one smtp transport per egress IP (randmap), Debian's
  defaults (destination concurrency 20, no rate delay).
* ``postfix_static``  the recipe operators copy (seed 002): the same per-IP transports with
  ``destination_concurrency_limit = 5`` and ``destination_rate_delay = 1s``. The recipe's
  ``0.4s`` does not exist in Postfix (whole seconds only, docs/postfix-levers.md §1), and
  any non-zero delay serialises the transport, so 1 s — the smallest — is the closest.
* ``postfix_governor`` :class:`governor.demo.PostfixLab` governed: ``postfix-config --apply``
  (slot transports), ``serve``, ``milter``, ``queue-agent``.
* ``exim_governor``   Exim 4.96 with ``governor exim-config``'s snippets and ``governor serve``.
* ``exim_plain``      Exim with one Yahoo transport whose ``interface`` is one of the four
  IPs at random per delivery, immediate delivery, Exim's default parallelism.

:class:`Timing` holds how the run is compressed in time; every contender gets the same.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from governor.demo import Child, LabOptions, PostfixLab, governor_argv, inject
from governor.lab import readsocket

POOL = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
YAHOO_DOMAINS = ("yahoo.com", "aol.com", "att.net", "ymail.com", "sbcglobal.net")
OTHER_DOMAINS = ("example.org", "example.net")
#: governor.yaml ``domains:``: no DNS in the lab, so the AT&T family (Yahoo MX since 2025)
#: is governed explicitly rather than by MX lookup.
GOVERNOR_DOMAINS = "{dns: false, att_family: 'on'}"
NAMES = ("postfix_plain", "postfix_static", "postfix_governor", "exim_governor", "exim_plain")
Messages = Sequence[tuple[int, Sequence[str]]]


@dataclass(frozen=True)
class Timing:
    """How Yahoo's clock and the MTAs' retry timers are compressed (the same for all).

    ``rate_scale``: one "Yahoo minute" lasts ``60 / rate_scale`` s — the simulator's rate
    window and its TSS04 penalty shrink by it, and the governor is told the scaled rate
    (``yahoo_rate × rate_scale`` per real minute). 2.5 because Postfix's rate delay
    is whole seconds: at 250/min its best plan is 4 slots × 1 s = 240/min (96 %), whose
    worst window (4 × (24 + 1) = 100, see ``SlotPlan.worst_minute``) still fits; at 3
    the only plans are 300/min (100 %, one delivery per slot early overshoots a 20 s
    window) and 240/min (80 %).
    ``retry_scale``: MTA retry timers (Postfix's 300 s queue run / backoff, Exim's
    retry rules) are multiplied by it, floored at Postfix's 1 s minimum.
    ``governor_time_scale``: the governor's own hour-long reactions (2 h TSS04 pause)
    in seconds, long enough to outlast the simulator's scaled penalty.
    """

    rate_scale: float = 2.5
    yahoo_rate: int = 100          # messages per Yahoo minute per IP
    yahoo_conn: int = 5
    penalty: float = 60.0          # Yahoo seconds (simulator default)
    ts02_after: int = 20
    ts03_after: int = 50
    retry_scale: float = 1 / 300
    governor_time_scale: float = 0.003

    @property
    def rate_window(self) -> float:
        return 60.0 / self.rate_scale

    @property
    def per_ip_per_second(self) -> float:
        return self.yahoo_rate / self.rate_window

    def sim_settings(self) -> dict[str, Any]:
        return dict(max_conn=self.yahoo_conn, max_rate=self.yahoo_rate, rate_window=self.rate_window,
                    penalty=self.penalty / self.rate_scale, ts02_after=self.ts02_after,
                    ts03_after=self.ts03_after)

    def secs(self, seconds: float) -> str:
        return f"{max(1, round(seconds * self.retry_scale))}s"

    def postfix_timers(self) -> dict[str, str]:
        """Postfix defaults (queue_run_delay / minimal_backoff_time 300 s, maximal 4000 s), scaled."""
        return {"queue_run_delay": self.secs(300), "minimal_backoff_time": self.secs(300),
                "maximal_backoff_time": self.secs(4000)}

    def exim_retry(self) -> str:
        """Debian's exim4 retry rule ``F,2h,15m; G,16h,1h,1.5; F,4d,6h``, scaled."""
        s = self.secs
        return f"*  *  F,{s(7200)},{s(900)}; G,{s(57600)},{s(3600)},1.5; F,{s(345600)},{s(21600)}"

    def describe(self) -> dict[str, Any]:
        return {"yahoo_minute_s": self.rate_window, "rate_scale": self.rate_scale,
                "simulator": self.sim_settings(), "governor_messages_per_minute": self.yahoo_rate * self.rate_scale,
                "governor_time_scale": self.governor_time_scale, "postfix_timers": self.postfix_timers(),
                "exim_retry": self.exim_retry(), "exim_queue_interval": "1s"}


# --------------------------------------------------------------------------- workload
def workload(n: int, other_share: float = 0.2) -> list[tuple[int, list[str]]]:
    """``n`` one-recipient messages with distinct recipients; every ``1/other_share``-th
    to a non-Yahoo domain, the rest spread over the five Yahoo-managed domains."""
    every = round(1 / other_share) if other_share > 0 else 0
    out: list[tuple[int, list[str]]] = []
    yahoo = other = 0
    for i in range(n):
        if every and i % every == every - 1:
            out.append((i, [f"friend{i}@{OTHER_DOMAINS[other % len(OTHER_DOMAINS)]}"]))
            other += 1
        else:
            out.append((i, [f"user{i}@{YAHOO_DOMAINS[yahoo % len(YAHOO_DOMAINS)]}"]))
            yahoo += 1
    return out


def is_yahoo(rcpt: str) -> bool:
    return rcpt.rpartition("@")[2] in YAHOO_DOMAINS


# --------------------------------------------------------------------------- contenders
class Contender:
    """One MTA set-up: ``start()``, ``submit(messages)``, observe through ``sim``, ``stop()``."""

    name = ""
    label = ""

    def __init__(self, timing: Timing, workdir: Path) -> None:
        self.timing = timing
        self.workdir = workdir
        self.sim: Any = None

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, messages: Messages) -> int:
        """Inject over SMTP as fast as the MTA accepts; the number of messages accepted."""
        raise NotImplementedError

    def queued(self) -> int:
        raise NotImplementedError

    def bounced(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _YahooOnlyLab(PostfixLab):
    """PostfixLab whose plain (ungoverned) Postfix sends only the Yahoo domains over the
    per-IP transports (a random one per recipient); other mail goes to the relayhost (sink).
    ``pipemap``: the inline table turns a Yahoo domain into a key the randmap answers."""

    def _postfix(self) -> Any:
        pf = super()._postfix()
        if not self.opts.governed:
            names = ",".join(f"yahoo-ip{i + 1}:{self.nexthop}" for i in range(len(POOL)))
            domains = ", ".join(f"{d}=yahoo" for d in YAHOO_DOMAINS)
            pf.postconf(transport_maps=f"pipemap:{{inline:{{{domains}}}, randmap:{{{names}}}}}")
        return pf


class PostfixContender(Contender):
    """The three Postfix set-ups, all on :class:`governor.demo.PostfixLab`."""

    def __init__(self, name: str, timing: Timing, workdir: Path) -> None:
        super().__init__(timing, workdir)
        self.name = name
        self.label = {"postfix_plain": "plain Postfix (Debian defaults)",
                      "postfix_static": "static recipe (conc 5, rate_delay 1s)",
                      "postfix_governor": "Postfix + governor"}[name]
        t = timing
        opts = LabOptions(sim_conn=t.yahoo_conn, sim_rate=t.yahoo_rate, sim_penalty=t.penalty / t.rate_scale,
                          sim_ts02_after=t.ts02_after, sim_ts03_after=t.ts03_after,
                          sim_extra={"rate_window": t.rate_window}, postfix_main=t.postfix_timers(),
                          governed=name == "postfix_governor", time_scale=t.governor_time_scale,
                          rate=t.yahoo_rate * t.rate_scale, concurrency=t.yahoo_conn,
                          domains_yaml=GOVERNOR_DOMAINS)
        if name == "postfix_static":
            opts.transport_qmgr = {"destination_concurrency_limit": str(t.yahoo_conn),
                                   "destination_rate_delay": "1s"}
        self.lab = _YahooOnlyLab(workdir, opts)

    def start(self) -> None:
        self.lab.start()
        self.sim = self.lab.sim

    def submit(self, messages: Messages) -> int:
        assert self.lab.pf is not None
        outcomes = inject(self.lab.pf.smtpd_port, messages, connections=8)
        return sum(1 for o in outcomes if o.accepted)

    def queued(self) -> int:
        return len(self.lab.pf.queue()) if self.lab.pf else 0

    def bounced(self) -> int:
        log = self.lab.pf.log_text() if self.lab.pf else ""
        return log.count("status=bounced") + log.count("status=expired")

    def stop(self) -> None:
        self.lab.stop()


def exim_governor_yaml(redis_url: str, sock: Path, timing: Timing) -> str:
    """governor.yaml for the governed Exim: four egress IPs at Yahoo's (scaled) limits."""
    pool = "\n".join(f"  - {{ip: {ip}, name: yahoo-ip{i + 1}}}" for i, ip in enumerate(POOL))
    return (
        f"time_scale: {timing.governor_time_scale}\n"
        f"redis: {{url: '{redis_url}', socket_timeout: 0.5, connect_timeout: 0.5}}\n"
        f"pool:\n{pool}\n"
        f"limits:\n  per_ip: {{concurrency: {timing.yahoo_conn}, "
        f"messages_per_minute: {timing.yahoo_rate * timing.rate_scale:g}, burst: 0, messages_per_connection: 20}}\n"
        f"sockets: {{exim: {sock}, mode: '0666'}}\n"
        "exim: {wait: 5s, readsocket_timeout: 7}\n"
        f"domains: {GOVERNOR_DOMAINS}\n"
        "metrics: {listen: null}\n"
        "logging: {syslog: false, stderr: true, level: info}\n"
    )


def _exim_answers(sock: Path) -> bool:
    with contextlib.suppress(OSError):
        return readsocket(sock, "held yahoo.com", timeout=2).startswith("OK")
    return False


class EximContender(Contender):
    """Exim, governed (generated snippets + ``governor serve``) or plain."""

    def __init__(self, name: str, timing: Timing, workdir: Path) -> None:
        super().__init__(timing, workdir)
        self.name = name
        self.governed = name == "exim_governor"
        self.label = "Exim + governor" if self.governed else "plain Exim (Debian-like)"
        self.redis: Any = None
        self.serve: Child | None = None
        self.inst: Any = None

    def start(self) -> None:
        from governor.sim import SimProcess, ephemeral_settings
        from governor.sim.settings import Endpoint

        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        try:
            self.sim = SimProcess(ephemeral_settings(sink=(Endpoint("127.0.0.1", 0),),
                                                     **self.timing.sim_settings())).start()
            self.inst = self._governed() if self.governed else self._plain()
            self.inst.start()
        except BaseException:
            self.stop()
            raise

    def _governed(self) -> Any:
        from governor.config import load_config_text
        from governor.exim_setup import setup_from_config
        from governor.lab.exim import EximConfig, EximInstance, GovernedEximConfig
        from governor.redisproc import RedisProc

        self.redis = RedisProc(workdir=self.workdir / "redis").start()
        sock = self.workdir / "gov.sock"
        text = exim_governor_yaml(self.redis.url, sock, self.timing)
        cfg_path = self.workdir / "governor.yaml"
        cfg_path.write_text(text)
        cfg = load_config_text(text, str(cfg_path))
        self.serve = Child("serve", governor_argv("-c", str(cfg_path), "serve", "--foreground"),
                           self.workdir / "serve.log").start(lambda: _exim_answers(sock))
        host, port = self.sim.addresses[0]
        setup = setup_from_config(cfg, route_list=f"* {host}::{port} byname", route_self="send")
        # Yahoo mail waits for the queue runners (which ask the governor); other mail is
        # delivered at once, as Exim does by default for every message.
        base = EximConfig(sink_port=self.sim.sink_addresses[0][1], queue_run_max=12, remote_max_parallel=1,
                          acl_smtp_rcpt="acl_yahoo_governor_check_rcpt", retry_rules=self.timing.exim_retry(),
                          main_extra="queue_domains = +yahoo_governor_domains\n"
                                     "smtp_accept_queue_per_connection = 0")
        return EximInstance(self.workdir / "exim", config_text=GovernedEximConfig(setup, base), queue_interval="1s")

    def _plain(self) -> Any:
        from governor.lab.exim import EximConfig, EximInstance

        host, port = self.sim.addresses[0]
        ips = ":".join(POOL)
        router = ("yahoo_route:\ndriver = manualroute\n"
                  f"domains = {' : '.join(YAHOO_DOMAINS)}\ntransport = yahoo_smtp\n"
                  f"route_list = * {host}::{port} byname\nself = send")
        transport = ("yahoo_smtp:\ndriver = smtp\nhosts_try_fastopen = :\n"
                     f"interface = ${{extract{{${{eval:1+${{randint:{len(POOL)}}}}}}}{{:}}{{{ips}}}}}")
        base = EximConfig(sink_port=self.sim.sink_addresses[0][1], routers_before=router,
                          transports_extra=transport, retry_rules=self.timing.exim_retry(),
                          remote_max_parallel=4, queue_run_max=5)
        return EximInstance(self.workdir / "exim", config_text=base, queue_interval="1s")

    def submit(self, messages: Messages) -> int:
        rcpts = [list(r) for _, r in messages]
        ids = self.inst.inject(len(rcpts), to=lambda i: rcpts[i], connections=8, timeout=600)
        return len(ids)

    def queued(self) -> int:
        return self.inst.queue_count() if self.inst else 0

    def bounced(self) -> int:
        if self.inst is None:
            return 0
        return len(re.findall(r"^\S+ \S+ (?:\[\d+\] )?\S+ \*\* ", self.inst.read_mainlog(), re.M))

    def stop(self) -> None:
        for step in (lambda: self.inst and self.inst.stop(), lambda: self.serve and self.serve.stop(),
                     lambda: self.sim and self.sim.close(), lambda: self.redis and self.redis.stop()):
            with contextlib.suppress(Exception):
                step()


def make(name: str, timing: Timing, workdir: Path) -> Contender:
    """The contender called ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown contender {name!r} (known: {', '.join(NAMES)})")
    if name.startswith("postfix"):
        return PostfixContender(name, timing, workdir)
    return EximContender(name, timing, workdir)


def problem(name: str) -> str | None:
    """Why contender ``name`` cannot run here (None: it can)."""
    from governor.demo import postfix_lab_problem
    from governor.lab.exim import lab_unavailable

    if name.startswith("postfix"):
        return postfix_lab_problem()
    return lab_unavailable()


# --------------------------------------------------------------------------- one run
@dataclass
class Run:
    """What one contender did: the delivered-over-time curve and the simulator's final stats."""

    name: str
    label: str
    want: tuple[int, int]
    accepted: int = 0
    inject_s: float = 0.0
    curve: list[tuple[float, int, int]] = field(default_factory=list)   # (s since start, yahoo, other)
    stats: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0
    queued: int = 0
    bounced: int = 0
    timed_out: bool = False
    error: str = ""


def _counts(sim: Any) -> tuple[int, int]:
    st = sim.stats(include_times=False)
    return sum(ip["recipients"] for ip in st["ips"].values()), st["sink"]["total"]["recipients"]


class _Sampler:
    """Samples the delivered counts while the (blocking) injection runs, so the curve
    shows what the MTA delivered during intake too."""

    def __init__(self, sim: Any, run: Run, poll: float) -> None:
        import threading

        self.sim, self.run, self.poll = sim, run, poll
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="drain-sampler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)

    def _loop(self) -> None:
        while not self.done.wait(self.poll):
            with contextlib.suppress(Exception):
                y, o = _counts(self.sim)
                self.run.curve.append((round(time.time() - self.run.t0, 3), y, o))


def drain(c: Contender, messages: Messages, *, limit: float, block: str | None = None,
          poll: float = 0.25, settle: float = 3.0) -> Run:
    """Start ``c``, (block one IP), inject, sample until all delivered or ``limit`` s, stop."""
    want = (sum(1 for _, r in messages if is_yahoo(r[0])), sum(1 for _, r in messages if not is_yahoo(r[0])))
    run = Run(c.name, c.label, want)
    c.start()
    try:
        if block:
            c.sim.block(block)
        run.t0 = time.time()
        sampler = _Sampler(c.sim, run, poll)
        sampler.start()
        try:
            run.accepted = c.submit(messages)
        finally:
            sampler.stop()
        run.inject_s = time.time() - run.t0
        while True:
            y, o = _counts(c.sim)
            now = time.time() - run.t0
            run.curve.append((round(now, 3), y, o))
            if y >= want[0] and o >= want[1]:
                break
            if now > limit:
                run.timed_out = True
                break
            time.sleep(poll)
        if not run.timed_out:
            time.sleep(min(settle, 1.0))
        run.stats = c.sim.stats(include_times=True)
        deadline = time.monotonic() + settle
        run.queued = c.queued()
        while run.queued and not run.timed_out and time.monotonic() < deadline:
            time.sleep(0.2)
            run.queued = c.queued()
        run.bounced = c.bounced()
    except Exception as exc:  # noqa: BLE001 - one failed contender must not end the benchmark
        run.error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            run.stats = c.sim.stats(include_times=True)
    finally:
        c.stop()
    return run


def fresh_workdir(name: str) -> Path:
    """A /tmp directory Postfix and Debian-exim can traverse."""
    path = Path(tempfile.mkdtemp(prefix=f"gdrain-{name}-", dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
