"""The mail-log follower: the parser on lines exactly as Postfix 3.7 writes them
(captured from the lab), tail -F behaviour (partial lines, rotation, truncation),
and feedback into a real store."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from governor.adapters.postfix_log import Delivery, Follower, LogFeedback, parse_line, store_reporter
from governor.config import load_config_text
from governor.store import Store

TSS04 = ("Nov 23 18:46:22 lab postfix/yahoo-ip2-s1/smtp[10477]: 8231320C25F: to=<x@yahoo.com>, "
         "relay=127.0.0.1[127.0.0.1]:54763, delay=0.02, delays=0.01/0.01/0.01/0, dsn=4.7.0, status=deferred "
         "(host 127.0.0.1[127.0.0.1] said: 421 4.7.0 [TSS04] Messages from 127.0.0.3 temporarily deferred due to "
         "unexpected volume or user complaints - 4.16.55.1; https://postmaster.yahooinc.com/error-codes "
         "(in reply to MAIL FROM command))")
SENT = ("Nov 23 18:46:22 lab postfix/yahoo-ip2-s1/smtp[10477]: 80FA120CC34: to=<ok@yahoo.com>, "
        "relay=127.0.0.1[127.0.0.1]:54763, delay=0.02, delays=0.01/0.01/0.01/0, dsn=2.0.0, status=sent "
        "(250 2.0.0 Ok: sink#1)")
BOUNCED = ("Nov 23 18:46:22 lab postfix/yahoo-ip2-s1/smtp[10477]: 8822920CC54: to=<d554@yahoo.com>, "
           "relay=127.0.0.1[127.0.0.1]:54763, conn_use=2, delay=0.01, delays=0/0.01/0/0, dsn=5.7.9, "
           "status=bounced (host 127.0.0.1[127.0.0.1] said: 554 5.7.9 Message not accepted for policy reasons.  "
           "See https://postmaster.yahooinc.com/error-codes (in reply to end of DATA command))")
ORIG_TO = ("2024-11-23T18:46:22.123456+00:00 mx1 postfix/yahoo-ip1-s4/smtp[77]: 4XyZ1h2Kp9z3: to=<a@aol.com>, "
           "orig_to=<alias@example.org>, relay=mta7.am0.yahoodns.net[67.195.204.77]:25, delay=1.2, "
           "delays=0.1/0/0.6/0.5, dsn=4.7.0, status=deferred (host mta7.am0.yahoodns.net[67.195.204.77] said: "
           "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred (in reply to MAIL FROM command))")
OTHER = [
    "Nov 23 18:46:22 lab postfix/qmgr[10472]: 80FA120CC34: from=<sender@lab.governor.test>, size=497, nrcpt=1 "
    "(queue active)",
    "Nov 23 18:46:22 lab postfix/qmgr[10472]: 80FA120CC34: removed",
    "Nov 23 18:46:22 lab postfix/bounce[10484]: 8822920CC54: sender non-delivery notification: 8C2CC20C589",
    "Nov 23 18:46:22 lab postfix/smtp[10483]: 891CD20CC62: to=<someone@example.org>, relay=127.0.0.1[127.0.0.1]:54763, "
    "delay=0.01, delays=0/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: sink#2)",
]


def test_parse_deferred_sent_bounced_and_iso_timestamps() -> None:
    d = parse_line(TSS04)
    assert d is not None
    assert (d.service, d.queue_id, d.recipient, d.relay, d.dsn, d.status, d.pid) == (
        "yahoo-ip2-s1", "8231320C25F", "x@yahoo.com", "127.0.0.1[127.0.0.1]:54763", "4.7.0", "deferred", 10477)
    assert d.text.startswith("host 127.0.0.1[127.0.0.1] said: 421 4.7.0 [TSS04]")
    assert d.text.endswith("(in reply to MAIL FROM command)")
    s = parse_line(SENT)
    assert s is not None and (s.status, s.dsn, s.text) == ("sent", "2.0.0", "250 2.0.0 Ok: sink#1")
    b = parse_line(BOUNCED)
    assert b is not None and (b.status, b.dsn) == ("bounced", "5.7.9") and "(in reply to end of DATA command)" in b.text
    o = parse_line(ORIG_TO)
    assert o is not None and (o.service, o.queue_id, o.recipient, o.relay) == (
        "yahoo-ip1-s4", "4XyZ1h2Kp9z3", "a@aol.com", "mta7.am0.yahoodns.net[67.195.204.77]:25")
    # plain smtp (no per-service syslog name) and non-delivery lines are not ours
    assert parse_line(OTHER[3]) is None
    assert all(parse_line(line) is None for line in OTHER[:3])


def test_follower_starts_at_the_end_and_keeps_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text("old line\n")
    with Follower(log) as f:
        assert f.read_available() == []
        with log.open("a") as fh:
            fh.write("one\ntw")
            fh.flush()
            assert f.read_available() == ["one"]
            fh.write("o\n")
        assert f.read_available() == ["two"]
    with Follower(log, from_start=True) as f:
        assert f.read_available() == ["old line", "one", "two"]


def test_follower_survives_rename_rotation(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text("")
    with Follower(log) as f:
        f.read_available()
        with log.open("a") as fh:
            fh.write("before\n")
        os.rename(log, tmp_path / "maillog.1")
        with (tmp_path / "maillog.1").open("a") as fh:
            fh.write("late write to the old file\n")
        assert f.read_available() == ["before", "late write to the old file"]  # path missing: stay on the old file
        log.write_text("first of new\n")
        assert f.read_available() == ["first of new"]
        with log.open("a") as fh:
            fh.write("second\n")
        assert f.read_available() == ["second"]


def test_follower_survives_copytruncate(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text("a\nb\n")
    with Follower(log, from_start=True) as f:
        assert f.read_available() == ["a", "b"]
        with log.open("r+") as fh:
            fh.truncate(0)
        with log.open("a") as fh:
            fh.write("c\n")
        assert f.read_available() == ["c"]


def test_follower_waits_for_a_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    with Follower(log) as f:
        assert f.read_available() == []
        log.write_text("x\n")
        assert f.read_available() == ["x"]


def test_feedback_reports_only_slot_results_and_not_sent(tmp_path: Path) -> None:
    reports: list[tuple[str, Delivery]] = []
    log = tmp_path / "maillog"
    log.write_text("\n".join([TSS04, SENT, BOUNCED, *OTHER, ORIG_TO]) + "\n")
    with Follower(log, from_start=True) as f:
        fb = LogFeedback(f, {"yahoo-ip2-s1": "127.0.0.3"}, lambda ip, d: reports.append((ip, d)))
        assert fb.pump() == 8
    assert [(ip, d.queue_id) for ip, d in reports] == [("127.0.0.3", "8231320C25F"), ("127.0.0.3", "8822920CC54")]
    assert (fb.seen, fb.reported) == (3, 2)   # ORIG_TO's service is not configured here


def test_feedback_records_a_tss04_cooldown_in_the_store(tmp_path: Path, redis_url: str) -> None:
    cfg = load_config_text("pool:\n  - {ip: 127.0.0.3, name: yahoo-ip2}\n", "t.yaml")
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=redis_url))
    store = Store.connect(cfg)
    try:
        log = tmp_path / "maillog"
        log.write_text(TSS04 + "\n")
        with Follower(log, from_start=True) as f:
            LogFeedback(f, {"yahoo-ip2-s1": "127.0.0.3"}, store_reporter(store)).pump()
        (st,) = store.status()
        assert st.cooling and st.cooldown_reason == "TSS04" and st.hold_queue_until > st.now
    finally:
        store.close()


@pytest.mark.parametrize("line", [TSS04.replace("status=deferred", "status=deferred"), ORIG_TO])
def test_parse_line_tolerates_trailing_newlines(line: str) -> None:
    assert parse_line(line + "\r\n") == parse_line(line)
