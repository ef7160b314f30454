"""A private, throwaway Exim 4.96 instance for the e2e tests, the demo and the benchmarks.

Exim is not installed as a package on the lab machine: ``scripts/setup.sh`` extracts
Debian's binary into ``.lab/exim-root`` (Exim and Postfix conflict as packages).
Everything an instance needs lives in one work directory:

    <workdir>/exim.conf   monolithic config, root:root 0644 (Exim refuses other owners/modes)
    <workdir>/spool/      Debian-exim 0750 (the daemon drops to Debian-exim and writes here)
    <workdir>/log/        Debian-exim 0750; Exim creates mainlog/paniclog/rejectlog itself:
                          a log file created by root makes every delivery fail
    <workdir>/exim.pid    written by the daemon (-oP)
    <workdir>/daemon.out  the daemon's stdout/stderr

The config path is appended to ``/etc/exim4/trusted_configs`` (Debian's
TRUSTED_CONFIG_LIST) so that ``-C`` keeps root privilege and routing runs as root
(see docs/exim-levers.md and the shared lab notes). It is removed again on
``stop()`` if this instance added it.

Only loopback addresses are ever used: the daemon listens on 127.0.0.1, and the
default router sends every non-local domain to a sink on 127.0.0.1::PORT.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

# The -bp parser lives with the queue agent's Exim backend; re-exported for the lab.
from governor.adapters.exim_queue import SpoolEntry as QueuedMessage  # noqa: F401
from governor.adapters.exim_queue import parse_bp  # noqa: F401

if TYPE_CHECKING:
    from governor.exim_setup import EximSetup

EXIM_USER = "Debian-exim"
TRUSTED_CONFIGS = Path("/etc/exim4/trusted_configs")
REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_EXIM = REPO_ROOT / ".lab" / "exim-root" / "usr" / "sbin" / "exim4"

#: ``interface`` expansion for the smtp transport: the source IP is the ``ip=`` field
#: of the address_data a governor router stored; empty (= option ignored) otherwise.
INTERFACE_FROM_ADDRESS_DATA = "${if def:address_data{${extract{ip}{$address_data}}}{}}"

#: Retry rule for tests: retry every second for a week. The cutoff must be long: once
#: a (domain) retry record is older than the cutoff, the next deferral bounces the
#: address, however young its message is (measured, docs/exim-levers.md §1).
FAST_RETRY = "*  *  F,7d,1s"


class EximError(RuntimeError):
    """Exim could not be started, refused a command, or is not available."""


# ---------------------------------------------------------------------------
# locating binaries


def find_exim() -> Path:
    """The exim binary: $GOVERNOR_EXIM, else the lab's extracted one, else exim4 on PATH."""
    candidates = [os.environ.get("GOVERNOR_EXIM"), str(LAB_EXIM), shutil.which("exim4")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise EximError(
        f"exim binary not found (looked at $GOVERNOR_EXIM, {LAB_EXIM}, PATH); run scripts/setup.sh"
    )


def find_exim_util(name: str, exim: Path | None = None) -> Path | None:
    """An Exim utility such as ``exim_dumpdb``, which lives in exim4-base, not in the
    daemon .deb the lab extracts: $GOVERNOR_EXIM_UTILS/<name>, next to the binary, PATH."""
    dirs = [os.environ.get("GOVERNOR_EXIM_UTILS")]
    if exim is not None:
        dirs.append(str(exim.parent))
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None


def lab_unavailable() -> str | None:
    """Why a private Exim instance cannot run on this box, or None: tests skip with it."""
    if os.geteuid() != 0:
        return "needs root (setuid exim, /etc/exim4/trusted_configs)"
    try:
        find_exim()
    except EximError as e:
        return str(e)
    return None if TRUSTED_CONFIGS.exists() else f"{TRUSTED_CONFIGS} missing; run scripts/setup.sh"


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# configuration builder


@dataclass
class EximConfig:
    """Builds the monolithic lab config; call it with the instance to get the text.

    The pieces a governor experiment changes are plain strings inserted verbatim:
    ``routers_before`` goes in front of the sink router (a governor router belongs
    there), ``transport_options`` into the ``remote_smtp`` transport (``event_action``,
    ``max_parallel`` …), ``main_extra`` into the main section.
    """

    sink_port: int = 2525
    sink_host: str = "127.0.0.1"
    interface: str | None = None
    hostname: str = "exim-lab.test"
    remote_max_parallel: int = 4
    queue_run_max: int = 2
    queue_only: bool = False
    retry_rules: str = FAST_RETRY
    log_selector: str = (
        "+incoming_interface +outgoing_interface +retry_defer +pid +deliver_time +queue_time +delivery_size"
        " +smtp_connection -queue_run"
    )
    acl_rcpt: str = "accept hosts = 127.0.0.1 : ::1\ndeny message = relay not permitted"
    acl_rcpt_name: str = "acl_check_rcpt"
    acl_smtp_rcpt: str = "acl_check_rcpt"
    main_extra: str = ""
    routers_before: str = ""
    transport_options: str = ""
    transports_extra: str = ""

    def __call__(self, inst: "EximInstance") -> str:
        return self.render(inst)

    def render(self, inst: "EximInstance") -> str:
        """The config text; paths come from the instance so it can live anywhere."""
        sections = self.sections(inst)
        parts = [sections.pop("")]
        for name, text in sections.items():
            parts += [f"begin {name}", text]
        return "\n\n".join(p for p in parts if p) + "\n"

    def sections(self, inst: "EximInstance") -> dict[str, str]:
        """Section name ('' = main) → text, so other builders can put pieces in between."""
        transport = [
            "remote_smtp:",
            "driver = smtp",
            "hosts_try_fastopen = :",
        ]
        if self.interface:
            transport.append(f"interface = {self.interface}")
        if self.transport_options:
            transport.append(self.transport_options)
        routers = [
            self.routers_before,
            "to_sink:\n"
            "driver = manualroute\n"
            "domains = ! +local_domains\n"
            "transport = remote_smtp\n"
            f"route_list = * {self.sink_route(inst)} byname\n"
            "self = send",
            "local_devnull:\n"
            "driver = accept\n"
            "domains = +local_domains\n"
            "transport = devnull",
        ]
        transports = [
            "\n".join(transport),
            "devnull:\n"
            "driver = appendfile\n"
            "file = /dev/null\n"
            f"user = {EXIM_USER}",
            self.transports_extra,
        ]
        return {
            "": self.main_section(inst),
            "acl": f"{self.acl_rcpt_name}:\n{self.acl_rcpt}",
            "routers": "\n\n".join(p for p in routers if p),
            "transports": "\n\n".join(p for p in transports if p),
            "retry": self.retry_rules,
        }

    def sink_route(self, inst: "EximInstance") -> str:
        """The next hop in route_list form: ``127.0.0.1::PORT``."""
        return f"{self.sink_host}::{self.sink_port}"

    def main_section(self, inst: "EximInstance") -> str:
        main = [
            f"exim_path = {inst.exim}",
            f"spool_directory = {inst.spool_dir}",
            f"log_file_path = {inst.log_dir}/%slog",
            f"pid_file_path = {inst.pid_file}",
            f"primary_hostname = {self.hostname}",
            f"qualify_domain = {self.hostname}",
            f"domainlist local_domains = {self.hostname}",
            "keep_environment =",
            "local_interfaces = 127.0.0.1",
            "rfc1413_hosts = :",
            "host_lookup = :",
            "tls_advertise_hosts = :",
            f"acl_smtp_rcpt = {self.acl_smtp_rcpt}",
            f"remote_max_parallel = {self.remote_max_parallel}",
            f"queue_run_max = {self.queue_run_max}",
            f"log_selector = {self.log_selector}",
        ]
        if self.queue_only:
            main.append("queue_only = true")
        if self.main_extra:
            main.append(self.main_extra)
        return "\n".join(main)


@dataclass
class GovernedEximConfig:
    """The lab config with the governor's generated snippets (``governor.exim_setup``).

    ``layout="split"`` concatenates the Debian conf.d pieces in order (as
    update-exim4.conf would); ``"monolithic"`` writes the per-section files into
    ``<workdir>/yahoo-governor/`` and pulls them in with ``.include``, the way an
    admin's own exim4.conf would. ``base`` supplies the lab's own sections: its
    routers (a non-governed route to the sink) come after the governor's.
    """

    setup: "EximSetup"
    base: EximConfig = field(default_factory=EximConfig)
    layout: str = "split"

    def __call__(self, inst: "EximInstance") -> str:
        return self.render(inst)

    def render(self, inst: "EximInstance") -> str:
        from governor.exim_setup import assemble, render, write_files

        files = render(self.setup, self.layout)
        if self.layout == "monolithic":
            paths = write_files(files, inst._dir() / "yahoo-governor")
            files = {p.name: f".include {p}\n" for p in paths}
        return assemble(files, self.base.sections(inst))


def governor_router(socket_path: str | Path, *, name: str = "gov_acquire", request: str | None = None,
                    retry_use_local_part: bool = False, timeout: str = "2s") -> str:
    """A redirect router that asks a governor socket before the sink router runs.

    Reply ``OK ip=… lease=…`` → the router declines and ``$address_data`` becomes
    ``ip=… lease=…`` (the leading word is cut off: ``${extract{ip}{OK ip=1.2.3.4}}`` is
    empty, because extract reads ``OK ip`` as one key); ``DEFER …`` → ``:defer:`` with
    the reply as reason; no answer → ``FAIL`` → the router declines (fail-open).
    """
    req = request or "acquire $domain $local_part $message_exim_id"
    lines = [
        f"{name}:",
        "driver = redirect",
        "domains = ! +local_domains",
        f"set = r_gov=${{readsocket{{{socket_path}}}{{{req}\\n}}{{{timeout}}}{{}}{{FAIL}}}}",
        "address_data = ${if match{$r_gov}{^OK }{${substr_3:$r_gov}}{}}",
        "allow_defer",
        "data = ${if match{$r_gov}{^DEFER}{:defer: governor: $r_gov}{}}",
    ]
    if retry_use_local_part:
        lines.append("retry_use_local_part = true")
    return "\n".join(lines) + "\n"


def governor_event_action(socket_path: str | Path, timeout: str = "2s") -> str:
    """An smtp-transport ``event_action`` that reports every event to a governor socket
    as one line ``event NAME|rcpt=…|ad=…|sip=…|host=…|id=…|errno=…|data=…`` and always
    expands to '' (a non-empty result on tcp:connect would abort the connection)."""
    req = ("event $event_name|rcpt=$local_part@$domain|ad=$address_data|sip=$sending_ip_address"
           "|host=$host_address:$host_port|id=$message_exim_id|errno=$event_defer_errno"
           "|data=${sg{$event_data}{\\n}{ }}")
    return (f"event_action = ${{if eq{{${{readsocket{{{socket_path}}}{{{req}\\n}}{{{timeout}}}{{}}{{FAIL}}}}}}"
            "{}{}{}}")


ConfigSource = str | Callable[["EximInstance"], str] | None


# ---------------------------------------------------------------------------
# queue listing


@dataclass
class RetryRecord:
    """One record of the retry hints database, as ``exim_dumpdb`` prints it.

    Keys seen in the lab: ``R:<domain>`` (router defer, default),
    ``R:<local>@<domain>`` (router with retry_use_local_part),
    ``R:<local>@<domain>:<sender>`` (4xx to RCPT), ``T:<host>:<ip>:<port>/<interface>``
    (host error, e.g. 421 banner) and the same with ``:<message id>`` appended
    (message error, e.g. 421 to MAIL FROM).
    """

    key: str
    errno: int
    more_errno: int
    text: str
    first_failed: str
    last_try: str
    next_try: str
    expired: bool


_DUMP_KEY = re.compile(r"^\s+(?P<key>\S+) (?P<errno>-?\d+) (?P<more>-?\d+) ?(?P<text>.*)$")
_DUMP_TIMES = re.compile(
    r"^(?P<first>\d\d-\w{3}-\d{4} [\d:]{8})\s+(?P<last>\d\d-\w{3}-\d{4} [\d:]{8})"
    r"\s+(?P<next>\d\d-\w{3}-\d{4} [\d:]{8})\s*(?P<exp>\*)?"
)


def parse_retry_dump(text: str) -> list[RetryRecord]:
    """Parse ``exim_dumpdb <spool> retry``: a key line (key, errno, more_errno, message
    text truncated by Exim) followed by first-failed, last-try and next-try times, with
    ``*`` when the record is past its retry cutoff."""
    out: list[RetryRecord] = []
    pending: re.Match[str] | None = None
    for line in text.splitlines():
        m = _DUMP_KEY.match(line)
        if m:
            pending = m
            continue
        t = _DUMP_TIMES.match(line)
        if t and pending is not None:
            out.append(RetryRecord(
                key=pending["key"], errno=int(pending["errno"]), more_errno=int(pending["more"]),
                text=pending["text"], first_failed=t["first"], last_try=t["last"], next_try=t["next"],
                expired=bool(t["exp"]),
            ))
            pending = None
    return out


# ---------------------------------------------------------------------------
# /etc/exim4/trusted_configs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[TextIO]:
    """Hold an exclusive flock on ``path`` (other lab instances edit the same file)."""
    with open(path, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trust_config(config: Path, listing: Path = TRUSTED_CONFIGS) -> bool:
    """Append ``config`` to the trusted list; True if this call added it."""
    if not listing.exists():
        raise EximError(f"{listing} does not exist; run scripts/setup.sh")
    line = str(config)
    with _locked(listing) as fh:
        fh.seek(0)
        text = fh.read()
        if line in text.splitlines():
            return False
        sep = "" if not text or text.endswith("\n") else "\n"
        fh.write(f"{sep}{line}\n")
    return True


def untrust_config(config: Path, listing: Path = TRUSTED_CONFIGS) -> None:
    """Remove ``config`` from the trusted list (in place, keeping owner and mode)."""
    if not listing.exists():
        return
    with _locked(listing) as fh:
        fh.seek(0)
        lines = fh.read().splitlines()
        keep = [x for x in lines if x != str(config)]
        if keep == lines:
            return
        fh.seek(0)
        fh.truncate(0)
        fh.write("".join(x + "\n" for x in keep))


# ---------------------------------------------------------------------------
# processes


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) from /proc/PID/stat, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0], int(fields[3])


