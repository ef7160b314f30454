"""Policy tables: each code → expected actions, repeats lengthen pauses, no auto-downgrade."""
from __future__ import annotations

import pytest

from governor.classify import classify
from governor.config import default_config, load_config_text
from governor.policy import Action, IpState, decide, describe

IP = "192.0.2.10"
H = 3600.0
CFG = default_config()

TSS04 = "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
TSS05 = "421 4.7.0 [TSS05] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1"
IPTS04 = "421 [IPTS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints"
TS01 = "421 4.16.55 [TS01] Messages from 192.0.2.10 temporarily deferred due to excessive user complaints"
TS02 = "421 4.16.56 [TS02] Messages from 192.0.2.10 temporarily deferred due to excessive user complaints"
TS03 = "421 4.7.1 [TS03] All messages from 192.0.2.10 will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes"
BL21 = "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.10, because the ip is in Spamhaus's list"
DD = "554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.gq1.yahoo.com"
MAXCONN = "421 Max message per connection reached, closing transmission channel"
TS07 = "550 5.7.1 [TS07] Message rejected"
DEFER160 = "451 Message temporarily deferred - [160]"
GMAIL = "421-4.7.28 Gmail has detected an unusual rate of mail originating from your SPF domain - gsmtp"


def kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions]


def by_kind(actions: list[Action], kind: str) -> Action:
    return next(a for a in actions if a.kind == kind)


@pytest.mark.parametrize(
    "reply, expected, pause",
    [
        (TSS04, ["count_deferral", "pause", "slow", "hold_queue"], 2 * H),
        (IPTS04, ["count_deferral", "pause", "slow", "hold_queue"], 2 * H),
        (TSS05, ["count_deferral", "pause", "slow", "hold_queue"], 4 * H),
        (TS01, ["count_deferral", "pause", "slow", "hold_queue", "escalate"], 4 * H),
        (TS02, ["count_deferral", "pause", "slow", "hold_queue", "escalate", "alert"], 4 * H),
        (TS03, ["hold_ip", "hold_queue", "failover", "escalate", "alert"], None),
        (BL21, ["hold_ip", "hold_queue", "failover", "escalate", "alert"], None),
        (MAXCONN, ["per_connection"], None),
        (DD, [], None),
        (TS07, [], None),
        (GMAIL, [], None),
        ("250 ok dirdel", [], None),
    ],
)
def test_each_code_maps_to_its_actions(reply: str, expected: list[str], pause: float | None) -> None:
    actions = decide(classify(reply), IP, "yahoo.com", IpState(), CFG, now=1000.0)
    assert kinds(actions) == expected
    if pause is not None:
        assert by_kind(actions, "pause").seconds == pause


def test_levels_follow_the_codes() -> None:
    assert by_kind(decide(classify(TS01), IP, None, IpState(), CFG, 0), "escalate").level == 1
    assert by_kind(decide(classify(TS02), IP, None, IpState(), CFG, 0), "escalate").level == 2
    assert by_kind(decide(classify(TS03), IP, None, IpState(), CFG, 0), "escalate").level == 3


def test_no_auto_downgrade() -> None:
    """An IP at TS02 level getting TS01 (or TSS04) is never lowered, no escalate action at all."""
    for reply in (TS01, TSS04, TS02):
        actions = decide(classify(reply), IP, None, IpState(level=2), CFG, 0)
        assert "escalate" not in kinds(actions)
    # and a level-3 IP stays held without a second hold
    actions = decide(classify(TS03), IP, None, IpState(level=3, held=True), CFG, 0)
    assert "hold_ip" not in kinds(actions) and "escalate" not in kinds(actions)


def test_repeats_lengthen_the_pause_up_to_the_cap() -> None:
    pauses = [by_kind(decide(classify(TSS04), IP, None, IpState(recent_pauses=n), CFG, 1000.0), "pause").seconds
              for n in range(6)]
    assert pauses == [2 * H, 4 * H, 8 * H, 16 * H, 24 * H, 24 * H]


def test_replies_during_a_running_cooldown_are_not_repeats() -> None:
    state = IpState(recent_pauses=3, cooldown_until=2000.0)
    assert by_kind(decide(classify(TSS04), IP, None, state, CFG, 1000.0), "pause").seconds == 2 * H


def test_complaints_slow_the_ip_at_the_threshold() -> None:
    threshold = CFG.complaints.threshold
    below = decide(classify(DEFER160), IP, None, IpState(complaints=threshold - 2), CFG, 0)
    assert kinds(below) == ["count_deferral", "count_complaint"]
    at = decide(classify(DEFER160), IP, None, IpState(complaints=threshold - 1), CFG, 0)
    slow = by_kind(at, "slow")
    assert slow.factor == CFG.complaints.slow_to and slow.seconds == CFG.complaints.ramp


def test_overrides_and_time_scale() -> None:
    cfg = load_config_text("time_scale: 0.01\nreactions:\n  TSS04: {pause: 10m, hold_queue: false}\n")
    actions = decide(classify(TSS04), IP, None, IpState(), cfg, 0)
    assert by_kind(actions, "pause").seconds == pytest.approx(6.0)
    assert "hold_queue" not in kinds(actions)


def test_unknown_code_falls_back_to_its_class() -> None:
    cfg = load_config_text("class_reactions:\n  rate: {pause: 30m}\n")
    actions = decide(classify(IPTS04), IP, None, IpState(), cfg.__class__(**{**cfg.__dict__, "reactions": {}}), 0)
    assert by_kind(actions, "pause").seconds == 1800


def test_describe_reads_like_a_sentence() -> None:
    text = describe(decide(classify(TSS04), IP, None, IpState(), CFG, 0), IP)
    assert text.startswith("count a deferral; pause 192.0.2.10 for Yahoo 2h; then send at 50% of the rate")
    assert describe([], IP) == "no action (the IP keeps sending)"
