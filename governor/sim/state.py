"""Pure per-sending-IP state machine of the Yahoo MX simulator (no I/O, injected clock).

The SMTP layer reports events (connect, MAIL, RCPT, end of DATA, RSET, disconnect)
and sends whatever :class:`Reply` comes back; every decision and every counter lives
here, so it can be tested with a fake clock and no sockets.

Model (one view per sending IP, shared by all simulated MX hosts):

* **Admission** — when a connection arrives the IP's standing is judged once:
  blocked → TS03 at connect; escalated to TS03/TS02 → that code; inside a penalty
  window → TSS04; more than ``max_conn`` connections open → TSS04. The reply is sent
  at the configured stage (connect/mail/rcpt) and the session is closed. A session
  that was admitted keeps its standing; it is stopped only by its own per-message
  limits below (so the first N of N+k parallel connections all get through).
* **Per message** (at MAIL FROM) — more than ``max_per_conn`` accepted messages on
  this connection → "421 Max message per connection" (not a penalty); sliding
  ``rate_window`` already holding ``max_rate`` accepted + in-flight messages →
  TSS04; a cold IP whose ``cold_window`` holds ``cold_budget`` messages → TS01.
  A message is reserved at MAIL and counted at end of DATA, so concurrent sessions
  cannot overshoot a limit between check and accept.
* **Violations** — every over-limit reply (TSS04, TS01) and every connection
  attempt while the IP is in a penalty window or escalated counts one violation.
  TSS04-type violations (re)start the penalty window (``penalty`` s), so retrying
  into a penalty keeps it alive. The ``ts02_after``-th violation is answered with
  TS02 and the ``ts03_after``-th with TS03; both are sticky until ``reset-ip``.
  An IP that stays clean for ``violation_reset`` s starts counting from zero again
  (seed 001: a four-hour pause "resets Yahoo's reputation counter").
* **Recipients** — ``dd_pattern`` → 554 dd, ``defer_pattern`` → 451 [160]; neither
  closes the session nor counts as an IP violation.
* **Per-IP overrides** — ``limit IP KEY VALUE`` gives one sending IP its own
  ``max_conn``, ``max_rate`` or ``max_per_conn`` (Yahoo's tolerance differs per IP);
  ``unlimit IP`` drops them. Tests use it to make one IP of a pool hit TSS04.
* **Faults** — ``fault KIND [EVERY]`` makes every EVERY-th session event of that
  kind misbehave the way broken MXes and networks do (see :data:`FAULT_KINDS`);
  the message is then *not* accepted (not counted), so the sender must retry it.
  Fault tests use it to prove that an MTA's retry delivers everything exactly once.
"""
from __future__ import annotations

import re
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from governor.sim import replies
from governor.sim.replies import KINDS, TS01, TS02, TS03, TSS04, Reply
from governor.sim.settings import Settings, normalize_ip

Clock = Callable[[], float]

OK = "ok"
IP_LIMIT_KEYS = ("max_conn", "max_rate", "max_per_conn")

#: ``drop-data``: the connection is cut after the message data arrived, before the
#: end-of-DATA reply (the sender cannot know whether it was taken);
#: ``garbage-data``: a line that is no SMTP reply instead of the end-of-DATA reply,
#: then hang up; ``garbage-greeting``: such a line instead of the 220 greeting.
FAULT_KINDS = ("drop-data", "garbage-data", "garbage-greeting")
GARBAGE = "x\x01?! <html>502 Bad Gateway</html> \x7f"


@dataclass
class IpRecord:
    """Everything known about one sending IP: counters, live load and standing."""

    ip: str
    connections: int = 0
    accepted: int = 0
    recipients: int = 0
    replies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    open: int = 0
    concurrency_hwm: int = 0
    inflight: int = 0
    accept_times: array[float] = field(default_factory=lambda: array("d"))  # packed: 8 B each
    level: str = OK  # OK, TS02 or TS03 (sticky)
    penalty_until: float = 0.0
    violations: int = 0
    last_violation: float | None = None

    def accepted_since(self, since: float) -> int:
        """Accepted messages with a timestamp >= ``since`` (accept_times is sorted)."""
        return len(self.accept_times) - bisect_left(self.accept_times, since)

    def standing(self, now: float, blocked: bool) -> str:
        """One word for humans: blocked, TS03, TS02, TSS04 (penalty running) or ok."""
        if blocked:
            return "blocked"
        if self.level != OK:
            return self.level
        return TSS04 if now < self.penalty_until else OK


