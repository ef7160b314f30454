"""``governor milter``: what Postfix's smtpd asks when mail for Yahoo arrives.

The milter only answers one question per Yahoo recipient: *may any egress IP send to
Yahoo right now?* Routing and pacing are not its job — qmgr asks the transport map
for a slot, and the slot transports pace each IP (docs/postfix.md). So:

* some IP may send → continue (the message is queued and routed later);
* no IP may send (every IP cooling, held or paused):
  - ``holds.action: hold`` → a message whose recipients are *all* governed is
    quarantined at end of message (Postfix's hold queue) and recorded in the store's
    holds registry under its queue id, so the queue agent releases it, paced, when an
    IP may send again. A mixed message is accepted and flows: its other recipients go
    out now, its Yahoo recipients get ``retry:`` from the transport map and the queue
    agent moves the deferred remainder to hold;
  - ``holds.action: tempfail`` → ``451 4.7.1`` for each Yahoo recipient at RCPT; the
    others are accepted;
* Redis unreachable → ``redis_down``: fail-open continues, fail-closed tempfails the
  Yahoo recipients. Logged and counted.

It never rejects or discards. Provider-level state is what the transport map would
answer (``Store.assign(probe=True)``), cached for at most ``CACHE_SECONDS`` per
process (one read serves every connection thread), so a busy smtpd costs Redis about
two reads a second. In hold mode with fail-open, a message that can no longer be held
is accepted at its RCPT, which spares the end-of-message round trip (docs/postfix.md).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import Milter

from governor import metrics
from governor.adapters.queue_agent import STORE_ERRORS, ProviderState
from governor.config import Config
from governor.domains import DomainSet, domain_of
from governor.logsetup import audit, kv
from governor.store.model import Hold

log = logging.getLogger("governor.milter")

CACHE_SECONDS = 0.5
MTA = "postfix"
TEMPFAIL_REPLY = ("451", "4.7.1")


class StoreDown(Exception):
    """The store could not be read (Redis down or too slow)."""


# --------------------------------------------------------------------------- provider view
def probe(store: Any) -> ProviderState:
    """Ask the store exactly what the transport map would answer now (``assign`` in probe
    mode: one script over the pool, nothing recorded), so the milter holds mail precisely
    when qmgr would be told ``retry:``."""
    a = store.assign(None, probe=True)
    return ProviderState(a.granted, "" if a.granted else a.reason, a.ip, a.retry_after)


class ProviderView:
    """:func:`probe` (or any reader of a ProviderState), cached for ``ttl`` seconds; thread-safe.

    A failed read is cached too, so a dead Redis costs one attempt per ``ttl`` rather
    than one per recipient.
    """

    def __init__(self, read: Callable[[], ProviderState], ttl: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._at = -1e18
        self._value: ProviderState | None = None
        self._error: Exception | None = None

    def get(self) -> ProviderState:
        """The cached state; raises StoreDown while the last read failed."""
        with self._lock:
            now = self._clock()
            if now - self._at >= self.ttl:
                self._refresh(now)
            if self._error is not None:
                raise StoreDown(str(self._error))
            assert self._value is not None
            return self._value

    def _refresh(self, now: float) -> None:
        try:
            self._value, self._error = self._read(), None
        except STORE_ERRORS as exc:
            self._error = exc
            metrics.REDIS_ERRORS.inc()
        self._at = now

    def invalidate(self) -> None:
        with self._lock:
            self._at = -1e18


# --------------------------------------------------------------------------- policy glue
@dataclass(frozen=True)
class RcptVerdict:
    """What to do with one recipient: ``continue``, ``tempfail`` or ``hold`` (at EOM)."""

    action: str
    governed: bool
    reply: str = ""


CONTINUE_OTHER = RcptVerdict("continue", False)
CONTINUE_GOVERNED = RcptVerdict("continue", True)


class MilterPolicy:
    """Everything the milter callbacks share: config, domain set, store view, counters.

    One instance per process; every method is safe to call from libmilter's
    per-connection threads.
    """

    def __init__(self, cfg: Config, store: Any, domains: DomainSet | None = None, *,
                 ttl: float = CACHE_SECONDS) -> None:
        self.cfg = cfg
        self.store = store
        self.domains = domains or DomainSet.from_config(cfg)
        self.view = ProviderView(lambda: probe(store), ttl)
        self.counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self.monitor = cfg.mode == "monitor"
        #: No RCPT can be answered 451 (hold mode with fail-open, or monitor mode): a message
        #: that can no longer be held may be accepted at its RCPT, without waiting for the rest.
        self.accept_early = self.monitor or (cfg.holds.action == "hold" and cfg.redis_down == "fail-open")

    def count(self, name: str) -> None:
        """Count locally (logged at stop) and in governor_requests_total{protocol="milter"}."""
        with self._count_lock:
            self.counts[name] += 1
        metrics.REQUESTS.labels("milter", name).inc()

    def governed(self, address: str) -> bool:
        domain = domain_of(address)
        return domain is not None and self.domains.is_governed(domain)

    def recipient(self, address: str) -> RcptVerdict:
        """The verdict for one RCPT (``address`` without angle brackets)."""
        if not self.governed(address):
            self.count("rcpt_other")
            return CONTINUE_OTHER
        self.count("rcpt_governed")
        try:
            state = self.view.get()
        except StoreDown as exc:
            return self._store_down(address, exc)
        if state.open:
            return self.decided(CONTINUE_GOVERNED, "ok")
        if self.monitor:
            self.count("would_" + self.cfg.holds.action)
            log.info(kv(event=f"would-{self.cfg.holds.action}", rcpt=address, reason=state.reason))
            return self.decided(CONTINUE_GOVERNED, "monitor:" + state.reason)
        if self.cfg.holds.action == "tempfail":
            self.count("rcpt_tempfail")
            log.info(kv(event="tempfail", rcpt=address, reason=state.reason, retry_after=f"{state.retry_after:.1f}"))
            return self.decided(RcptVerdict("tempfail", True, self._tempfail_text(state)), state.reason)
        return self.decided(RcptVerdict("hold", True), state.reason)

    @staticmethod
    def decided(verdict: RcptVerdict, reason: str) -> RcptVerdict:
        """Count one governed RCPT's verdict in governor_decisions_total{result, reason}."""
        metrics.DECISIONS.labels(verdict.action, metrics.reason_label(reason)).inc()
        return verdict

    def _store_down(self, address: str, exc: Exception) -> RcptVerdict:
        if self.cfg.redis_down == "fail-closed" and not self.monitor:
            self.count("redis_down_tempfail")
            log.warning(kv(event="redis-down", action="tempfail", rcpt=address, error=exc))
            return self.decided(RcptVerdict("tempfail", True, "governor: rate state unavailable, try again later"),
                                "redis-down")
        self.count("redis_down_continue")
        log.warning(kv(event="redis-down", action="continue", rcpt=address, error=exc))
        return self.decided(CONTINUE_GOVERNED, "redis-down")

    @staticmethod
    def _tempfail_text(state: ProviderState) -> str:
        return f"governor: Yahoo delivery paused ({state.reason}), try again in {max(1, round(state.retry_after))}s"

    def hold_message(self, queue_id: str | None, domain: str | None) -> str | None:
        """At EOM of an all-Yahoo message marked for hold: record the hold and return the
        quarantine reason, or None when the message should simply be accepted (an IP may
        send again, or the hold could not be recorded — an unrecorded hold would never be
        released by the queue agent, while an accepted message is deferred by the
        transport map and held by the queue agent from the deferred queue)."""
        try:
            state = self.view.get()
        except StoreDown as exc:
            log.warning(kv(event="redis-down", action="accept", queue_id=queue_id, error=exc))
            self.count("hold_skipped_redis_down")
            return None
        if state.open:
            return None
        if not queue_id:
            log.warning(kv(event="hold-skipped", reason="no queue id (macro i missing at end of message)"))
            self.count("hold_skipped_no_queue_id")
            return None
        reason = f"governor: no IP may send to Yahoo ({state.reason})"
        ip = state.ip or (self.cfg.pool_ips[0] if self.cfg.pool_ips else None)
        if ip is None:
            return None
        try:
            self.store.add_hold(Hold(queue_id=queue_id, mta=MTA, ip=ip, reason=state.reason, domain=domain))
        except (*STORE_ERRORS, ValueError) as exc:
            log.warning(kv(event="hold-skipped", queue_id=queue_id, reason="registry-failed", error=exc))
            self.count("hold_skipped_registry")
            return None
        return reason

    def forget_hold(self, queue_id: str) -> None:
        """Undo a registry entry whose quarantine failed."""
        try:
            self.store.remove_hold(queue_id, MTA)
        except (*STORE_ERRORS, ValueError) as exc:
            log.warning(kv(event="hold-undo-failed", queue_id=queue_id, error=exc))


