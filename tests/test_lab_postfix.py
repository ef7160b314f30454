"""End-to-end checks of the lab's private Postfix instance (governor.lab.postfix).

These start a real Postfix (as root, loopback only) and a recording SMTP sink,
so they are marked e2e. They guard the facts the demo, the e2e suite and the
benchmarks depend on: per-IP transports really bind their source address,
hold/release works through postsuper/postqueue, and stop() leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.lab.postfix import PostfixError, PostfixInstance, parse_master_cf
from governor.lab.sink import SmtpSink, SocketmapSink

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("postfix") is None, reason="postfix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp that user postfix can traverse (pytest's
    tmp_path lives under a 0700 directory and makes unix socket paths long)."""
    path = Path(tempfile.mkdtemp(prefix="gpf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def _wait_queue(pf: PostfixInstance, queue_name: str, count: int, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    ids: list[str] = []
    while time.monotonic() < deadline:
        ids = pf.queue_ids(queue_name)
        if len(ids) >= count:
            return ids
        time.sleep(0.1)
    raise AssertionError(f"only {len(ids)} of {count} messages reached {queue_name}: {pf.queue()}")


def test_per_ip_transport_binds_source_address(workdir: Path, sink: SmtpSink) -> None:
    pf = PostfixInstance(workdir)
    pf.add_smtp_transport("yahoo-ip2", bind_address="127.0.0.3")
    pf.postconf(transport_maps=f"inline:{{ yahoo.com=yahoo-ip2:{sink.nexthop} }}")
    with pf:
        result = pf.inject(20, recipients=["someone@yahoo.com"], connections=4)
        assert result.accepted == 20, [r for r in result.results if not r.ok]
        assert len(set(result.queue_ids)) == 20
        messages = sink.wait_messages(20, timeout=60)
        pf.wait_empty(timeout=30)
        assert {m.peer for m in messages} == {"127.0.0.3"}
        assert {c.peer for c in sink.connections} == {"127.0.0.3"}
        assert sorted(int(m.headers["X-Lab-Seq"]) for m in messages) == list(range(20))
        assert "postfix/yahoo-ip2/smtp" in pf.log_text()


def test_hold_release_roundtrip(workdir: Path, sink: SmtpSink) -> None:
    # defer_transports keeps mail queued ("deferred transport") without a failing server.
    with PostfixInstance(workdir, relayhost=sink.nexthop, main_cf={"defer_transports": "smtp"}) as pf:
        ids = pf.inject(3, recipients=["a@yahoo.com"]).queue_ids
        assert len(ids) == 3
        assert sorted(_wait_queue(pf, "deferred", 3)) == sorted(ids)

        report = pf.hold(ids)
        assert "placed on hold" in report.lower()
        assert sorted(pf.queue_ids("hold")) == sorted(ids)

        pf.postconf(defer_transports="")
        pf.reload()
        pf.flush()  # a flush does not touch the hold queue
        time.sleep(2)
        assert sorted(pf.queue_ids("hold")) == sorted(ids)
        assert sink.messages == []

        pf.release(ids)
        sink.wait_messages(3, timeout=30)
        pf.wait_empty(timeout=30)


@pytest.mark.parametrize("separate", [False, True])
def test_transport_map_retry_answer(workdir: Path, sink: SmtpSink, separate: bool) -> None:
    """A socketmap transport_maps answer ``retry:`` is seen by smtpd too (450 at RCPT)
    unless smtpd/cleanup resolve through their own map-less trivial-rewrite."""
    governor_text = "4.7.0 governor: over budget"
    with SocketmapSink(workdir / "tm.sock", lambda name, key: (
            "NOTFOUND " if key == "*" else f"OK retry:{governor_text}")) as smap:
        pf = PostfixInstance(workdir, relayhost=sink.nexthop,
                             main_cf={"transport_maps": smap.spec("transport")})
        if separate:
            pf.separate_inbound_resolver()
        with pf:
            result = pf.inject(1, recipients=["r@yahoo.com"]).results[0]
            if not separate:
                assert not result.ok
                assert result.refused["r@yahoo.com"].startswith("450 4.7.0")
                assert "governor: over budget" in result.refused["r@yahoo.com"]
                return
            assert result.ok, result
            _wait_queue(pf, "deferred", 1)
            [msg] = pf.queue()
            assert msg["recipients"][0]["delay_reason"] == "governor: over budget"
            # only the queue manager's lookup reached the map: no sender lookup
            assert "sender@lab.governor.test" not in smap.keys()
            assert "r@yahoo.com" in smap.keys()
            pf.delete()


def test_stop_leaves_no_processes(workdir: Path, sink: SmtpSink) -> None:
    pf = PostfixInstance(workdir, relayhost=sink.nexthop)
    pf.start()
    try:
        master = pf.master_pid()
        assert master is not None
        assert master in pf.processes()
        assert pf.inject(2).accepted == 2  # spawns smtpd, cleanup, smtp, ...
        sink.wait_messages(2, timeout=30)
        assert len(pf.processes()) > 1
    finally:
        pf.stop()
    assert pf.processes() == []
    assert not Path(f"/proc/{master}").exists() or pf.master_pid() is None
    assert "stopping the Postfix mail system" in pf.log_text()


def test_start_fails_loudly_when_a_daemon_dies(workdir: Path) -> None:
    # postfix start itself exits 0 here; qmgr logs "fatal: invalid queue_run_delay: 0 (min 1)".
    pf = PostfixInstance(workdir, main_cf={"queue_run_delay": "0s"})
    with pytest.raises(PostfixError, match="queue_run_delay"):
        pf.start()
    assert pf.processes() == []


@pytest.mark.parametrize("workdir_", ["/var/spool/postfix", "/etc/postfix", "/"])
def test_refuses_system_directories(workdir_: str) -> None:
    with pytest.raises(PostfixError, match="system instance"):
        PostfixInstance(workdir_)


def test_master_cf_entries_replace_by_service_and_type() -> None:
    pf = PostfixInstance("/tmp/gpf-never-started", master_cf_extra=[
        "smtp unix - - n - 5 smtp\n  -o smtp_bind_address=127.0.0.2"])
    entries = dict(parse_master_cf(pf.master_text()))
    assert entries[("smtp", "unix")].split()[6] == "5"
    assert "-o smtp_bind_address=127.0.0.2" in entries[("smtp", "unix")]
    assert ("relay", "unix") in entries