def processes_using(config: Path, session: int | None = None, exim: Path | None = None) -> list[int]:
    """Live processes started from this config: every exim process of an instance
    carries ``-C <config>`` (forks inherit it, re-execs pass it on); with ``session``
    and ``exim``, also any process of that binary in the daemon's session. Zombies are
    left to their parents."""
    want = str(config)
    binary = str(exim) if exim is not None else None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid():
            continue
        st = _proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        args = _proc_cmdline(pid)
        ours = any(a == "-C" and i + 1 < len(args) and args[i + 1] == want for i, a in enumerate(args))
        in_session = session is not None and st[1] == session and bool(args) and args[0] == binary
        if ours or in_session:
            pids.append(pid)
    return pids


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# ---------------------------------------------------------------------------
# the instance


class EximInstance:
    """One private Exim: daemon on 127.0.0.1:``smtp_port`` plus a queue runner.

    ``config_text`` is the config (a string), a builder called with the instance
    (e.g. an :class:`EximConfig`), or None for ``EximConfig()`` defaults — whose
    sink port is probably not what you want, so pass an ``EximConfig(sink_port=…)``.
    ``queue_interval`` is the daemon's ``-q`` interval (``"1s"``), or None for no
    queue runner. ``workdir=None`` makes a fresh directory under /tmp that is
    removed on stop; Debian-exim must be able to traverse every parent of the
    workdir (pytest's ``tmp_path`` is under a 0700 directory, so it cannot be used).
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        smtp_port: int | None = None,
        config_text: ConfigSource = None,
        queue_interval: str | None = "1s",
        exim: str | Path | None = None,
        trust: bool = True,
        keep_workdir: bool = False,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.smtp_port = smtp_port
        self.config_source: ConfigSource = config_text
        self.queue_interval = queue_interval
        self.exim = Path(exim) if exim is not None else find_exim()
        self.trust = trust
        self.keep_workdir = keep_workdir
        self.daemon: subprocess.Popen[bytes] | None = None
        self._trusted_by_us = False
        self._daemon_out: BinaryIO | None = None
        #: PIDs that stop() had to signal after the daemon was gone (diagnostics).
        self.reaped: list[int] = []

    # -- paths ------------------------------------------------------------
    def _dir(self) -> Path:
        if self.workdir is None:
            raise EximError("instance has no workdir yet (call start() or pass workdir=)")
        return self.workdir

    @property
    def config_path(self) -> Path:
        return self._dir() / "exim.conf"

    @property
    def spool_dir(self) -> Path:
        return self._dir() / "spool"

    @property
    def log_dir(self) -> Path:
        return self._dir() / "log"

    @property
    def mainlog(self) -> Path:
        return self.log_dir / "mainlog"

    @property
    def paniclog(self) -> Path:
        return self.log_dir / "paniclog"

    @property
    def pid_file(self) -> Path:
        return self._dir() / "exim.pid"

    # -- lifecycle ----------------------------------------------------------
    def prepare(self) -> "EximInstance":
        """Create the directories and the config and trust it, without starting
        anything; enough for ``-be``, ``-bt``, ``-bh`` and local submissions."""
        if os.geteuid() != 0:
            raise EximError("the Exim lab must run as root (setuid exim, trusted_configs, chown)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gov-exim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        _check_traversable(self.workdir)
        if self.smtp_port is None:
            self.smtp_port = free_port()
        uid, gid = _exim_ids()
        for d in (self.spool_dir, self.log_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
            os.chmod(d, 0o750)
        self.write_config()
        if self.trust and not self._trusted_by_us:
            self._trusted_by_us = trust_config(self.config_path)
        try:
            self._check_config()
        except EximError:
            self._untrust()
            raise
        return self

    def _untrust(self) -> None:
        if self._trusted_by_us:
            untrust_config(self.config_path)
            self._trusted_by_us = False

    def write_config(self, text: str | None = None) -> None:
        """(Re)write the config: root:root 0644, the only owner/mode Exim accepts here."""
        if text is None:
            src = self.config_source if self.config_source is not None else EximConfig()
            text = src if isinstance(src, str) else src(self)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config_path)

    def _check_config(self) -> None:
        res = self.run("-bV", check=False)
        if res.returncode != 0:
            detail = res.stderr.strip() or res.stdout.strip()[-1500:]
            raise EximError(f"exim rejected {self.config_path}:\n{detail}")

    def start(self, timeout: float = 10.0) -> "EximInstance":
        """Start the daemon (``-bdf``, foreground, own session) and wait for its banner."""
        if self.daemon is not None and self.daemon.poll() is None:
            return self
        try:
            self.prepare()
            self._spawn_daemon()
            self._wait_banner(timeout)
        except BaseException:
            self.stop()  # untrusts the config and removes an own workdir again
            raise
        return self

    def _spawn_daemon(self) -> None:
        args = [str(self.exim), "-C", str(self.config_path), "-bdf",
                "-oX", str(self.smtp_port), "-oP", str(self.pid_file)]
        if self.queue_interval:
            args.append(f"-q{self.queue_interval}")
        out = open(self._dir() / "daemon.out", "ab")
        self._daemon_out = out
        self.daemon = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )

    def _wait_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise EximError(f"exim daemon exited with {self.daemon.returncode}: {self._diagnostics()}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.smtp_port or 0), timeout=1) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            time.sleep(0.05)
        raise EximError(f"exim daemon gave no 220 banner within {timeout}s: {self._diagnostics()}")

    def _diagnostics(self) -> str:
        bits = []
        for p in (self._dir() / "daemon.out", self.paniclog, self.mainlog):
            with contextlib.suppress(OSError):
                bits.append(f"--- {p.name}:\n" + p.read_text(errors="replace")[-1500:])
        return "\n".join(bits)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the daemon, then every process started from this config: TERM first, KILL
        what is left after a grace period. Needed because SIGTERM to Exim's daemon leaves
        its ``-Mc`` delivery processes and their smtp transports running."""
        session = self.daemon.pid if self.daemon is not None else None
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.terminate()
                try:
                    self.daemon.wait(timeout / 2)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(5)
            self.daemon = None
        if self._daemon_out is not None:
            self._daemon_out.close()
            self._daemon_out = None
        if self.workdir is not None:
            self._reap(session, timeout / 2)
            self._untrust()
            if self._own_workdir and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _reap(self, session: int | None, grace: float) -> None:
        deadline = time.monotonic() + grace
        sig = signal.SIGTERM
        while True:
            pids = processes_using(self.config_path, session, self.exim)
            if not pids:
                return
            if time.monotonic() >= deadline:
                sig = signal.SIGKILL
            self.reaped.extend(p for p in pids if p not in self.reaped)
            _signal_all(pids, sig)
            if sig == signal.SIGKILL and time.monotonic() > deadline + 5:
                raise EximError(f"exim processes survived SIGKILL: {pids}")
            time.sleep(0.1)

    def processes(self) -> list[int]:
        """PIDs of every live process of this instance (daemon included)."""
        session = self.daemon.pid if self.daemon is not None else None
        return processes_using(self.config_path, session, self.exim)

    def __enter__(self) -> "EximInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- running exim ---------------------------------------------------------
    def run(self, *args: str, input: str | bytes | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``exim -C <config> ARGS``; raises EximError on a non-zero exit if ``check``."""
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run(
            [str(self.exim), "-C", str(self.config_path), *args],
            input=data, capture_output=True, timeout=timeout,
        )
        done = subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"),
        )
        if check and res.returncode != 0:
            raise EximError(f"exim {' '.join(args)} exited {res.returncode}: {done.stdout}{done.stderr}")
        return done

    def expand(self, text: str) -> str:
        """``exim -be``: expand one string as the config would."""
        return self.run("-be", text).stdout.rstrip("\n")

    def host_check(self, smtp_input: str, ip: str = "127.0.0.1") -> str:
        """``exim -bh IP``: a fake SMTP session (ACLs run, nothing is delivered). Returns
        the SMTP replies and the ACL trace (stdout+stderr)."""
        res = self.run("-bh", ip, input=smtp_input, check=False)
        return res.stdout + res.stderr

    # -- queue ---------------------------------------------------------------
    def queue(self) -> list[QueuedMessage]:
        """The parsed ``exim -bp`` listing."""
        return parse_bp(self.run("-bp").stdout)

    def queue_count(self) -> int:
        return int(self.run("-bpc").stdout.strip() or 0)

    def _each(self, flag: str, ids: Iterable[str], timeout: float = 60) -> str:
        ids = list(ids)
        if not ids:
            return ""
        return self.run(flag, *ids, timeout=timeout).stdout

    def freeze(self, ids: Iterable[str]) -> str:
        return self._each("-Mf", ids)

    def thaw(self, ids: Iterable[str]) -> str:
        return self._each("-Mt", ids)

    def deliver(self, ids: Iterable[str], timeout: float = 60) -> str:
        """``-M``: a synchronous delivery attempt now. It thaws frozen messages, overrides
        retry times and ignores hold_domains/queue_domains; the routers (and so a
        governor router) run again."""
        return self._each("-M", ids, timeout)

    def remove(self, ids: Iterable[str]) -> str:
        return self._each("-Mrm", ids)

    def queue_run(self, *flags: str, timeout: float = 120) -> None:
        """One synchronous queue run (``-q``; ``-qf``/``-qff`` force) in the foreground."""
        self.run(*(flags or ("-q",)), timeout=timeout)

    def wait_empty(self, timeout: float = 30, poll: float = 0.2) -> None:
        """Wait until ``-bpc`` says 0; TimeoutError lists what is left."""
        deadline = time.monotonic() + timeout
        while self.queue_count() != 0:
            if time.monotonic() > deadline:
                left = self.run("-bp").stdout
                raise TimeoutError(f"exim queue not empty after {timeout}s:\n{left[-3000:]}")
            time.sleep(poll)

    # -- logs ---------------------------------------------------------------
    def read_mainlog(self) -> str:
        """The main log so far ('' before Exim created it)."""
        try:
            return self.mainlog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10, count: int = 1) -> list[str]:
        """Wait until ``count`` mainlog lines match the regex; returns them."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            hits = [ln for ln in self.read_mainlog().splitlines() if rx.search(ln)]
            if len(hits) >= count:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count}x /{pattern}/ not in mainlog after {timeout}s ({len(hits)} seen)")
            time.sleep(0.1)

    def dumpdb(self, name: str = "retry") -> str:
        """``exim_dumpdb <spool> <name>`` (retry, misc, wait-<transport>, …); '' while the
        database does not exist yet. The tool is in exim4-base, which the lab does not
        extract: set $GOVERNOR_EXIM_UTILS to a directory holding it."""
        tool = find_exim_util("exim_dumpdb", self.exim)
        if tool is None:
            raise EximError("exim_dumpdb not found (exim4-base); set GOVERNOR_EXIM_UTILS to its directory")
        if not (self.spool_dir / "db" / name).exists():
            return ""
        res = subprocess.run([str(tool), str(self.spool_dir), name], capture_output=True, text=True, timeout=30)
        return res.stdout + res.stderr

    def retry_records(self) -> list[RetryRecord]:
        """The parsed retry hints database (see :func:`parse_retry_dump`)."""
        return parse_retry_dump(self.dumpdb("retry"))

    def deliver_matching(self, text: str, *, force: bool = False, timeout: float = 120) -> None:
        """``exim -R TEXT`` (``-Rf`` with force): one queue run over messages with an
        undelivered recipient containing TEXT, e.g. ``@yahoo.com``. Retry times are
        overridden for the first selected message, so a deferred domain is woken up at
        once, and a success clears its retry record for the rest."""
        self.run(*(["-Rf", text] if force else ["-R", text]), timeout=timeout)

    # -- submitting mail ---------------------------------------------------------
    def inject(self, count: int, to: Recipients = "user@yahoo.com", *, sender: str = "sender@exim-lab.test",
               connections: int = 4, timeout: float = 60) -> list[str]:
        """Send ``count`` messages to the daemon over SMTP (``connections`` parallel
        sessions, several messages per session); returns Exim's message ids."""
        return asyncio.run(self.ainject(count, to, sender=sender, connections=connections, timeout=timeout))

    async def ainject(self, count: int, to: Recipients = "user@yahoo.com", *,
                      sender: str = "sender@exim-lab.test", connections: int = 4,
                      timeout: float = 60) -> list[str]:
        """Async :meth:`inject`, for callers that already run an event loop."""
        import aiosmtplib  # a test extra; imported here so the module loads without it

        if count <= 0:
            return []
        ids: list[str | None] = [None] * count
        todo = list(range(count))

        async def session(share: list[int]) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.smtp_port, timeout=timeout,
                                     start_tls=False, use_tls=False)
            await client.connect()
            try:
                for i in share:
                    msg = _lab_message(i, sender, _rcpts(to, i))
                    _, reply = await client.send_message(msg, sender=sender, recipients=_rcpts(to, i))
                    ids[i] = _exim_id(reply)
            finally:
                with contextlib.suppress(Exception):
                    await client.quit()

        n = max(1, min(connections, count))
        await asyncio.wait_for(asyncio.gather(*(session(todo[k::n]) for k in range(n))), timeout)
        return [x for x in ids if x]

    def submit(self, to: str | Sequence[str] = "user@yahoo.com", *, sender: str = "sender@exim-lab.test",
               queue_only: bool = True, subject: str = "lab", timeout: float = 30) -> str:
        """Local submission (``exim -odq``, or ``-odi`` to deliver in the foreground);
        returns the message id, found in the mainlog by the Message-ID header."""
        rcpts = [to] if isinstance(to, str) else list(to)
        msg = _lab_message(0, sender, rcpts, subject=subject)
        msgid = msg["Message-ID"].strip("<>")
        mode = "-odq" if queue_only else "-odi"
        self.run(mode, "-oi", "-f", sender, "--", *rcpts, input=msg.as_bytes(), timeout=timeout)
        rx = re.compile(r"\s(\S+) <= .* id=" + re.escape(msgid) + r"(\s|$)")
        for line in self.read_mainlog().splitlines()[::-1]:
            m = rx.search(line)
            if m:
                return m.group(1)
        raise EximError(f"submitted, but no arrival line for Message-ID {msgid} in the mainlog")


