"""Per-IP delivery slots: how a per-IP budget becomes MTA transports.

Postfix cannot pace deliveries per source IP by itself, but it can pace one
transport: ``<transport>_transport_rate_delay`` (whole seconds, counted from the
end of the previous delivery) serialises the transport and spaces its deliveries
(measured, docs/postfix-levers.md). So each egress IP gets ``k`` "slot"
transports, clones of smtp bound to that IP, each delivering one message every
``d`` seconds: at most ``k`` connections and ``k × 60 / d`` messages a minute from
that IP. :func:`slot_plan` picks the ``k ≤ concurrency`` and whole-second ``d``
that come closest to the configured rate without exceeding it, less the
``limits.per_ip.postfix_headroom`` share an operator keeps free.

Why headroom: qmgr's timers tick in whole seconds, so a slot may deliver once
early, and any window of Yahoo's minute can then see up to one delivery per slot
more than the plan's rate (:attr:`SlotPlan.worst_minute`). Real delivery time,
which Postfix adds to every delay, usually absorbs that; on a fast path at a
plan of exactly 100 % it does not, and Yahoo answers TSS04.

Exim uses one transport per IP (``transport_name``); the governor daemon paces it.
The governor's transport map hands out slots of IPs that may send (fewer slots
while an IP ramps back after a cooldown), so the names here are shared by the
config generators and the daemon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from governor.config import Limits

MAX_SLOT_RATE = 60.0  # one message per second per slot: Postfix's finest rate delay


@dataclass(frozen=True)
class SlotPlan:
    """``slots`` transports per IP, each with ``delay`` seconds between deliveries."""

    slots: int
    delay: int

    @property
    def per_minute(self) -> float:
        return self.slots * 60.0 / self.delay

    @property
    def worst_minute(self) -> int:
        """Most deliveries one 60 s window can see: each slot may fire once early."""
        return self.slots * (math.floor(60 / self.delay) + 1)


def slot_plan(concurrency: int, messages_per_minute: float, headroom: float = 0.0) -> SlotPlan:
    """The slot count and whole-second delay closest to the rate without exceeding it.

    With concurrency 5: 300/min → 5 slots × 1 s; 100/min → 5 × 3 s; 80/min → 4 × 3 s.
    A rate above ``concurrency × 60``/min is capped there (one delivery per second per
    slot is the finest pacing Postfix offers). ``headroom`` (a share of the rate, 0 to
    0.5) lowers the target first: 300/min with 0.03 → 4 × 1 s.
    """
    if concurrency < 1 or messages_per_minute <= 0:
        raise ValueError("concurrency and messages_per_minute must be positive")
    if not 0.0 <= headroom <= 0.5:
        raise ValueError("headroom must be between 0 and 0.5")
    messages_per_minute *= 1.0 - headroom
    best = SlotPlan(1, max(1, math.ceil(60.0 / messages_per_minute)))
    for k in range(1, concurrency + 1):
        delay = max(1, math.ceil(60.0 * k / messages_per_minute - 1e-9))
        plan = SlotPlan(k, delay)
        # On a tie more slots win: Postfix counts the delay from the end of the previous
        # delivery, so a longer delay loses less of the rate to delivery time.
        if best.per_minute <= plan.per_minute <= messages_per_minute + 1e-9:
            best = plan
    return best


def limits_plan(limits: "Limits") -> SlotPlan:
    """The slot plan of one IP's configured limits (the one place that reads them)."""
    return slot_plan(limits.concurrency, limits.messages_per_minute, limits.postfix_headroom)


def active_slots(plan: SlotPlan, rate_factor: float) -> int:
    """Slots an IP may use at ``rate_factor`` (ramp back after a cooldown): at least one."""
    return max(1, min(plan.slots, math.floor(plan.slots * rate_factor + 1e-9)))


def slot_transport(egress_name: str, slot: int) -> str:
    """Postfix master.cf service name of one slot, e.g. ``yahoo-ip1-s3``."""
    return f"{egress_name}-s{slot}"


def exim_transport(egress_name: str) -> str:
    """Exim transport name of one egress IP, e.g. ``yahoo_ip1`` (Exim names take no '-')."""
    return egress_name.replace("-", "_")
