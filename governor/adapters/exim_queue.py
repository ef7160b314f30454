"""Exim's side of the queue agent: ``exim -bp``, freeze ``-Mf``, thaw ``-Mt`` + ``-M``.

Measured on 4.96 (docs/exim.md):

* ``-Mf``/``-Mt`` take many ids and print one line per id on stdout: ``Message ID
  is now frozen`` / ``is no longer frozen``; an id that is gone gives ``Spool
  data file for ID does not exist`` and the exit status 1 (so the status cannot
  tell success; the lines can).
* ``-M ID…`` runs a delivery attempt in the foreground, ignoring retry times and
  ``hold_domains``; the governor router still asks for a lease, so the paced
  release goes through the governor like any other delivery. It is started in
  the background: an acquire may wait for a slot.
* Exim keeps no "delay reason" per recipient in ``-bp``; the message log
  (``<spool>/msglog/<id>``) has one line per attempt, e.g. ``u@yahoo.com
  R=yahoo_governor defer (-1): governor: DEFER retry=… reason=…`` or ``…
  T=yahoo_ip1 defer (-45) H=…: SMTP error from remote mail server after …``.
  The last defer line of a governed recipient is the message's reason.
* Exim has no hold queue: a frozen message is ``hold``; one with a deferral in
  its log is ``deferred``; any other is ``incoming`` (not tried yet).
"""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from governor.adapters.queue_agent import QueueCommandError, QueuedMessage
from governor.domains import DomainSet, domain_of

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_FROZEN = re.compile(r"^Message (\S+) is (?:now|already) frozen", re.MULTILINE)
_THAWED = re.compile(r"^Message (\S+) is (?:no longer|not) frozen", re.MULTILINE)
_DEFER_LINE = re.compile(r"^\S+ \S+ (?P<rcpt>\S+) (?:[RT]=\S+ )*defer \(-?\d+\)(?::)? ?(?P<text>.*?)(?: DT=\S+)?$")
_BP_HEAD = re.compile(
    r"^\s*(?P<age>\d+[smhdw])\s+(?P<size>\S+)\s+(?P<id>[0-9A-Za-z]{6}-[0-9A-Za-z]{4,11}-[0-9A-Za-z]{2,4})"
    r"\s+<(?P<sender>[^>]*)>(?P<rest>.*)$"
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class SpoolEntry:
    """One entry of ``exim -bp``."""

    id: str
    sender: str
    age: str
    size: str
    frozen: bool
    recipients: list[str] = field(default_factory=list)  # still undelivered
    delivered: list[str] = field(default_factory=list)


def parse_bp(text: str) -> list[SpoolEntry]:
    """Parse ``exim -bp`` output: a header line per message, then indented recipients
    (``D`` marks a delivered one), then a blank line."""
    out: list[SpoolEntry] = []
    for line in text.splitlines():
        m = _BP_HEAD.match(line)
        if m:
            out.append(SpoolEntry(id=m["id"], sender=m["sender"], age=m["age"], size=m["size"],
                                  frozen="*** frozen ***" in m["rest"]))
            continue
        rcpt = line.strip()
        if not rcpt or not out:
            continue
        if rcpt.startswith(("D ", "+D ")):
            out[-1].delivered.append(rcpt.split(" ", 1)[1].strip())
        else:
            out[-1].recipients.append(rcpt)
    return out


def arrival_time(message_id: str, age: str = "", now: float | None = None) -> float:
    """When a message arrived: the first six characters of an Exim id are the
    arrival time in base 62; the ``-bp`` age is the fallback (minute precision)."""
    head = message_id[:6]
    if len(head) == 6 and all(c in _BASE62 for c in head):
        value = 0
        for c in head:
            value = value * 62 + _BASE62.index(c)
        return float(value)
    m = re.fullmatch(r"(\d+)([smhdw])", age)
    seconds = int(m[1]) * _UNITS[m[2]] if m else 0
    return (time.time() if now is None else now) - seconds


def last_defer_reasons(msglog: str) -> dict[str, str]:
    """Recipient → text of its last ``defer`` line in a message log."""
    out: dict[str, str] = {}
    for line in msglog.splitlines():
        m = _DEFER_LINE.match(line)
        if m:
            out[m["rcpt"].lower()] = m["text"].strip()
    return out


@dataclass
class EximQueue:
    """:class:`~governor.adapters.queue_agent.QueueBackend` for one Exim installation.

    ``config_file`` adds ``-C`` (a private instance; it must be trusted for root to
    keep its privilege). ``spool_directory`` is asked from Exim (``-bP``) on first use.
    """

    binary: str = "/usr/sbin/exim4"
    config_file: str | None = None
    timeout: float = 60.0
    mta: str = "exim"
    spool_directory: str | None = None
    _kicks: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @classmethod
    def from_config(cls, cfg: object) -> EximQueue:
        """From ``governor.config.Config.exim`` (binary, config_file)."""
        exim = getattr(cfg, "exim")
        return cls(binary=exim.binary, config_file=exim.config_file)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, *(["-C", self.config_file] if self.config_file else []), *args]

    def _run(self, *args: str) -> str:
        """Run exim; stdout+stderr. Exit status 1 with per-id lines is normal for -Mf/-Mt."""
        argv = self._argv(*args)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise QueueCommandError(f"{' '.join(argv)}: {exc}") from None
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and not proc.stdout):
            raise QueueCommandError(f"{' '.join(argv)} exited {proc.returncode}: "
                                    f"{(proc.stderr or proc.stdout).strip()[:300]}")
        return proc.stdout + proc.stderr

    # -- QueueBackend -----------------------------------------------------------
    def list_governed(self, domains: DomainSet) -> list[QueuedMessage]:
        out = []
        for entry in parse_bp(self._run("-bp")):
            governed = [r for r in entry.recipients if _governed(r, domains)]
            if governed:
                out.append(self._message(entry, governed))
        return out

    def hold(self, ids: list[str]) -> list[str]:
        """Freeze: queue runs leave a frozen message alone until it is thawed."""
        if not ids:
            return []
        return _FROZEN.findall(self._run("-Mf", *ids))

    def release(self, ids: list[str]) -> list[str]:
        """Thaw, then start one background ``-M`` delivery attempt for the batch."""
        if not ids:
            return []
        done = _THAWED.findall(self._run("-Mt", *ids))
        if done:
            self._kick(done)
        return done

    # -- helpers ---------------------------------------------------------------
    def _message(self, entry: SpoolEntry, governed: Sequence[str]) -> QueuedMessage:
        reasons = self._reasons(entry.id)
        reason = next((reasons[r.lower()] for r in governed if r.lower() in reasons), "")
        state = "hold" if entry.frozen else ("deferred" if reason else "incoming")
        return QueuedMessage(queue_id=entry.id, recipients=tuple(governed), state=state,
                             arrival=arrival_time(entry.id, entry.age), reason=reason)

    def _reasons(self, message_id: str) -> dict[str, str]:
        try:
            text = (Path(self._spool()) / "msglog" / message_id).read_text(errors="replace")
        except OSError:
            return {}
        return last_defer_reasons(text)

    def _spool(self) -> str:
        if self.spool_directory is None:
            line = self._run("-bP", "spool_directory").strip()
            self.spool_directory = line.partition("=")[2].strip()
        return self.spool_directory

    def _kick(self, ids: list[str]) -> None:
        """Start ``exim -M ids`` without waiting (each acquire may wait for a slot);
        finished earlier kicks are reaped here."""
        self._kicks = [p for p in self._kicks if p.poll() is None]
        try:
            self._kicks.append(subprocess.Popen(self._argv("-M", *ids), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except OSError as exc:
            raise QueueCommandError(f"exim -M: {exc}") from None

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for background deliveries started by release() (tests, shutdown)."""
        for proc in self._kicks:
            proc.wait(timeout)
        self._kicks.clear()


def _governed(address: str, domains: DomainSet) -> bool:
    domain = domain_of(address)
    return domain is not None and domains.is_governed(domain)