Recipients = str | Sequence[str] | Callable[[int], str | Sequence[str]]


def _rcpts(to: Recipients, i: int) -> list[str]:
    val = to(i) if callable(to) else to
    return [val] if isinstance(val, str) else list(val)


def _lab_message(i: int, sender: str, rcpts: list[str], subject: str = "lab") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = f"{subject} {i}"
    msg["Message-ID"] = make_msgid(domain="exim-lab.test")
    msg.set_content(f"lab message {i}\n")
    return msg


def _exim_id(reply: str) -> str | None:
    """Exim answers DATA with ``250 OK id=1xVXpg-0002Es-1T``."""
    m = re.search(r"id=(\S+)", reply)
    return m.group(1) if m else None


def _exim_ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam(EXIM_USER).pw_uid, grp.getgrnam(EXIM_USER).gr_gid
    except KeyError as e:
        raise EximError(f"user/group {EXIM_USER} missing; run scripts/setup.sh") from e


def _check_traversable(path: Path) -> None:
    """Debian-exim (the daemon's user) must reach the spool: every parent needs o+x."""
    for p in [path, *path.parents]:
        st = p.stat()
        if not st.st_mode & 0o001:
            raise EximError(
                f"{p} is mode {oct(st.st_mode & 0o777)}: {EXIM_USER} cannot traverse it to reach "
                f"{path}; use a workdir under /tmp with world-searchable parents"
            )
