"""Slot plans: per-IP budgets as Postfix slot transports."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from governor.transports import SlotPlan, active_slots, exim_transport, slot_plan, slot_transport


@pytest.mark.parametrize("conc, rate, expected", [
    (5, 300, SlotPlan(5, 1)), (5, 100, SlotPlan(5, 3)), (5, 80, SlotPlan(4, 3)),
    (5, 120, SlotPlan(4, 2)), (5, 1000, SlotPlan(5, 1)), (1, 30, SlotPlan(1, 2)), (5, 7, SlotPlan(5, 43)),
])
def test_known_plans(conc: int, rate: float, expected: SlotPlan) -> None:
    assert slot_plan(conc, rate) == expected


@given(st.integers(1, 20), st.floats(0.5, 2000))
def test_plan_never_exceeds_rate_or_concurrency(conc: int, rate: float) -> None:
    plan = slot_plan(conc, rate)
    assert 1 <= plan.slots <= conc and plan.delay >= 1
    assert plan.per_minute <= min(rate, 60 * conc) + 1e-6


def test_active_slots_follow_the_ramp() -> None:
    plan = SlotPlan(5, 1)
    assert [active_slots(plan, f) for f in (0.0, 0.2, 0.5, 0.99, 1.0)] == [1, 1, 2, 4, 5]


def test_names() -> None:
    assert slot_transport("yahoo-ip1", 3) == "yahoo-ip1-s3"
    assert exim_transport("yahoo-ip1") == "yahoo_ip1"