@dataclass(eq=False)
class Conn:
    """One SMTP session as the state machine sees it."""

    ip: str
    pending: Reply | None = None  # IP verdict waiting for its stage
    accepted: int = 0
    reserved: bool = False
    open: bool = True


@dataclass
class SinkRecord:
    """Counters of the plain sink (no limits) for one sending IP."""

    connections: int = 0
    accepted: int = 0
    recipients: int = 0


class SimState:
    """Per-IP limits, penalties and accounting; see the module docstring for the model."""

    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.clock = clock
        self.started_at = clock()
        self._settings = settings
        self._dd = self._defer = None
        self.settings = settings  # compiles the patterns
        self.cold: set[str] = set(settings.cold_ips)
        self.blocked: set[str] = set(settings.blocked_ips)
        self._records: dict[str, IpRecord] = {}
        self._live: set[Conn] = set()
        self.open = 0
        self.concurrency_hwm = 0
        self.sink: dict[str, SinkRecord] = {}
        self.ip_limits: dict[str, dict[str, int]] = {}
        self.fault: tuple[str, int] | None = None   # (kind, every)
        self._fault_seen = 0
        self.faults: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)

    # -- settings -------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._settings = value
        self._dd = re.compile(value.dd_pattern, re.IGNORECASE) if value.dd_pattern else None
        self._defer = re.compile(value.defer_pattern, re.IGNORECASE) if value.defer_pattern else None

    # -- SMTP events ------------------------------------------------------------------

    def connect(self, ip: str) -> tuple[Conn, Reply | None]:
        """A connection from ``ip`` arrived; a reply means: send it instead of 220, close."""
        now = self.clock()
        rec = self.record(ip)
        rec.connections += 1
        rec.open += 1
        rec.concurrency_hwm = max(rec.concurrency_hwm, rec.open)
        self.open += 1
        self.concurrency_hwm = max(self.concurrency_hwm, self.open)
        conn = Conn(rec.ip)
        self._live.add(conn)
        if rec.ip in self.blocked:
            return conn, self._send(conn, replies.ts03(rec.ip))
        kind = self._admission(rec, now)
        if kind is None and self.settings.stage == "connect":
            kind = self._volume(rec, now)
        if kind is None:
            return conn, None
        conn.pending = replies.by_kind(kind, rec.ip)
        if self.settings.stage == "connect":
            return conn, self._send(conn, conn.pending)
        return conn, None

    def mail(self, conn: Conn) -> Reply | None:
        """MAIL FROM; None means 250 (the message is reserved against the limits)."""
        self._release(conn)
        stage = self.settings.stage
        if conn.pending is not None:
            return None if stage == "rcpt" else self._send(conn, conn.pending)
        if conn.accepted >= self.limit(conn.ip, "max_per_conn"):
            return self._send(conn, replies.max_per_conn())
        rec = self.record(conn.ip)
        kind = self._volume(rec, self.clock())
        if kind is not None:
            conn.pending = replies.by_kind(kind, rec.ip)
            return None if stage == "rcpt" else self._send(conn, conn.pending)
        conn.reserved = True
        rec.inflight += 1
        return None

    def rcpt(self, conn: Conn, address: str) -> Reply | None:
        """RCPT TO; None means 250. Pattern replies do not close the session."""
        if conn.pending is not None:
            return self._send(conn, conn.pending)
        if self._dd is not None and self._dd.search(address):
            return self._send(conn, replies.dd(address, self.settings.hostname))
        if self._defer is not None and self._defer.search(address):
            return self._send(conn, replies.defer())
        return None

    def data(self, conn: Conn, recipients: int) -> None:
        """End of DATA accepted: count the message and its recipients."""
        now = self.clock()
        self._release(conn)
        rec = self.record(conn.ip)
        rec.accepted += 1
        rec.recipients += recipients
        if rec.accept_times and now < rec.accept_times[-1]:
            now = rec.accept_times[-1]  # wall clock stepped back: keep the list sorted
        rec.accept_times.append(now)
        conn.accepted += 1

    def rset(self, conn: Conn) -> None:
        """The transaction was abandoned (RSET, EHLO, failed DATA): free its reservation."""
        self._release(conn)

    def disconnect(self, conn: Conn) -> None:
        """The session is gone; safe to call more than once."""
        if not conn.open:
            return
        conn.open = False
        self._release(conn)
        self._live.discard(conn)
        rec = self.record(conn.ip)
        rec.open = max(0, rec.open - 1)
        self.open = max(0, self.open - 1)

    # -- sink -------------------------------------------------------------------------

    def sink_connect(self, ip: str) -> None:
        self.sink.setdefault(normalize_ip(ip), SinkRecord()).connections += 1

    def sink_accept(self, ip: str, recipients: int) -> None:
        rec = self.sink.setdefault(normalize_ip(ip), SinkRecord())
        rec.accepted += 1
        rec.recipients += recipients

    # -- control ------------------------------------------------------------------------

    def record(self, ip: str) -> IpRecord:
        rec = self._records.get(ip)
        if rec is None:
            ip = normalize_ip(ip)
            rec = self._records.setdefault(ip, IpRecord(ip))
        return rec

    def reset(self) -> None:
        """Forget all counters and standings (cold/blocked lists and settings stay).

        Sessions still open are carried over as open load, so concurrency stays right.
        """
        self._records.clear()
        self.sink.clear()
        self.faults = dict.fromkeys(FAULT_KINDS, 0)
        self.started_at = self.clock()
        self.open = self.concurrency_hwm = 0
        for conn in self._live:
            rec = self.record(conn.ip)
            rec.open += 1
            rec.concurrency_hwm = max(rec.concurrency_hwm, rec.open)
            rec.inflight += conn.reserved
            self.open += 1
        self.concurrency_hwm = self.open

    def reset_ip(self, ip: str) -> None:
        """Release ``ip`` the way Yahoo's postmaster would: clear penalty and escalation.

        Counters and the accept history stay (they are facts, and the rate window
        keeps counting real traffic).
        """
        rec = self.record(ip)
        rec.level = OK
        rec.penalty_until = 0.0
        rec.violations = 0
        rec.last_violation = None

    def limit(self, ip: str, key: str) -> int:
        """The ``key`` limit (max_conn, max_rate, max_per_conn) in force for ``ip``."""
        own = self.ip_limits.get(ip)
        if own is not None and key in own:
            return own[key]
        return int(getattr(self.settings, key))

    def set_ip_limit(self, ip: str, key: str, value: int | None) -> None:
        """Give ``ip`` its own limit (None drops every override of that IP)."""
        ip = normalize_ip(ip)
        if value is None:
            self.ip_limits.pop(ip, None)
            return
        if key not in IP_LIMIT_KEYS:
            raise ValueError(f"per-IP limit must be one of {', '.join(IP_LIMIT_KEYS)}, got {key!r}")
        self.ip_limits.setdefault(ip, {})[key] = value

    def set_cold(self, ip: str, cold: bool = True) -> None:
        (self.cold.add if cold else self.cold.discard)(normalize_ip(ip))

    def set_blocked(self, ip: str, blocked: bool = True) -> None:
        (self.blocked.add if blocked else self.blocked.discard)(normalize_ip(ip))

    def set_fault(self, kind: str | None, every: int = 1) -> None:
        """Inject ``kind`` on every ``every``-th matching event (None: no faults)."""
        if kind is None:
            self.fault = None
            return
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault must be one of {', '.join(FAULT_KINDS)} or none, got {kind!r}")
        if every < 1:
            raise ValueError(f"fault EVERY must be >= 1, got {every}")
        self.fault, self._fault_seen = (kind, every), 0

    def take_fault(self, kind: str) -> bool:
        """The SMTP layer asks at each event that ``kind`` could hit; True: misbehave now."""
        if self.fault is None or self.fault[0] != kind:
            return False
        self._fault_seen += 1
        if self._fault_seen % self.fault[1]:
            return False
        self.faults[kind] += 1
        return True

    # -- stats ----------------------------------------------------------------------------

    def stats(self, include_times: bool = True) -> dict[str, Any]:
        """Accounting as a JSON-ready dict (see ``governor sim --help``, STATS)."""
        now = self.clock()
        ips = {ip: self._ip_stats(rec, now, include_times) for ip, rec in sorted(self._records.items())}
        total_replies = dict.fromkeys(KINDS, 0)
        for rec in self._records.values():
            for kind, count in rec.replies.items():
                total_replies[kind] += count
        firsts = [r.accept_times[0] for r in self._records.values() if r.accept_times]
        lasts = [r.accept_times[-1] for r in self._records.values() if r.accept_times]
        total = {
            "connections": sum(r.connections for r in self._records.values()),
            "accepted": sum(r.accepted for r in self._records.values()),
            "recipients": sum(r.recipients for r in self._records.values()),
            "replies": total_replies,
            "open": self.open,
            "concurrency_hwm": self.concurrency_hwm,
            "first_accept": min(firsts) if firsts else None,
            "last_accept": max(lasts) if lasts else None,
        }
        sink_ips = {ip: vars(rec).copy() for ip, rec in sorted(self.sink.items())}
        sink_total = {k: sum(r[k] for r in sink_ips.values()) for k in ("connections", "accepted", "recipients")}
        return {
            "now": now,
            "started_at": self.started_at,
            "total": total,
            "ips": ips,
            "cold": sorted(self.cold),
            "blocked": sorted(self.blocked),
            "sink": {"total": sink_total, "ips": sink_ips},
            "fault": {"kind": self.fault[0], "every": self.fault[1]} if self.fault else None,
            "faults": dict(self.faults),
        }

    def _ip_stats(self, rec: IpRecord, now: float, include_times: bool) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "connections": rec.connections,
            "accepted": rec.accepted,
            "recipients": rec.recipients,
            "replies": dict(rec.replies),
            "open": rec.open,
            "concurrency_hwm": rec.concurrency_hwm,
            "first_accept": rec.accept_times[0] if rec.accept_times else None,
            "last_accept": rec.accept_times[-1] if rec.accept_times else None,
            "in_rate_window": rec.accepted_since(now - s.rate_window),
            "standing": rec.standing(now, rec.ip in self.blocked),
            "penalty_remaining": max(0.0, rec.penalty_until - now),
            "violations": rec.violations,
            "cold": rec.ip in self.cold,
            "blocked": rec.ip in self.blocked,
            "limits": dict(self.ip_limits.get(rec.ip, {})),
        }
        if rec.ip in self.cold:
            out["cold_used"] = rec.accepted_since(now - s.cold_window)
        if include_times:
            out["accept_times"] = list(rec.accept_times)
        return out

    # -- decisions --------------------------------------------------------------------------

    def _admission(self, rec: IpRecord, now: float) -> str | None:
        """Standing and concurrency when a connection arrives; the reply kind or None."""
        if rec.level != OK or now < rec.penalty_until:
            self._violate(rec, now, penalize=True)
            return self._escalated(rec, TSS04)
        if rec.open > self.limit(rec.ip, "max_conn"):
            self._violate(rec, now, penalize=True)
            return self._escalated(rec, TSS04)
        return None

    def _volume(self, rec: IpRecord, now: float) -> str | None:
        """Rate window and cold budget for one more message; the reply kind or None."""
        s = self.settings
        if rec.accepted_since(now - s.rate_window) + rec.inflight >= self.limit(rec.ip, "max_rate"):
            self._violate(rec, now, penalize=True)
            return self._escalated(rec, TSS04)
        if rec.ip in self.cold and rec.accepted_since(now - s.cold_window) + rec.inflight >= s.cold_budget:
            self._violate(rec, now, penalize=False)
            return self._escalated(rec, TS01)
        return None

    def _violate(self, rec: IpRecord, now: float, penalize: bool) -> None:
        """Count one violation; (re)start the penalty; escalate at the thresholds."""
        s = self.settings
        if rec.level == OK and rec.last_violation is not None and now - rec.last_violation >= s.violation_reset:
            rec.violations = 0
        rec.violations += 1
        rec.last_violation = now
        if penalize:
            rec.penalty_until = max(rec.penalty_until, now + s.penalty)
        if rec.violations >= s.ts03_after:
            rec.level = TS03
        elif rec.violations >= s.ts02_after and rec.level == OK:
            rec.level = TS02

    @staticmethod
    def _escalated(rec: IpRecord, kind: str) -> str:
        return rec.level if rec.level != OK else kind

    def _send(self, conn: Conn, reply: Reply) -> Reply:
        """Count a reply that is about to be sent."""
        self.record(conn.ip).replies[reply.kind] += 1
        if reply is conn.pending:
            conn.pending = None
        return reply

    def _release(self, conn: Conn) -> None:
        if conn.reserved:
            conn.reserved = False
            rec = self.record(conn.ip)
            rec.inflight = max(0, rec.inflight - 1)
