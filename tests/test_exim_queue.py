"""The queue agent's Exim backend (governor/adapters/exim_queue.py) on a private Exim.

List, freeze and thaw+deliver against a real Exim 4.96 spool; delivery goes to a
loopback SMTP sink. Needs root and the extracted binary (skipped otherwise).
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from governor.adapters.exim_queue import EximQueue, arrival_time, last_defer_reasons, parse_bp
from governor.adapters.queue_agent import QueueBackend
from governor.domains import DomainSet
from governor.lab.exim import EximConfig, EximInstance, lab_unavailable
from governor.lab.sink import SmtpSink


needs_exim = pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")
DOMAINS = DomainSet(dns=False)


@pytest.fixture
def lab() -> Iterator[tuple[EximInstance, SmtpSink, EximQueue]]:
    with SmtpSink() as sink:
        inst = EximInstance(config_text=EximConfig(sink_port=sink.port), queue_interval=None)
        inst.prepare()
        try:
            yield inst, sink, EximQueue(binary=str(inst.exim), config_file=str(inst.config_path))
        finally:
            inst.stop()


def test_parse_bp_and_arrival() -> None:
    text = (" 5m   445 1xVZ3h-0002jr-0t <s@x.test> *** frozen ***\n          u1@yahoo.com\n\n"
            " 0m   438 1xVZ3h-0002js-0v <>\n        D g@gmail.com\n          u2@aol.com\n\n")
    a, b = parse_bp(text)
    assert (a.id, a.frozen, a.recipients) == ("1xVZ3h-0002jr-0t", True, ["u1@yahoo.com"])
    assert (b.sender, b.delivered, b.recipients) == ("", ["g@gmail.com"], ["u2@aol.com"])
    # base-62 time in the id; the age is only the fallback
    assert abs(arrival_time("1xVZ3h-0002jr-0t") - 1795459594) < 86400 * 366
    assert arrival_time("??????-x-y", "5m", now=1000.0) == 700.0


def test_last_defer_reason_per_recipient() -> None:
    log = ("2026-11-23 18:46:33 Received from s@x U=root P=local S=438\n"
           "2026-11-23 18:46:33 u@yahoo.com R=yahoo_governor defer (-1): governor: DEFER retry=5 reason=rate\n"
           "2026-11-23 18:46:35 u@yahoo.com R=yahoo_governor_route T=yahoo_ip1 defer (-45) H=mx [127.0.0.1]: "
           "SMTP error from remote mail server after pipelined MAIL FROM:<s@x>: 421 4.7.0 [TSS04] x DT=0s\n")
    reasons = last_defer_reasons(log)
    assert reasons["u@yahoo.com"].startswith("H=mx [127.0.0.1]: SMTP error")
    assert reasons["u@yahoo.com"].endswith("[TSS04] x")


@needs_exim
def test_list_hold_release_on_a_real_spool(lab: tuple[EximInstance, SmtpSink, EximQueue]) -> None:
    inst, sink, q = lab
    assert isinstance(q, QueueBackend)
    y1 = inst.submit("u1@yahoo.com")
    mixed = inst.submit(["u2@aol.com", "g@gmail.com"])
    other = inst.submit("g2@gmail.com")
    listed = {m.queue_id: m for m in q.list_governed(DOMAINS)}
    assert set(listed) == {y1, mixed}
    assert listed[mixed].recipients == ("u2@aol.com",)
    assert listed[y1].state == "incoming" and listed[y1].reason == ""
    assert abs(listed[y1].arrival - time.time()) < 5

    assert sorted(q.hold([y1, mixed, "1xVXpg-0002Es-1T"])) == sorted([y1, mixed])
    assert {m.queue_id: m.state for m in q.list_governed(DOMAINS)} == {y1: "hold", mixed: "hold"}
    assert {e.id for e in inst.queue() if e.frozen} == {y1, mixed}

    assert q.release([y1, "1xVXpg-0002Es-1T"]) == [y1]
    q.wait(30)
    assert [m.queue_id for m in q.list_governed(DOMAINS)] == [mixed]
    assert any("u1@yahoo.com" in m.rcpts for m in sink.messages)
    assert other in {e.id for e in inst.queue()}


@needs_exim
def test_deferred_state_and_reason(lab: tuple[EximInstance, SmtpSink, EximQueue]) -> None:
    inst, sink, q = lab
    sink.rule = lambda stage, arg, env: "451 4.7.1 try later" if stage == "RCPT" else None
    mid = inst.submit("u3@yahoo.com")
    inst.deliver([mid])
    (msg,) = q.list_governed(DOMAINS)
    assert msg.state == "deferred"
    assert "451 4.7.1 try later" in msg.reason