# --------------------------------------------------------------------------- the milter
def rcpt_address(milter: Milter.Base, to: str) -> str:
    """The recipient as Postfix resolved it: ``{rcpt_addr}`` if sent, else the RCPT
    argument without its angle brackets (pymilter passes ``<user@dom>``)."""
    macro = milter.getsymval("{rcpt_addr}")
    if macro:
        return str(macro)
    return to.strip().strip("<>")


class GovernorMilter(Milter.Base):
    """One instance per SMTP connection (libmilter thread); state is per message.

    Every callback Postfix need not send is switched off in the negotiation (pymilter's
    ``@nocallback`` defaults: connect, HELO, MAIL, DATA, headers, body). When no RCPT can
    be tempfailed (``policy.accept_early``) a message that can no longer be held is
    accepted at its RCPT, so the usual message costs one RCPT round trip and nothing
    else; otherwise RCPT events and one end-of-message round trip. The per-message state
    is reset at end of message and on abort (RSET), which is why MAIL is not needed.
    """

    policy: MilterPolicy  # set by make_factory()

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.hold = False
        self.accepted = False
        self.governed = 0
        self.other = 0
        self.domain: str | None = None

    def envrcpt(self, to: str, *params: str) -> int:
        if self.accepted:  # Postfix should not send more after ACCEPT; if it does, stay accepted
            return Milter.ACCEPT
        address = rcpt_address(self, to)
        verdict = self.policy.recipient(address)
        if verdict.action == "tempfail":
            self.setreply(*TEMPFAIL_REPLY, verdict.reply)
            return Milter.TEMPFAIL
        if verdict.governed:
            self.governed += 1
            self.domain = self.domain or domain_of(address)
            self.hold = self.hold or verdict.action == "hold"
        else:
            self.other += 1
        if self.policy.accept_early and (self.other or not self.hold):
            # This message can no longer be held (it is mixed, or an IP may send): accept
            # it now, and Postfix skips this milter for the rest of it (no EOM round trip).
            if self.hold:
                self.policy.count("mixed_accepted")
            self.accepted = True
            return Milter.ACCEPT
        return Milter.CONTINUE

    def eom(self) -> int:
        if self.accepted:
            pass
        elif self.hold and self.governed and not self.other:
            self._quarantine()
        elif self.hold:
            self.policy.count("mixed_accepted")
        self._reset()
        return Milter.CONTINUE

    def _quarantine(self) -> None:
        queue_id = self.getsymval("i")
        reason = self.policy.hold_message(queue_id, self.domain)
        if reason is None:
            return
        try:
            self.quarantine(reason)
        except Exception as exc:  # noqa: BLE001 - never lose the message over a failed hold
            log.warning(kv(event="quarantine-failed", queue_id=queue_id, error=exc))
            self.policy.forget_hold(str(queue_id))
            return
        self.policy.count("quarantined")
        log.info(kv(event="hold", queue_id=queue_id, reason=reason))
        audit("hold", queue_id=queue_id, by="milter", reason=reason, mta=MTA)

    def abort(self) -> int:
        self._reset()
        return Milter.CONTINUE

    def close(self) -> int:
        return Milter.CONTINUE


