"""The policy: what to do about one classified Yahoo reply. Pure functions, no I/O.

(classified event, IP, domain, current per-IP state, config, now) → actions.
The store applies the actions atomically with "max" semantics (a cooldown only
ever gets longer, a level only higher, a rate factor only lower), so a policy
decision made on a slightly stale state can never undo a stricter one.

What to do per reply code is data (``governor/data/reactions.yaml``, overridable
in governor.yaml); this module only turns one reaction into concrete actions:

- pauses repeat-lengthen: the n-th pause inside ``escalation.repeat_window`` lasts
  ``pause × repeat_factor^(n-1)``, capped at ``escalation.max_pause``;
- a reply that arrives while the IP is already cooling (in-flight deliveries
  answered after the first deferral) does not count as a repeat;
- per-recipient deferrals are complaint signals counted per unit time; reaching
  ``complaints.threshold`` within ``complaints.window`` slows the IP down;
- the escalation level only goes up here; only an admin lowers it.
"""
from __future__ import annotations

from dataclasses import dataclass

from governor.classify import Classification
from governor.config import Config, Reaction
from governor.yamlnode import format_duration

ACTION_KINDS = (
    "pause", "hold_ip", "slow", "escalate", "per_connection",
    "count_deferral", "count_complaint", "hold_queue", "failover", "alert",
)
LEVEL_NAMES = {0: "none", 1: "TS01", 2: "TS02", 3: "blocked"}


@dataclass(frozen=True)
class IpState:
    """What the policy needs to know about one egress IP (built by the store)."""

    level: int = 0
    cooldown_until: float = 0.0
    held: bool = False
    recent_pauses: int = 0
    complaints: int = 0
    deferrals: int = 0
    rate_factor: float = 1.0


@dataclass(frozen=True)
class Action:
    """One thing the store must do for an IP; see ACTION_KINDS."""

    kind: str
    seconds: float = 0.0
    factor: float = 1.0
    level: int = 0
    value: int = 0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}")


def decide(event: Classification, ip: str, domain: str | None, state: IpState, config: Config,
           now: float) -> list[Action]:
    """Actions for one reply seen on ``ip`` (``domain`` is the recipient's, for the audit)."""
    if event.success or (event.code is None and event.cls is None):
        return []
    reaction = config.reaction_for(event.code, event.cls)
    reason = event.code or event.cls or "unknown"
    actions: list[Action] = []
    actions += _counters(reaction, state, config, reason)
    actions += _stop(reaction, state, config, now, reason)
    if reaction.level is not None and reaction.level > state.level:
        actions.append(Action("escalate", level=reaction.level, reason=reason))
    if reaction.per_connection is not None:
        actions.append(Action("per_connection", value=reaction.per_connection, reason=reason))
    if reaction.alert:
        actions.append(Action("alert", reason=reason))
    return actions


def _counters(reaction: Reaction, state: IpState, config: Config, reason: str) -> list[Action]:
    """Deferral/complaint counting, and the slow-down when complaints pile up."""
    out: list[Action] = []
    if reaction.deferral:
        out.append(Action("count_deferral", reason=reason))
    if reaction.complaint:
        out.append(Action("count_complaint", reason=reason))
        c = config.complaints
        if state.complaints + 1 >= c.threshold:
            out.append(Action("slow", factor=c.slow_to, seconds=c.ramp, reason=f"complaints:{reason}"))
    return out


def _stop(reaction: Reaction, state: IpState, config: Config, now: float, reason: str) -> list[Action]:
    """Hold, pause (repeat-lengthened), slow-down after it, queue hold, failover."""
    out: list[Action] = []
    stopping = False
    if reaction.hold_ip:
        stopping = True
        if not state.held:
            out.append(Action("hold_ip", reason=reason))
    elif reaction.pause is not None:
        stopping = True
        out.append(Action("pause", seconds=pause_seconds(reaction.pause, state, config, now), reason=reason))
    if reaction.slow_to is not None and reaction.slow_to < 1.0:
        ramp = reaction.ramp or reaction.pause or config.complaints.ramp
        out.append(Action("slow", factor=reaction.slow_to, seconds=ramp, reason=reason))
    if stopping and reaction.hold_queue:
        out.append(Action("hold_queue", reason=reason))
    if stopping and reaction.failover:
        out.append(Action("failover", reason=reason))
    return out


def pause_seconds(base: float, state: IpState, config: Config, now: float) -> float:
    """Length of a pause: repeats within the window multiply it, up to max_pause.

    While a cooldown is running, further replies are answers to deliveries that
    were already in flight; they are not repeats and get the base length (the
    store keeps the later of the two ends).
    """
    esc = config.escalation
    repeats = 0 if state.cooldown_until > now else state.recent_pauses
    return min(base * esc.repeat_factor ** repeats, max(esc.max_pause, base))


# --------------------------------------------------------------------------- explaining
def describe(actions: list[Action], ip: str = "the IP") -> str:
    """One sentence an operator can read: what these actions will do."""
    if not actions:
        return "no action (the IP keeps sending)"
    return "; ".join(_describe_one(a, ip) for a in actions)


def _describe_one(a: Action, ip: str) -> str:
    match a.kind:
        case "pause":
            return f"pause {ip} for Yahoo {format_duration(a.seconds)}"
        case "hold_ip":
            return f"hold {ip} for Yahoo until an admin releases it"
        case "slow":
            return f"then send at {a.factor:.0%} of the rate, ramping back over {format_duration(a.seconds)}"
        case "escalate":
            return f"raise escalation level to {a.level} ({LEVEL_NAMES.get(a.level, a.level)}), never lowered by itself"
        case "per_connection":
            return f"send at most {a.value} messages per connection"
        case "count_deferral":
            return "count a deferral"
        case "count_complaint":
            return "count a complaint signal"
        case "hold_queue":
            return "move its deferred Yahoo mail to the hold queue meanwhile"
        case "failover":
            return "fail its Yahoo traffic over to the other IPs"
        case "alert":
            return "alert the operator"
    return a.kind  # pragma: no cover - ACTION_KINDS is closed
