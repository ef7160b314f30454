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


@pytest.mark.parametrize("conc, rate, headroom, expected", [
    (5, 300, 0.03, SlotPlan(4, 1)), (5, 250, 0.0, SlotPlan(4, 1)), (5, 100, 0.05, SlotPlan(3, 2)),
    (5, 80, 0.05, SlotPlan(5, 4)), (5, 300, 0.5, SlotPlan(5, 2)),
])
def test_headroom_lowers_the_target(conc: int, rate: float, headroom: float, expected: SlotPlan) -> None:
    assert slot_plan(conc, rate, headroom) == expected


@given(st.integers(1, 20), st.floats(0.5, 2000), st.floats(0.0, 0.5))
def test_plan_with_headroom_stays_under_the_reduced_rate(conc: int, rate: float, headroom: float) -> None:
    assert slot_plan(conc, rate, headroom).per_minute <= rate * (1 - headroom) + 1e-6


def test_worst_minute_counts_one_early_delivery_per_slot() -> None:
    """5 x 1 s is 300/min but a minute may see 305; 4 x 1 s (the 2.5x bench scale) stays at 244."""
    assert SlotPlan(5, 1).worst_minute == 305 and SlotPlan(4, 1).worst_minute == 244
    assert SlotPlan(5, 3).worst_minute == 105 and SlotPlan(3, 2).worst_minute == 93


def test_headroom_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="headroom"):
        slot_plan(5, 100, 0.6)


def test_active_slots_follow_the_ramp() -> None:
    plan = SlotPlan(5, 1)
    assert [active_slots(plan, f) for f in (0.0, 0.2, 0.5, 0.99, 1.0)] == [1, 1, 2, 4, 5]


def test_names() -> None:
    assert slot_transport("yahoo-ip1", 3) == "yahoo-ip1-s3"
    assert exim_transport("yahoo-ip1") == "yahoo_ip1"
