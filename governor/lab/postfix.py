"""A private, throwaway Postfix instance for the demo, the e2e tests and the benchmarks.

Why a private instance: tests must be able to rewrite main.cf/master.cf, add
per-IP transports, point tables at lab socketmap servers and stop Postfix at
will, without ever touching the system's /etc/postfix or /var/spool/postfix
(which may or may not be running).  Everything lives under one short ``workdir``:

    workdir/etc      config_directory (main.cf, master.cf)   -> ``postfix -c workdir/etc``
    workdir/q        queue_directory
    workdir/data     data_directory
    workdir/maillog  maillog_file (written by the postlog service; there is no syslog)

Facts this relies on (verified on Debian's Postfix 3.7.11, run as root; see
docs/postfix-levers.md):

* ``postfix -c DIR start|stop|reload``, ``postqueue -c DIR`` and
  ``postsuper -c DIR`` work for root without listing DIR in
  ``alternate_config_directories`` of /etc/postfix/main.cf (that list only
  matters for unprivileged users of the set-gid postqueue/postdrop). Nothing in
  /etc/postfix is edited.
* Every service runs with chroot = n, so unix sockets (milters, socketmaps) are
  plain absolute paths.  The workdir must be traversable by user ``postfix``.
* ``maillog_file`` must start with one of ``maillog_file_prefixes``; we set the
  prefix list to the workdir.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

__all__ = [
    "PostfixError", "PostfixInstance", "InjectResult", "MessageResult",
    "FAST_TIMERS", "free_port", "parse_master_cf",
]

SYSTEM_CONFIG_DIR = Path("/etc/postfix")
SYSTEM_QUEUE_DIR = Path("/var/spool/postfix")

#: Retry timers scaled down to the minimum Postfix accepts (all three are
#: time parameters with a lower bound of 1s; 0s is a fatal config error).
FAST_TIMERS: dict[str, str] = {
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
}


class PostfixError(RuntimeError):
    """A Postfix command failed or the instance misbehaved."""


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# configuration text
# ---------------------------------------------------------------------------

def _base_main_cf(inst: "PostfixInstance") -> dict[str, str]:
    """main.cf for a loopback-only lab relay. Each line answers a lab pitfall."""
    w = inst.workdir
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(inst.queue_dir),
        "data_directory": str(inst.data_dir),
        # No syslog on the lab machines: postlogd writes here. The prefix list
        # is a safety check (default: /var, /dev/stdout).
        "maillog_file": str(inst.log_path),
        "maillog_file_prefixes": str(w),
        "myhostname": inst.hostname,
        "mydomain": inst.hostname.partition(".")[2] or inst.hostname,
        "myorigin": "$myhostname",
        # Local mail (bounces to the lab sender, postmaster notices) is discarded,
        # so nothing but test mail reaches the sink.
        "mydestination": "$myhostname, localhost",
        "local_transport": "discard:lab",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        # "Local only" Debian installs use error:, which rejects remote recipients.
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "relayhost": inst.relayhost or "",
        "smtputf8_enable": "no",
        "biff": "no",
        "append_dot_mydomain": "no",
        "readme_directory": "no",
        # Fast injection: by default smtpd sleeps up to 1s per message when the
        # queue manager lags behind (in_flow_delay).
        "in_flow_delay": "0",
        # Nothing bounces in tests; retries come quickly.
        **FAST_TIMERS,
        "maximal_queue_lifetime": "1d",
        "bounce_queue_lifetime": "1d",
        # Loopback only, no DNS: nexthops are [ip]:port; anything else uses
        # getaddrinfo() instead of MX lookups.
        "smtp_host_lookup": "native",
        "smtp_dns_support_level": "disabled",
        # Safety net: a socket bound to 127.0.0.1 cannot connect to a non-loopback
        # address (EINVAL), so lab mail can never leave the machine, even for a
        # route whose nexthop is a real domain. Per-IP transports override this
        # with their own 127.0.0.x.
        "smtp_bind_address": "127.0.0.1",
        "smtp_address_preference": "ipv4",
        "smtp_connect_timeout": "5s",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        # The lab sink does not do TLS; tlsmgr/scache stay as in a real install.
        "notify_classes": "",
    }


_MASTER_HEADER = """\
# Postfix master.cf of a private lab instance (written by governor.lab.postfix).
# All services unchrooted so unix sockets in the workdir are reachable.
# service type  private unpriv  chroot  wakeup  maxproc command + args
"""

_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
  -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def parse_master_cf(text: str) -> list[tuple[tuple[str, str], str]]:
    """Split master.cf text into ``[((service, type), entry_text), ...]``.

    An entry is a first line plus its indented continuation lines; comments and
    blank lines are dropped. Used to replace entries by (service, type).
    """
    entries: list[tuple[tuple[str, str], str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if not entries:
                raise PostfixError(f"master.cf continuation line without entry: {line!r}")
            key, body = entries[-1]
            entries[-1] = (key, f"{body}\n{line}")
            continue
        parts = line.split()
        if len(parts) < 8:
            raise PostfixError(f"master.cf entry needs 8 fields: {line!r}")
        entries.append(((parts[0], parts[1]), line))
    return entries


def _render_main_cf(settings: dict[str, str]) -> str:
    lines = ["# main.cf of a private lab instance (written by governor.lab.postfix)"]
    for key, value in settings.items():
        if "\n" in value:
            raise PostfixError(f"main.cf value for {key} contains a newline")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass
class MessageResult:
    """What smtpd answered for one injected message."""

    index: int
    ok: bool
    code: int
    reply: str
    queue_id: str | None = None
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class InjectResult:
    """Outcome of ``PostfixInstance.inject``."""

    results: list[MessageResult]
    seconds: float

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.results if r.ok)

    @property
    def queue_ids(self) -> list[str]:
        return [r.queue_id for r in self.results if r.queue_id]


_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


# ---------------------------------------------------------------------------
# the instance
# ---------------------------------------------------------------------------

class PostfixInstance:
    """One private Postfix instance under ``workdir``; use as a context manager.

    ``main_cf`` overrides/extends the generated main.cf; ``master_cf_extra`` are
    extra master.cf entries (an entry with the same service/type as a built-in
    one replaces it). ``relayhost`` (e.g. ``sink.nexthop``) sends all remote
    mail to one fake MX without DNS. Leaving the context stops Postfix but keeps
    the workdir (maillog, queue) for inspection; ``cleanup()`` deletes it.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, smtpd_port: int | None = None,
                 main_cf: dict[str, str] | None = None,
                 master_cf_extra: Sequence[str] | None = None,
                 relayhost: str | None = None, hostname: str = "lab.governor.test",
                 command_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir).absolute()
        self.smtpd_port = smtpd_port or free_port()
        self.relayhost = relayhost
        self.hostname = hostname
        self.command_timeout = command_timeout
        self._main_extra: dict[str, str] = dict(main_cf or {})
        self._master_extra: list[str] = list(master_cf_extra or [])
        self._inbound_rewrite: str | None = None
        self._check_paths()

    # -- paths -------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "q"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "maillog"

    @property
    def main_cf_path(self) -> Path:
        return self.config_dir / "main.cf"

    @property
    def master_cf_path(self) -> Path:
        return self.config_dir / "master.cf"

    def _check_paths(self) -> None:
        """Refuse anything that could hit the system instance."""
        for mine, system in ((self.config_dir, SYSTEM_CONFIG_DIR), (self.queue_dir, SYSTEM_QUEUE_DIR)):
            real = Path(os.path.realpath(mine))
            if real == system or system in real.parents or real in system.parents:
                raise PostfixError(f"refusing to use {mine}: overlaps the system instance {system}")
        # The unix socket names under q/private must fit in sun_path (108 bytes).
        if len(str(self.queue_dir)) + len("/private/") + 40 > 107:
            raise PostfixError(f"workdir path too long for unix sockets: {self.workdir}")

    def _prepare_workdir(self) -> None:
        """Create the directories; make the workdir reachable for user postfix."""
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance must be started as root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        mode = self.workdir.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(self.workdir, stat.S_IMODE(mode) | 0o755)
        for parent in self.workdir.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise PostfixError(
                    f"{parent} is not searchable by others; user postfix could not reach "
                    f"{self.workdir} (use a workdir under /tmp, e.g. tempfile.mkdtemp())")
        self.config_dir.mkdir(exist_ok=True)
        # queue_directory must be root-owned; `postfix check` (post-install
        # create-missing) creates its subdirectories and the data_directory,
        # which must be owned by postfix: do not create that one here.
        self.queue_dir.mkdir(exist_ok=True)
        self.log_path.touch(exist_ok=True)

    # -- configuration ----------------------------------------------------
    def main_settings(self) -> dict[str, str]:
        """The main.cf settings that ``write_config`` writes."""
        settings = _base_main_cf(self)
        settings.update(self._main_extra)
        return settings

    def master_text(self) -> str:
        """The master.cf text that ``write_config`` writes."""
        smtpd = f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd"
        entries = dict(parse_master_cf(smtpd + "\n" + _MASTER_SERVICES))
        if self._inbound_rewrite:
            via = f"\n  -o rewrite_service_name={self._inbound_rewrite}"
            for key in ((f"127.0.0.1:{self.smtpd_port}", "inet"), ("cleanup", "unix")):
                entries[key] += via
            entries[(self._inbound_rewrite, "unix")] = (
                f"{self._inbound_rewrite} unix - - n - - trivial-rewrite\n  -o transport_maps=")
        for key, body in parse_master_cf("\n".join(self._master_extra)):
            entries[key] = body
        return _MASTER_HEADER + "\n".join(entries.values()) + "\n"

    def write_config(self) -> None:
        """(Re)write main.cf and master.cf from the current settings."""
        self._prepare_workdir()
        self.main_cf_path.write_text(_render_main_cf(self.main_settings()))
        self.master_cf_path.write_text(self.master_text())

    def postconf(self, settings: dict[str, str] | None = None, /, **kw: str) -> None:
        """Set main.cf parameters (kept across ``write_config``). Call ``reload()`` to apply
        to a running instance. Use the dict form for names with ``-`` in them."""
        merged = {**(settings or {}), **kw}
        self._main_extra.update(merged)
        if self.main_cf_path.exists():
            self._run(["postconf", "-c", str(self.config_dir), "-e",
                       *(f"{k}={v}" for k, v in merged.items())])

    def postconf_get(self, *names: str) -> dict[str, str]:
        """Effective values (``postconf -c DIR -h NAME``) of the named parameters."""
        out = {}
        for name in names:
            out[name] = self._run(["postconf", "-c", str(self.config_dir), "-h", name]).strip()
        return out

    def postconf_master(self, lines: Iterable[str] | str) -> None:
        """Add or replace master.cf entries (matched by service name and type)."""
        text = lines if isinstance(lines, str) else "\n".join(lines)
        parse_master_cf(text)  # validate early
        self._master_extra.append(text)
        if self.master_cf_path.exists():
            self.master_cf_path.write_text(self.master_text())

    def separate_inbound_resolver(self, service: str = "rewrite-in") -> None:
        """Give smtpd and cleanup their own trivial-rewrite service without transport_maps.

        Why: smtpd resolves every RCPT (and the MAIL FROM address) through
        trivial-rewrite, so a transport_maps socketmap is also asked at
        injection time, and an ``OK retry:...`` answer makes smtpd reject the
        recipient with 450 (smtpd_reject_unlisted_recipient). A slow map also
        stalls cleanup's address rewriting. With this, only the queue manager's
        lookups reach the map. Call before ``start()`` (or ``reload()`` after).
        """
        self._inbound_rewrite = service
        if self.master_cf_path.exists():
            self.master_cf_path.write_text(self.master_text())

    def add_smtp_transport(self, name: str, *, bind_address: str | None = None,
                           bind_address6: str | None = None, maxproc: int | str = "-",
                           options: dict[str, str] | None = None,
                           qmgr: dict[str, str] | None = None) -> str:
        """Add a clone of the smtp transport named ``name`` (e.g. ``yahoo-ip1``).

        ``bind_address`` pins the source IP (127.0.0.2-127.0.0.254 work on Linux
        ``lo`` without configuration). ``options`` become ``-o`` settings of the
        smtp(8) process; ``qmgr`` are per-transport queue-manager settings that
        can only live in main.cf, given without the prefix, e.g.
        ``{"transport_rate_delay": "3s", "destination_concurrency_limit": "1"}``.
        Returns the transport name.
        """
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise PostfixError(f"bad transport name {name!r}")
        opts = {"syslog_name": f"postfix/{name}"}
        if bind_address:
            opts["smtp_bind_address"] = bind_address
        if bind_address6:
            opts["smtp_bind_address6"] = bind_address6
        opts.update(options or {})
        lines = [f"{name} unix - - n - {maxproc} smtp"]
        lines += [f"  -o {k}={v}" for k, v in opts.items()]
        self.postconf_master(lines)
        if qmgr:
            self.postconf({f"{name}_{k}": v for k, v in qmgr.items()})
        return name

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float = 15.0) -> "PostfixInstance":
        """Write the config, run ``postfix check`` and ``postfix start``; wait for smtpd."""
        self.write_config()
        self._run(["postfix", "-c", str(self.config_dir), "check"])
        offset = self.log_size()
        try:
            self._run(["postfix", "-c", str(self.config_dir), "start"])
        except PostfixError as exc:
            raise PostfixError(f"{exc}\n--- maillog ---\n{self.log_text(offset)[-3000:]}") from None
        self._wait_listening(timeout)
        self._check_startup(offset)
        return self

    def _check_startup(self, offset: int, settle: float = 0.5) -> None:
        """Fail fast on daemon fatals: ``postfix start`` exits 0 even when qmgr
        dies at once on a bad parameter (e.g. ``queue_run_delay = 0s``:
        "fatal: invalid queue_run_delay: 0 (min 1)"), and mail then just sits."""
        deadline = time.monotonic() + settle
        while True:
            bad = self.problems(offset)
            if bad:
                self.stop()
                raise PostfixError("Postfix daemons failed at startup:\n" + "\n".join(bad[:10]))
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def problems(self, offset: int = 0) -> list[str]:
        """maillog lines after ``offset`` that mean a broken instance (fatal/panic,
        or master throttling a daemon that keeps failing)."""
        rx = re.compile(r"\b(fatal|panic):|bad command startup")
        return [ln for ln in self.log_text(offset).splitlines() if rx.search(ln)]

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise PostfixError(f"smtpd did not listen on 127.0.0.1:{self.smtpd_port} within {timeout}s:\n"
                           f"{self.log_text()[-3000:]}")

    def master_pid(self) -> int | None:
        """PID of this instance's master, if it is running."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def is_running(self) -> bool:
        return self.master_pid() is not None

    def reload(self) -> None:
        """``postfix reload``: master re-reads master.cf; daemons restart on next use."""
        self._run(["postfix", "-c", str(self.config_dir), "reload"])

    def stop(self, timeout: float = 15.0) -> None:
        """``postfix stop`` and wait until no process of this instance is left.

        Falls back to ``postfix abort`` and then SIGKILL of this instance's own
        processes (found by MAIL_CONFIG in their environment), never by name.
        """
        if not self.config_dir.exists():
            return
        if self.is_running():
            try:
                self._run(["postfix", "-c", str(self.config_dir), "stop"])
            except PostfixError:
                pass
        if self._wait_gone(timeout):
            return
        subprocess.run(["postfix", "-c", str(self.config_dir), "abort"],
                       capture_output=True, timeout=self.command_timeout, check=False)
        if self._wait_gone(5):
            return
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._wait_gone(5):
            raise PostfixError(f"processes of {self.config_dir} survive: {self.processes()}")

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.processes():
                return True
            time.sleep(0.05)
        return not self.processes()

    def processes(self) -> list[int]:
        """Live (non-zombie) processes that belong to this instance.

        The postfix command exports MAIL_CONFIG=<config dir> to master, and
        master passes it on to every daemon (it is in import_environment).
        """
        want = f"MAIL_CONFIG={self.config_dir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and want in env.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        """Stop and delete the workdir."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queue ------------------------------------------------------------------
    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per message (queue_name, queue_id, recipients, ...)."""
        out = self._run(["postqueue", "-c", str(self.config_dir), "-j"])
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self, queue_name: str | None = None) -> list[str]:
        return [m["queue_id"] for m in self.queue()
                if queue_name is None or m["queue_name"] == queue_name]

    def hold(self, ids: Iterable[str] | str = "ALL") -> str:
        """``postsuper -h``: put messages on hold (``"ALL"`` or ids). Returns postsuper's report."""
        return self._postsuper("-h", ids)

    def release(self, ids: Iterable[str] | str = "ALL", *, now: bool = True) -> str:
        """``postsuper -H`` (hold → deferred), then ``postqueue -i`` each id (or
        ``postqueue -f`` for ALL) so it is tried now rather than at the next
        deferred-queue scan. Note: ``postqueue -i``/``-f`` also override
        ``defer_transports`` for that run (measured); pass ``now=False`` to keep it."""
        ids_list = None if isinstance(ids, str) else list(ids)
        report = self._postsuper("-H", ids if ids_list is None else ids_list)
        if now:
            if ids_list is None:
                self.flush()
            else:
                for qid in ids_list:
                    self._run(["postqueue", "-c", str(self.config_dir), "-i", qid])
        return report

    def delete(self, ids: Iterable[str] | str = "ALL") -> str:
        """``postsuper -d``."""
        return self._postsuper("-d", ids)

    def flush(self) -> None:
        """``postqueue -f``: try all deferred mail now (this also delivers mail for
        transports listed in ``defer_transports``)."""
        self._run(["postqueue", "-c", str(self.config_dir), "-f"])

    def _postsuper(self, flag: str, ids: Iterable[str] | str) -> str:
        if isinstance(ids, str):
            if ids != "ALL":
                raise PostfixError("pass a list of queue ids or 'ALL'")
            return self._run(["postsuper", "-c", str(self.config_dir), flag, "ALL"], stderr=True)
        body = "".join(f"{i}\n" for i in ids)
        if not body:
            return ""
        return self._run(["postsuper", "-c", str(self.config_dir), flag, "-"], stdin=body, stderr=True)

    def wait_empty(self, timeout: float = 30.0, *, interval: float = 0.1) -> None:
        """Wait until the queue is empty; raise TimeoutError with what is left."""
        deadline = time.monotonic() + timeout
        left: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            left = self.queue()
            if not left:
                return
            time.sleep(interval)
        summary = [(m["queue_name"], m["queue_id"],
                    [r.get("delay_reason", "") for r in m.get("recipients", [])]) for m in left[:5]]
        raise TimeoutError(f"{len(left)} messages still queued after {timeout}s: {summary}")

    # -- log ----------------------------------------------------------------------
    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0, *, offset: int = 0,
                 count: int = 1) -> list[str]:
        """Wait until ``count`` maillog lines after ``offset`` match ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        hits: list[str] = []
        while time.monotonic() < deadline:
            hits = [ln for ln in self.log_text(offset).splitlines() if rx.search(ln)]
            if len(hits) >= count:
                return hits
            time.sleep(0.05)
        raise TimeoutError(f"{len(hits)}/{count} log lines matching {pattern!r} after {timeout}s")

    # -- injection --------------------------------------------------------------
    def inject(self, count: int = 1, *, sender: str = "sender@lab.governor.test",
               recipients: Sequence[str] = ("user@yahoo.com",), connections: int = 4,
               subject: str = "lab message", body: str = "hello from the lab\n",
               headers: dict[str, str] | None = None, timeout: float = 60.0) -> InjectResult:
        """Send ``count`` messages to this instance's smtpd (127.0.0.1:port) over
        ``connections`` parallel SMTP sessions. Never raises for SMTP errors: each
        message's reply is in the result. Safe to call from inside an event loop."""
        coro = self.inject_async(count, sender=sender, recipients=recipients,
                                 connections=connections, subject=subject, body=body,
                                 headers=headers, timeout=timeout)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def inject_async(self, count: int = 1, *, sender: str = "sender@lab.governor.test",
                           recipients: Sequence[str] = ("user@yahoo.com",), connections: int = 4,
                           subject: str = "lab message", body: str = "hello from the lab\n",
                           headers: dict[str, str] | None = None,
                           timeout: float = 60.0) -> InjectResult:
        """Async form of ``inject``."""
        run = uuid.uuid4().hex[:12]
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            todo.put_nowait(i)
        results: dict[int, MessageResult] = {}

        def build(i: int) -> bytes:
            msg = EmailMessage()
            msg["From"] = sender
            msg["To"] = ", ".join(recipients)
            msg["Subject"] = f"{subject} #{i}"
            msg["Date"] = formatdate(localtime=True)
            msg["Message-ID"] = f"<lab-{run}-{i}@{self.hostname}>"
            msg["X-Lab-Run"] = run
            msg["X-Lab-Seq"] = str(i)
            for k, v in (headers or {}).items():
                msg[k] = v
            msg.set_content(body)
            return msg.as_bytes()

        started = time.monotonic()
        workers = [self._inject_worker(todo, results, build, sender, list(recipients), timeout)
                   for _ in range(max(1, min(connections, count)))]
        await asyncio.wait_for(asyncio.gather(*workers), timeout)
        ordered = [results[i] for i in range(count)]
        return InjectResult(ordered, time.monotonic() - started)

    async def _inject_worker(self, todo: asyncio.Queue[int], results: dict[int, MessageResult],
                             build: Any, sender: str, rcpts: list[str], timeout: float) -> None:
        import aiosmtplib  # the lab's only use of it; keeps import cost out of the product

        client: aiosmtplib.SMTP | None = None
        try:
            while not todo.empty():
                i = todo.get_nowait()
                if client is None or not client.is_connected:
                    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.smtpd_port,
                                             timeout=timeout, start_tls=False,
                                             local_hostname="inject.lab.test")
                    await client.connect()
                results[i] = await _send_one(client, i, sender, rcpts, build(i))
        finally:
            if client is not None and client.is_connected:
                try:
                    await client.quit()
                except Exception:  # noqa: BLE001 - best-effort goodbye
                    client.close()

    # -- helpers ------------------------------------------------------------------
    def _run(self, argv: list[str], *, stdin: str | None = None, stderr: bool = False) -> str:
        """Run a Postfix command against this instance only (MAIL_CONFIG is forced too)."""
        env = {**os.environ, "MAIL_CONFIG": str(self.config_dir)}
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env,
                                  timeout=self.command_timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PostfixError(f"{' '.join(argv)} timed out after {self.command_timeout}s") from exc
        if proc.returncode != 0:
            raise PostfixError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout + (proc.stderr if stderr else "")


async def _send_one(client: Any, i: int, sender: str, rcpts: list[str], data: bytes) -> MessageResult:
    """One transaction; SMTP errors become a result, a dropped connection is re-raised
    only if reconnecting is impossible (the worker reconnects on the next message)."""
    import aiosmtplib

    try:
        refused, reply = await client.sendmail(sender, rcpts, data)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = {e.recipient: f"{e.code} {e.message}" for e in exc.recipients}
        await _rset(client)
        return MessageResult(i, False, exc.recipients[0].code if exc.recipients else 0,
                             "all recipients refused", None, refused)
    except aiosmtplib.SMTPResponseException as exc:
        await _rset(client)
        return MessageResult(i, False, exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError) as exc:
        client.close()
        return MessageResult(i, False, 0, f"{type(exc).__name__}: {exc}")
    qid = _QUEUED_AS.search(reply)
    return MessageResult(i, True, 250, reply, qid.group(1) if qid else None,
                         {k: f"{v.code} {v.message}" for k, v in refused.items()})


async def _rset(client: Any) -> None:
    try:
        await client.rset()
    except Exception:  # noqa: BLE001 - the next message reconnects
        client.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
