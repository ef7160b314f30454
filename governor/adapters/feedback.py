"""Feedback: one reply an egress IP got from Yahoo -> classify -> store.record (policy).

Shared by Exim's ``report`` request, Postfix's delivery status filter (socketmap
``status-<name>``) and a future log follower, so a reply means the same thing
whichever way it arrives. Each adapter strips its own framing (Postfix's leading
DSN, Exim's event name) and knows which IP sent the message; the classifier
unwraps the MTA's "host X[ip] said:" / "SMTP error from remote mail server after
...:" text; the policy (inside store.record) decides what to do.

Replies without a code or class (250 OK, "Connection refused") and successes are
never sent to the store: the policy has nothing to say about them, and skipping
them saves a Redis round trip per delivery.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from governor import logsetup, metrics
from governor.classify import Classification, classify
from governor.logsetup import kv

__all__ = ["Feedback", "classify", "worth_recording", "record", "record_sync", "log_event"]


@dataclass(frozen=True)
class Feedback:
    """What one reply did: its code, the actions the policy took, whether it was recorded."""

    code: str | None
    actions: tuple[str, ...] = ()
    recorded: bool = False

    @property
    def actions_text(self) -> str:
        return ",".join(self.actions) or "-"


def worth_recording(c: Classification | None) -> bool:
    """True when the policy may react: a classified (code or class) non-success reply."""
    return c is not None and not c.success and (c.code is not None or c.cls is not None)


async def record(store: Any, ip: str, c: Classification, log: logging.Logger, *, mta: str,
                 domain: str | None = None, recipient: str | None = None, queue_id: str | None = None,
                 event: str | None = None) -> Feedback:
    """Let the policy react to ``c`` on ``ip`` (AsyncStore); logs one info line."""
    actions = await store.record(ip, c, recipient, domain, queue_id=queue_id, mta=mta)
    return _done(log, ip, c, actions, mta, domain, recipient, queue_id, event)


def record_sync(store: Any, ip: str, c: Classification, log: logging.Logger, *, mta: str,
                domain: str | None = None, recipient: str | None = None, queue_id: str | None = None,
                event: str | None = None) -> Feedback:
    """:func:`record` for the blocking Store (a log follower, the CLI)."""
    actions = store.record(ip, c, recipient, domain, queue_id=queue_id, mta=mta)
    return _done(log, ip, c, actions, mta, domain, recipient, queue_id, event)


def _done(log: logging.Logger, ip: str, c: Classification, actions: list[Any], mta: str, domain: str | None,
          recipient: str | None, queue_id: str | None, event: str | None) -> Feedback:
    fb = Feedback(c.code or c.cls, tuple(a.kind for a in actions), True)
    metrics.FEEDBACK.labels(ip, metrics.reply_code_label(c.code or c.cls, c.success)).inc()
    for kind in fb.actions:
        metrics.ACTIONS.labels(kind).inc()
    log_event(log, ip, c, fb, mta=mta, domain=domain, recipient=recipient, queue_id=queue_id, event=event)
    audit_reactions(ip, actions, mta=mta, queue_id=queue_id, domain=domain)
    return fb


def audit_reactions(ip: str, actions: list[Any], *, mta: str, queue_id: str | None, domain: str | None) -> None:
    """One syslog audit line per automatic reaction (not the bare counters), carrying the
    queue id of the message whose reply caused it."""
    for a in actions:
        if a.kind in ("count_deferral", "count_complaint"):
            continue
        logsetup.audit(a.kind, ip=ip, by="policy", reason=a.reason, queue_id=queue_id, mta=mta, domain=domain,
                       seconds=f"{a.seconds:g}" if a.seconds else None,
                       factor=f"{a.factor:g}" if a.kind == "slow" else None,
                       level=a.level if a.kind == "escalate" else None,
                       value=a.value if a.kind == "per_connection" else None)


def log_event(log: logging.Logger, ip: str | None, c: Classification | None, fb: Feedback, *, mta: str,
              domain: str | None = None, recipient: str | None = None, queue_id: str | None = None,
              event: str | None = None, level: int = logging.INFO) -> None:
    """``event=feedback ip=… code=TSS04 actions=pause,slow domain=aol.com msg=… reply="…"``."""
    if not log.isEnabledFor(level):
        return
    log.log(level, kv(event="feedback", ip=ip, code=fb.code, actions=fb.actions_text, domain=domain,
                      msg=queue_id, rcpt=recipient, mta=mta, mta_event=event,
                      reply=c.text if c is not None else None))
