"""What the store hands back: decisions, per-IP status, holds, audit entries."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    """The answer to one acquire().

    ``reason``: "ok", "cooldown:<code>", "held:<code>", "provider-paused",
    "concurrency", "rate", "warmup" or "no-ip". ``retry_after`` (seconds) is when
    every limit that blocked lifts (for a held IP, a nominal value: only an admin
    ends a hold). ``monitor`` is True when mode=monitor turned a denial into a
    grant; ``reason`` then names what would have denied it. ``now`` is the Redis
    time of the decision; ``per_connection`` the IP's messages-per-connection cap.
    """

    granted: bool
    ip: str | None
    lease: str | None
    retry_after: float
    reason: str
    monitor: bool = False
    now: float = 0.0
    per_connection: int | None = None


@dataclass(frozen=True)
class Assignment:
    """The answer to one assign(): which slot transport a Postfix recipient takes.

    Granted: ``ip``, ``slot`` (1-based) and ``transport`` (``<egress name>-s<slot>``,
    governor.transports.slot_transport). Denied (no IP may send): ``reason`` as for
    Decision ("cooldown:<code>", "provider-paused", "held:<code>", "no-ip"), ``ip`` the
    IP whose cooldown ends first (None when every IP is held) and ``retry_after`` when
    that is (nominal for held IPs). ``offered`` is the number of slots the pool offers
    now; ``monitor`` is True when mode=monitor turned a denial into an assignment.
    """

    granted: bool
    ip: str | None
    slot: int
    transport: str | None
    retry_after: float
    reason: str
    monitor: bool = False
    now: float = 0.0
    offered: int = 0


@dataclass(frozen=True)
class Hold:
    """One message an MTA parked in its hold queue because its IP may not send.

    ``since`` is Redis time (0 = "now" when added); ``due`` is filled only by
    holds_due(): "cooldown-over" (the IP may send again) or "deadline" (release or
    bounce now, before the MTA's queue lifetime runs out).
    """

    queue_id: str
    mta: str
    ip: str
    since: float = 0.0
    reason: str = ""
    domain: str | None = None
    due: str = ""


@dataclass(frozen=True)
class IpStatus:
    """One egress IP as an operator sees it (times are Redis-time seconds, 0 = none)."""

    ip: str
    name: str
    enabled: bool
    cold: bool
    now: float
    leases: int
    concurrency: int
    rate_now: int                   # grants in the last 60 s
    rate_allowed: float             # messages/minute allowed now (limit x ramp factor)
    rate_factor: float
    cooldown_until: float
    cooldown_reason: str
    cooldown_reply: str
    cooldown_start: float
    provider_paused_until: float
    provider_pause_reason: str
    held: bool
    held_reason: str
    held_reply: str
    held_since: float
    level: int
    deferrals: int
    complaints: int
    recent_pauses: int
    holds: int
    per_connection: int
    warmup_cap: int | None
    warmup_used: int
    hold_queue_until: float         # keep its deferred Yahoo mail on hold until (-1 = until released)
    last_limit: str
    last_limit_at: float
    budget_at: float                # when the last limit that fired lifts (-1 = only an admin)

    @property
    def cooling(self) -> bool:
        return self.cooldown_until > self.now or self.provider_paused_until > self.now


@dataclass(frozen=True)
class AuditEntry:
    """One XADD to the audit stream; ``extra`` has the action-specific fields."""

    id: str
    ts: float
    ip: str
    action: str
    reason: str = ""
    reply: str = ""
    who: str = ""
    queue_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)
