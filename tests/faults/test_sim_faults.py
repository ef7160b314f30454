"""The simulator's fault knob (``fault KIND [EVERY]``): what the fault suite relies on."""
from __future__ import annotations

import smtplib

import pytest

from governor.sim import SimThread, ephemeral_settings


def send(host: str, port: int) -> str:
    try:
        with smtplib.SMTP(host, port, timeout=5) as c:
            c.sendmail("a@example.org", ["u@yahoo.com"], b"Subject: t\r\n\r\nhi\r\n")
        return "ok"
    except smtplib.SMTPServerDisconnected:
        return "dropped"
    except (smtplib.SMTPDataError, smtplib.SMTPConnectError) as exc:
        return "garbage" if exc.smtp_code == -1 else f"reply {exc.smtp_code}"


@pytest.mark.parametrize("kind,seen", [("drop-data", "dropped"), ("garbage-data", "garbage"),
                                       ("garbage-greeting", "garbage")])
def test_every_nth_session_misbehaves_and_is_not_counted(kind: str, seen: str) -> None:
    with SimThread(ephemeral_settings()) as sim:
        host, port = sim.addresses[0]
        assert sim.command(f"fault {kind} 2")["ok"]
        results = [send(host, port) for _ in range(4)]
        assert results == ["ok", seen, "ok", seen]
        stats = sim.stats(include_times=False)
        assert stats["total"]["accepted"] == 2
        assert stats["faults"][kind] == 2 and stats["fault"] == {"kind": kind, "every": 2}
        assert stats["total"]["open"] == 0
        sim.fault(None)
        assert send(host, port) == "ok"


@pytest.mark.parametrize("line", ["fault", "fault bogus", "fault drop-data 0", "fault drop-data x",
                                  "fault none 3", "fault drop-data 1 2"])
def test_bad_fault_commands_are_refused(line: str) -> None:
    with SimThread(ephemeral_settings()) as sim:
        answer = sim.command(line)
        assert answer["ok"] is False and answer["error"]
