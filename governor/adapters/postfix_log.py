"""Fallback delivery feedback: follow Postfix's mail log like ``tail -F``.

The primary feedback path is the daemon's ``status-<egress name>`` socketmaps
(``smtp_delivery_status_filter``): it sees every reply the moment the smtp client has
it. This follower is for installations where that filter cannot be configured (or
as a cross-check): it reads the lines the slot transports log,

    postfix/yahoo-ip1-s3/smtp[4242]: 8ED5320C2FA: to=<a@yahoo.com>, relay=mx.yahoo.com[…]:25,
      delay=0.2, delays=…, dsn=4.7.0, status=deferred (host mx.yahoo.com[…] said: 421 4.7.0 [TSS04] …)

maps the service name (``syslog_name = postfix/<slot>``, set by ``governor
postfix-config``) to its egress IP, and hands each non-``sent`` result to the
feedback path. Do not run it *and* the status filter for the same transports:
every reply would be counted twice.

Rotation: like ``tail -F`` it notices a new file behind the path (another inode:
``mv`` + new file) and reads the old one to its end first, and a truncation (size
below the read position: ``copytruncate``) makes it start again from the top.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from governor.logsetup import kv

log = logging.getLogger("governor.postfix_log")

_LINE = re.compile(
    r"\s(?P<syslog>[^\s\[]+)/(?P<service>[^\s/\[]+)/(?P<program>smtp|lmtp)\[(?P<pid>\d+)\]: "
    r"(?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>, (?P<rest>.*)$")
_RELAY = re.compile(r"(?:^|, )relay=(?P<relay>[^,]+)")
_DSN = re.compile(r"(?:^|, )dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3})")
_STATUS = re.compile(r"(?:^|, )status=(?P<status>[a-z]+)(?: \((?P<text>.*)\))?\s*$")


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt as Postfix logged it."""

    service: str
    queue_id: str
    recipient: str
    relay: str
    dsn: str
    status: str
    text: str
    pid: int = 0


def parse_line(line: str) -> Delivery | None:
    """A ``postfix/<service>/smtp[pid]: QID: to=<…>, … status=…`` line, else None."""
    m = _LINE.search(line.rstrip("\r\n"))
    if m is None:
        return None
    rest = m.group("rest")
    status = _STATUS.search(rest)
    if status is None:
        return None
    relay = _RELAY.search(rest)
    dsn = _DSN.search(rest)
    return Delivery(service=m.group("service"), queue_id=m.group("qid"), recipient=m.group("rcpt"),
                    relay=relay.group("relay") if relay else "", dsn=dsn.group("dsn") if dsn else "",
                    status=status.group("status"), text=status.group("text") or "", pid=int(m.group("pid")))


# --------------------------------------------------------------------------- following
class Follower:
    """``tail -F`` for one path: yields complete lines, survives rotation and truncation."""

    def __init__(self, path: str | os.PathLike[str], *, from_start: bool = False, poll: float = 0.2) -> None:
        self.path = os.fspath(path)
        self.poll = poll
        self._fh: BinaryIO | None = None
        self._ino: tuple[int, int] | None = None
        self._buf = b""
        self._from_start = from_start

    def _open(self, at_end: bool) -> bool:
        try:
            fh = open(self.path, "rb")
        except OSError:
            return False
        st = os.fstat(fh.fileno())
        if at_end:
            fh.seek(0, os.SEEK_END)
        self._close()
        self._fh, self._ino, self._buf = fh, (st.st_dev, st.st_ino), b""
        return True

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None

    def read_available(self) -> list[str]:
        """Every complete line written since the last call (never blocks)."""
        if self._fh is None:
            opened = self._open(at_end=not self._from_start)
            self._from_start = True  # a file that appears later (or again) is read from its start
            if not opened:
                return []
        lines = self._drain()
        lines += self._check_rotation()
        return lines

    def _drain(self) -> list[str]:
        assert self._fh is not None
        data = self._fh.read()
        if not data:
            return []
        data = self._buf + data
        *complete, self._buf = data.split(b"\n")
        return [c.decode("utf-8", "replace") for c in complete]

    def _check_rotation(self) -> list[str]:
        assert self._fh is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return []  # moved away, the new file is not there yet: keep the old one
        if (st.st_dev, st.st_ino) != self._ino:
            lines = self._drain()  # whatever the old file got after our last read
            if self._open(at_end=False):
                lines += self._drain()
            return lines
        if st.st_size < self._fh.tell():  # copytruncate
            self._fh.seek(0)
            self._buf = b""
            return self._drain()
        return []

    def lines(self, stop: threading.Event) -> Iterator[str]:
        while not stop.is_set():
            batch = self.read_available()
            yield from batch
            if not batch:
                stop.wait(self.poll)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- feedback
Report = Callable[[str, Delivery], Any]


def store_reporter(store: Any) -> Report:
    """Feedback through governor.adapters.feedback, the path the status filter takes too:
    classify, skip what the policy has nothing to say about, ``store.record``."""
    from governor.adapters import feedback

    def record(ip: str, d: Delivery) -> Any:
        c = feedback.classify(d.text)
        if not feedback.worth_recording(c):
            return None
        return feedback.record_sync(store, ip, c, log, mta="postfix", recipient=d.recipient,
                                    queue_id=d.queue_id, event=d.service)

    return record


class LogFeedback:
    """Follow the log and report every non-``sent`` result of a slot transport."""

    def __init__(self, follower: Follower, services: dict[str, str], report: Report) -> None:
        self.follower = follower
        self.services = services
        self.report = report
        self.seen = 0
        self.reported = 0
        self.errors = 0

    def handle(self, line: str) -> Delivery | None:
        d = parse_line(line)
        if d is None or d.service not in self.services:
            return None
        self.seen += 1
        if d.status == "sent" or not d.text:
            return d
        try:
            self.report(self.services[d.service], d)
            self.reported += 1
        except Exception as exc:  # noqa: BLE001 - a failed report must not stop the follower
            self.errors += 1
            log.warning(kv(event="feedback-failed", service=d.service, queue_id=d.queue_id, error=exc))
        return d

    def run(self, stop: threading.Event) -> None:
        try:
            for line in self.follower.lines(stop):
                self.handle(line)
        finally:
            self.follower.close()

    def pump(self) -> int:
        """Handle what is available now; the number of lines read (for tests and --once)."""
        lines = self.follower.read_available()
        for line in lines:
            self.handle(line)
        return len(lines)


def follow_in_thread(path: str, services: dict[str, str], store: Any,
                     stop: threading.Event) -> threading.Thread:
    """Start the follower on a daemon thread (used by ``governor queue-agent --follow-maillog``)."""
    feedback = LogFeedback(Follower(path), services, store_reporter(store))
    thread = threading.Thread(target=feedback.run, args=(stop,), name="maillog-follower", daemon=True)
    thread.start()
    log.info(kv(event="follow", path=path, services=len(services)))
    return thread
