"""``governor queue-agent``: park Yahoo mail the MTA must not send now, release it paced.

Why an agent: Postfix decides a message's route when the message becomes active,
which can be minutes before its delivery (docs/postfix-levers.md §2.5). When an
egress IP starts a cooldown, the messages already routed to its slot transports
would still go out through it; and when *no* IP may send, deferred Yahoo mail
would retry into ``retry:`` on Postfix's backoff timers. The agent watches the
store (``status()`` every ``POLL`` seconds) and

* **holds** queued messages whose Yahoo recipients were assigned to an IP that
  started a cooldown or hold with ``hold_queue`` (``store.assigned_ip``), or whose
  delay reason is a Yahoo deferral from such an IP, or — when no IP may send — that
  the transport map deferred (``governor:`` reason). Each hold is recorded in the
  store's holds registry *before* the MTA command runs, so a hold is never orphaned;
* **releases** registry holds once some IP may send again: one token per message
  from the store (``acquire(None)`` then release of the lease at once, so the pace
  is the per-IP GCRA of the IPs that may send, slower while an IP ramps back), at
  most ``holds.release_rate`` a minute when that is set, never all at once;
* releases **regardless of budget** (and logs a warning) holds that reach
  ``arrival + holds.queue_lifetime - holds.release_margin``: a held message past the
  MTA's queue lifetime would bounce.

The MTA side is a small :class:`QueueBackend` protocol: Postfix's is
``governor.adapters.postfix_queue.PostfixQueue``, Exim's
``governor.adapters.exim_queue``. The agent never decides anything about an IP; it
only reads the store's decisions and moves queue files.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import redis

from governor import metrics
from governor.classify import classify
from governor.config import Config
from governor.domains import DomainSet, domain_of
from governor.logsetup import audit, kv
from governor.store.keys import valid_recipient
from governor.store.model import Decision, Hold, IpStatus

log = logging.getLogger("governor.queue_agent")

POLL = 0.25                 # seconds between store.status() reads
BUSY_SCAN = 1.0             # queue scan period while an IP's queue is to be held or no IP may send
REHOLD_GRACE = 3.0          # a message released this recently is not held again for the same reason
HOLD_MARGIN = 1.0           # no new holds for a pause that ends within this: the mail may be moving already
MAX_RELEASE_PER_STEP = 200  # bounded work per step
GOVERNOR_REASON = "governor"   # the transport map's retry: texts ("governor: ...", "governor unavailable")
ASSIGNED_CHUNK = 5000       # recipients per store.assigned_ip() call
STORE_ERRORS = (redis.RedisError, OSError)


# --------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class QueuedMessage:
    """One queued message as the agent sees it (MTA-neutral).

    ``recipients``: its *governed* (Yahoo-managed) recipients still waiting for
    delivery; ``state``: ``incoming``, ``active``, ``deferred`` or ``hold``;
    ``arrival``: Unix time it entered the queue; ``reason``: the MTA's last delay
    reason for those recipients (``""`` when none was recorded yet).
    """

    queue_id: str
    recipients: tuple[str, ...]
    state: str
    arrival: float
    reason: str


@runtime_checkable
class QueueBackend(Protocol):
    """What the agent needs from an MTA's queue. Stable: Postfix and Exim implement it.

    * ``mta``: the name used in the holds registry (``postfix``, ``exim``).
    * ``list_governed(domains)``: every queued message with at least one recipient
      for which ``domains.is_governed`` is true, in any state including held.
    * ``hold(ids)``: stop these messages from being delivered (Postfix: hold queue;
      Exim: freeze); returns the ids that were actually held.
    * ``release(ids)``: undo ``hold`` and schedule an immediate delivery attempt;
      returns the ids that were actually released. Ids that no longer exist are
      left out of both results, never an error.
    """

    mta: str

    def list_governed(self, domains: DomainSet) -> list[QueuedMessage]: ...

    def hold(self, ids: list[str]) -> list[str]: ...

    def release(self, ids: list[str]) -> list[str]: ...


# --------------------------------------------------------------------------- provider state
@dataclass(frozen=True)
class ProviderState:
    """Whether any egress IP may send to Yahoo now, and if not, why and until when."""

    open: bool
    reason: str = ""
    ip: str | None = None       # the IP whose budget returns first (for hold records)
    retry_after: float = 0.0


def may_send(s: IpStatus) -> bool:
    return s.enabled and not s.held and not s.cooling


def provider_state(status: Iterable[IpStatus]) -> ProviderState:
    """Reduce per-IP status to "may any IP send to Yahoo now?" (pure; shared with the milter)."""
    rows = [s for s in status if s.enabled]
    if any(may_send(s) for s in rows):
        return ProviderState(True)
    if not rows:
        return ProviderState(False, "no-ip")
    waiting = [s for s in rows if not s.held]
    if not waiting:
        first = rows[0]
        return ProviderState(False, f"held:{first.held_reason or 'admin'}", first.ip, 0.0)
    first = min(waiting, key=lambda s: max(s.cooldown_until, s.provider_paused_until))
    until = max(first.cooldown_until, first.provider_paused_until)
    reason = (f"cooldown:{first.cooldown_reason or 'admin'}" if first.cooldown_until >= first.provider_paused_until
              else "provider-paused")
    return ProviderState(False, reason, first.ip, max(0.0, until - first.now))


def hold_queue_ips(status: Iterable[IpStatus], margin: float = 0.0) -> dict[str, str]:
    """IPs whose queued Yahoo mail is to be held now (``hold_queue``), with the reason;
    with ``margin``, not an IP whose hold-queue period ends within that many seconds."""
    out = {}
    for s in status:
        if s.hold_queue_until == -1 or s.hold_queue_until > s.now + margin:
            out[s.ip] = (f"held:{s.held_reason}" if s.held else f"cooldown:{s.cooldown_reason or 'admin'}")
    return out


# --------------------------------------------------------------------------- pacing
class RateLimit:
    """An in-process GCRA for ``holds.release_rate`` (messages/minute); None = unlimited."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._clock = clock
        self._tat = 0.0

    def ready(self) -> bool:
        return not self.interval or self._tat <= self._clock()

    def take(self) -> None:
        if self.interval:
            self._tat = max(self._tat, self._clock()) + self.interval

    def delay(self) -> float:
        """Seconds until :meth:`ready` (0 when it is)."""
        return max(0.0, self._tat - self._clock()) if self.interval else 0.0