def make_factory(policy: MilterPolicy) -> Callable[[], GovernorMilter]:
    """A ``Milter.factory`` whose instances share ``policy``."""
    return type("BoundGovernorMilter", (GovernorMilter,), {"policy": policy})


# --------------------------------------------------------------------------- running it
def prepare_socket(spec: str, group: str | None) -> None:
    """Create the socket's directory (setgid to ``group`` so the socket inherits it) and
    remove a stale socket. libmilter creates the socket with the process umask (0177:
    owner only until :func:`finish_socket`)."""
    path = spec.removeprefix("unix:").removeprefix("local:")
    if spec.startswith(("inet:", "inet6:")):
        return
    directory = Path(path).parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o750)
        if group:
            import grp

            os.chown(directory, -1, grp.getgrnam(group).gr_gid)
            os.chmod(directory, 0o2750)
    if Path(path).is_socket():
        Path(path).unlink()


def finish_socket(spec: str, mode: int, owner: str | None, group: str | None, timeout: float = 10.0) -> None:
    """Once libmilter has created the socket, give it the configured mode and owner."""
    if spec.startswith(("inet:", "inet6:")):
        return
    path = Path(spec.removeprefix("unix:").removeprefix("local:"))
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if time.monotonic() > deadline:
            log.warning(kv(event="socket-missing", path=path))
            return
        time.sleep(0.02)
    import grp
    import pwd

    uid = pwd.getpwnam(owner).pw_uid if owner else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)
    os.chmod(path, mode)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def block_stop_signals() -> None:
    """Block SIGTERM/SIGINT/SIGHUP in this thread and every thread started after it.

    libmilter stops cleanly by ``sigwait``-ing for them in its own thread, which only
    works if no other thread takes them; a thread started before ``runmilter`` (the log
    queue listener, the socket-mode thread) would otherwise take SIGTERM with its
    default action and kill the process mid-conversation. Call before any thread starts.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def run(cfg: Config, store: Any, socket_spec: str, *, timeout: int = 600) -> MilterPolicy:
    """Serve until libmilter stops (SIGTERM/SIGINT/SIGHUP); returns the policy (counters)."""
    from governor.postfix_setup import pymilter_socket

    block_stop_signals()
    policy = MilterPolicy(cfg, store)
    Milter.factory = make_factory(policy)
    spec = pymilter_socket(socket_spec)
    prepare_socket(spec, cfg.sockets.group)
    # libmilter creates the socket itself: owner-only until finish_socket applies the
    # configured owner/group/mode, so no other user can connect in between
    os.umask(0o177)
    threading.Thread(target=finish_socket, name="milter-socket", daemon=True,
                     args=(spec, cfg.sockets.mode, cfg.sockets.owner, cfg.sockets.group)).start()
    log.info(kv(event="start", socket=spec, mode=cfg.mode, redis_down=cfg.redis_down, holds=cfg.holds.action))
    Milter.runmilter("yahoo-governor", spec, timeout)
    log.info(kv(event="stop", **dict(sorted(policy.counts.items()))))
    return policy