#: Denials a paced release waits out (the budget returns within seconds); any other
#: reason (cooldown, hold, pause, warm-up cap, no IP) means no IP may send for a while.
TRANSIENT_DENIALS = ("rate", "concurrency")


def budget_token(store: Any, limit: RateLimit, holder: str) -> Decision | None:
    """One message's worth of budget: ``acquire(None)`` then release of the lease at once,
    so releases go at the per-IP pace of the IPs that may send (slower while one ramps
    back), and at most ``limit``. None when ``limit`` is not ready; otherwise the store's
    decision (granted or not, with its reason and retry-after)."""
    if not limit.ready():
        return None
    decision = store.acquire(None, holder=holder)
    if decision.granted:
        if decision.lease:
            store.release(decision.lease)
        limit.take()
    return decision


# --------------------------------------------------------------------------- the agent
@dataclass
class StepReport:
    """What one step did (for logs, ``--once --json`` and tests)."""

    scanned: bool = False
    held: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    deadline: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    error: str = ""


class QueueAgent:
    """The hold / paced-release loop over one :class:`QueueBackend`."""

    def __init__(self, cfg: Config, store: Any, backend: QueueBackend, domains: DomainSet | None = None, *,
                 clock: Callable[[], float] = time.monotonic, poll: float = POLL,
                 busy_scan: float = BUSY_SCAN, idle_scan: float | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.backend = backend
        self.domains = domains or DomainSet.from_config(cfg)
        self.clock = clock
        self.poll = poll
        self.busy_scan = busy_scan
        self.idle_scan = idle_scan if idle_scan is not None else cfg.holds.scan_interval
        self.limit = RateLimit(cfg.holds.release_rate, clock)
        self.counts: Counter[str] = Counter()
        self._hq: dict[str, str] = {}
        self._last_scan = -1e18
        self._released: dict[str, tuple[float, str]] = {}  # queue id -> (when, delay reason then)
        self._reasons: dict[str, str] = {}                 # queue id -> delay reason at the last scan
        self._kick: list[str] = []                         # deferred by the map's retry: while IPs may send
        self._assigned_warned = False

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event | None = None, *, max_seconds: float | None = None) -> None:
        """Step every ``poll`` seconds until ``stop`` is set (or ``max_seconds`` pass)."""
        stop = stop or threading.Event()
        end = None if max_seconds is None else self.clock() + max_seconds
        while not stop.is_set() and (end is None or self.clock() < end):
            started = self.clock()
            self.step()
            stop.wait(max(0.0, self.poll - (self.clock() - started)))

    def step(self) -> StepReport:
        """Read the store; hold what must not go out; release what may, paced."""
        report = StepReport()
        try:
            status = self.store.status()
        except STORE_ERRORS as exc:
            self._store_down(report, exc)
            return report
        try:
            self._step(status, report)
        except STORE_ERRORS as exc:
            self._store_down(report, exc)
        except QueueCommandError as exc:
            report.error = str(exc)
            self._count("mta_errors")
            log.error(kv(event="mta-command-failed", mta=self.backend.mta, error=exc))
        return report

    def _count(self, op: str, n: int = 1) -> None:
        """Local counters (printed at stop) and governor_queue_operations_total."""
        self.counts[op] += n
        if n:
            metrics.QUEUE_OPS.labels(self.backend.mta, op).inc(n)

    def _store_down(self, report: StepReport, exc: Exception) -> None:
        """Without the store nothing is held or released: the MTA queue keeps everything."""
        report.error = f"store: {exc}"
        self.counts["redis_errors"] += 1
        metrics.REDIS_ERRORS.inc()
        log.warning(kv(event="redis-down", action="wait", error=exc))

    def _step(self, status: list[IpStatus], report: StepReport) -> None:
        now = self.clock()
        hq = hold_queue_ips(status, HOLD_MARGIN)
        state = provider_state(status)
        new = set(hq) - set(self._hq)
        self._hq = hq
        for ip in sorted(new):
            log.info(kv(event="hold-queue-start", ip=ip, reason=hq[ip]))
        period = self.busy_scan if (hq or not state.open) else self.idle_scan
        if new or now - self._last_scan >= period:
            self._last_scan = now
            report.scanned = True
            self.scan(hq, state, report)
        self.release_due(state, report)
        self._forget_old_releases(now)

    # ------------------------------------------------------------------ hold
    def scan(self, hq: dict[str, str], state: ProviderState, report: StepReport) -> None:
        """List the queue once; hold what must not go out; let go of registry holds whose
        message is no longer queued Yahoo mail."""
        messages = self.backend.list_governed(self.domains)
        self._count("scans")
        registry = {h.queue_id: h for h in self._registry()}
        candidates = [m for m in messages if m.state != "hold"]
        self._reasons = {m.queue_id: m.reason for m in candidates}
        self._kick = [m.queue_id for m in candidates if state.open and self._kickable(m)]
        assigned = self._assigned(candidates) if hq else {}
        todo: list[tuple[QueuedMessage, str, str]] = []
        for msg in candidates:
            why = self._hold_reason(msg, hq, state, assigned)
            if why is not None:
                todo.append((msg, *why))
        if todo:
            self._hold(todo, report)
        self._release_gone(registry, {m.queue_id for m in messages}, report)

    def _hold_reason(self, msg: QueuedMessage, hq: dict[str, str], state: ProviderState,
                     assigned: dict[str, str]) -> tuple[str, str] | None:
        """(ip, reason) when ``msg`` must be held now, else None."""
        recent = self._released.get(msg.queue_id)
        fresh = recent is None or self.clock() - recent[0] >= REHOLD_GRACE
        if msg.state == "active" and fresh:
            for rcpt in msg.recipients:
                ip = assigned.get(rcpt)
                if ip in hq:
                    return ip, hq[ip]
        if msg.reason and (recent is None or recent[1] != msg.reason):
            if msg.reason.startswith(GOVERNOR_REASON):
                if not state.open and state.retry_after > HOLD_MARGIN and msg.state == "deferred":
                    return state.ip or self._any_ip(), state.reason
                return None
            c = classify(msg.reason)
            if c.is_yahoo and c.ip in hq:
                return c.ip, hq[c.ip]
        return None

    def _kickable(self, msg: QueuedMessage) -> bool:
        """Deferred by the transport map's ``retry:`` although an IP may send now: without
        a kick it would wait for the MTA's backoff timer (minutes in production)."""
        recent = self._released.get(msg.queue_id)
        return (msg.state == "deferred" and msg.reason.startswith(GOVERNOR_REASON)
                and (recent is None or self.clock() - recent[0] >= REHOLD_GRACE))

    def _any_ip(self) -> str:
        return self.cfg.pool_ips[0] if self.cfg.pool_ips else "0.0.0.0"

    def _assigned(self, messages: Sequence[QueuedMessage]) -> dict[str, str]:
        """recipient -> the IP the transport map last assigned it to, for active mail."""
        rcpts = sorted({r for m in messages if m.state == "active" for r in m.recipients if _recipient(r)})
        lookup = getattr(self.store, "assigned_ip", None)
        if not rcpts:
            return {}
        if lookup is None:
            if not self._assigned_warned:
                self._assigned_warned = True
                log.warning(kv(event="no-assignments", detail="store has no assigned_ip; active-queue mail is "
                                                                   "held only after a Yahoo deferral"))
            return {}
        out: dict[str, str] = {}
        for i in range(0, len(rcpts), ASSIGNED_CHUNK):
            out.update(lookup(rcpts[i:i + ASSIGNED_CHUNK]))
        return out

    def _hold(self, todo: list[tuple[QueuedMessage, str, str]], report: StepReport) -> None:
        """Registry first, then the MTA: a hold is never left unrecorded."""
        for msg, ip, reason in todo:
            self.store.add_hold(Hold(queue_id=msg.queue_id, mta=self.backend.mta, ip=ip, since=msg.arrival,
                                     reason=reason, domain=_domain(msg)))
        ids = [m.queue_id for m, _, _ in todo]
        held = set(self.backend.hold(ids))
        for qid in ids:
            if qid not in held:  # gone meanwhile (delivered): nothing to release later
                self.store.remove_hold(qid, self.backend.mta)
        report.held += [q for q in ids if q in held]
        self._count("held", len(held))
        by_ip = Counter(ip for m, ip, _ in todo if m.queue_id in held)
        for ip, n in sorted(by_ip.items()):
            log.info(kv(event="held", mta=self.backend.mta, ip=ip, messages=n))
        for msg, ip, reason in todo:
            if msg.queue_id in held:
                audit("hold", queue_id=msg.queue_id, ip=ip, by="queue-agent", reason=reason, mta=self.backend.mta)

    def _release_gone(self, registry: dict[str, Hold], present: set[str], report: StepReport) -> None:
        """Registry holds whose message no longer shows as queued Yahoo mail: delivered or
        deleted meanwhile, released by an admin, or held in the instant its last Yahoo
        recipient was being delivered (its other recipients would then wait in the hold
        queue for ever). They are released at once — no Yahoo traffic can come of it, and
        ids that vanished are ignored — and dropped from the registry. A hold younger
        than 5 s is left alone: the milter registers one just before its quarantine."""
        now_wall = time.time()
        gone = [qid for qid, hold in registry.items() if qid not in present and now_wall - hold.since > 5.0]
        if not gone:
            return
        self.backend.release(gone)
        for qid in gone:
            self.store.remove_hold(qid, self.backend.mta)
        report.forgotten += gone

    def _registry(self) -> list[Hold]:
        return [h for h in self.store.holds() if h.mta == self.backend.mta]

    # ------------------------------------------------------------------ release
    def release_due(self, state: ProviderState, report: StepReport) -> None:
        """Release registry holds (deadline ones always, the rest one store token each),
        then kick deferred ``retry:`` mail the same way."""
        holds = self._registry()
        deadline = self._deadline_ids(holds)
        if deadline:
            log.warning(kv(event="deadline-release", mta=self.backend.mta, messages=len(deadline),
                           detail="released before the queue lifetime runs out, whatever the budget"))
            report.deadline += self._release(deadline, "deadline")
            self._count("deadline_released", len(deadline))
        if not state.open:
            return
        waiting = [h.queue_id for h in sorted(holds, key=lambda h: h.since) if h.queue_id not in deadline]
        held = set(waiting)
        ids = []
        for qid in waiting + [q for q in self._kick if q not in held]:
            if len(ids) >= MAX_RELEASE_PER_STEP or not self._token():
                break
            ids.append(qid)
        self._kick = [q for q in self._kick if q not in ids]
        if ids:
            report.released += self._release(ids)

    def _deadline_ids(self, holds: list[Hold]) -> list[str]:
        margin = self.cfg.holds.queue_lifetime - self.cfg.holds.release_margin
        now_wall = time.time()
        return [h.queue_id for h in holds if h.since + margin <= now_wall]

    def _token(self) -> bool:
        """One message's worth of budget from the store (and the local release_rate)."""
        decision = budget_token(self.store, self.limit, "queue-agent")
        return decision is not None and decision.granted

    def _release(self, ids: list[str], why: str = "may-send") -> list[str]:
        released = self.backend.release(ids)
        now = self.clock()
        for qid in ids:  # kicked (unregistered) ids cost one HGET here
            self.store.remove_hold(qid, self.backend.mta)
        for qid in released:
            self._released[qid] = (now, self._reasons.get(qid, ""))
        self._count("released", len(released))
        if released:
            log.info(kv(event="released", mta=self.backend.mta, messages=len(released)))
        for qid in released:
            audit("release", queue_id=qid, by="queue-agent", reason=why, mta=self.backend.mta)
        return released

    def _forget_old_releases(self, now: float) -> None:
        if len(self._released) > 10000:
            cutoff = now - 600
            self._released = {q: v for q, v in self._released.items() if v[0] >= cutoff}


class QueueCommandError(RuntimeError):
    """An MTA queue command failed (the agent logs it and tries again next step)."""


def _recipient(address: str) -> bool:
    """Only addresses the store accepts as recipients are looked up (others were never assigned)."""
    try:
        valid_recipient(address)
    except ValueError:
        return False
    return True


def _domain(msg: QueuedMessage) -> str | None:
    return domain_of(msg.recipients[0]) if msg.recipients else None
