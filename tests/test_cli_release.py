"""``governor release`` against a real store and a real private Postfix queue.

Mail is parked with ``postsuper -h`` (as the queue agent and the milter do) and
recorded in the store's holds registry; the command must let it go paced (measured
from its own progress lines: lower bounds on time only, so a loaded machine cannot
fail it), honour --dry-run, print JSON Lines, audit the release, and refuse bad
arguments with one line and exit status 2.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.cli import main
from governor.config import load_config
from governor.store import Hold, Store

IP1, IP2 = "192.0.2.10", "192.0.2.11"
_prefix = itertools.count()

needs_postfix = pytest.mark.skipif(shutil.which("postfix") is None or os.geteuid() != 0,
                                   reason="needs Postfix and root")


@pytest.fixture(scope="module")
def postfix() -> Iterator[object]:
    """One private Postfix whose smtp transport is deferred: mail stays queued."""
    from governor.lab.postfix import PostfixInstance
    from governor.lab.sink import SmtpSink

    workdir = Path(tempfile.mkdtemp(prefix="grel-", dir="/tmp"))
    try:
        with SmtpSink() as sink, PostfixInstance(workdir, relayhost=sink.nexthop,
                                                 main_cf={"defer_transports": "smtp"}) as pf:
            yield pf
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def write_config(tmp_path: Path, redis_url: str, pf: object | None = None, *, rate: float = 6000,
                 extra: str = "") -> str:
    path = tmp_path / "governor.yaml"
    postfix = f"postfix: {{config_directory: '{pf.config_dir}'}}\n" if pf is not None else ""
    path.write_text(f"redis: {{url: '{redis_url}', prefix: rel{next(_prefix)}}}\n"
                    f"pool:\n  - {{ip: {IP1}, name: ip-a}}\n  - {{ip: {IP2}, name: ip-b}}\n"
                    f"limits: {{per_ip: {{messages_per_minute: {rate}, concurrency: 50}}}}\n"
                    "domains: {dns: false}\nlogging: {syslog: false}\n" + postfix + extra)
    return str(path)


def run(cfg_path: str, *args: str):
    return CliRunner().invoke(main, ["--config", cfg_path, *args], catch_exceptions=False, env={"COLUMNS": "200"})


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def held_mail(pf: object, store: Store, n: int, ip: str = IP1, register: bool = True) -> list[str]:
    """``n`` queued Yahoo messages, put on hold with postsuper -h and (optionally) registered."""
    pf.delete("ALL")
    ids = pf.inject(n, recipients=["someone@yahoo.com"]).queue_ids
    assert len(ids) == n
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sorted(pf.queue_ids()) != sorted(ids):
        time.sleep(0.1)
    pf.hold(ids)
    assert sorted(pf.queue_ids("hold")) == sorted(ids)
    for i, qid in enumerate(ids):
        if register:
            store.add_hold(Hold(queue_id=qid, mta="postfix", ip=ip, since=time.time() - 600 + i,
                                reason="cooldown:TSS04", domain="yahoo.com"))
    return ids


@pytest.fixture
def store_of():
    opened: list[Store] = []

    def make(cfg_path: str) -> Store:
        s = Store.connect(load_config(cfg_path))
        opened.append(s)
        return s
    yield make
    for s in opened:
        s.close()


# --------------------------------------------------------------------------- pacing
@pytest.mark.e2e
@needs_postfix
def test_release_is_paced_by_rate_and_audited(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    cfg = write_config(tmp_path, redis_url, postfix)
    store = store_of(cfg)
    ids = held_mail(postfix, store, 5)
    res = run(cfg, "release", "--all", "--rate", "60/min", "--json", "--reason", "yahoo lifted TSS04")
    assert res.exit_code == 0, res.output
    out = lines(res.output)
    progress = [o for o in out if o["event"] == "released"]
    assert sorted(o["queue_id"] for o in progress) == sorted(ids)
    assert [o["done"] for o in progress] == [1, 2, 3, 4, 5] and {o["total"] for o in progress} == {5}
    # 60/min = one a second: the k-th release cannot come before k-1 seconds (a slow machine is only slower)
    for k, o in enumerate(progress):
        assert o["elapsed"] >= k * 1.0 - 0.05, progress
    summary = out[-1]
    assert summary["event"] == "summary" and summary["released"] == 5 and summary["dry_run"] is False
    assert summary["rate_per_minute"] <= 66, summary           # measured pace: never faster than asked
    print(f"released 5 at --rate 60/min: measured {summary['rate_per_minute']}/min in {summary['elapsed']} s")
    assert postfix.queue_ids("hold") == [] and store.holds() == []
    entry = [e for e in store.audit() if e.action == "admin:release"][-1]
    assert entry.reason == "yahoo lifted TSS04" and "@" in entry.who
    assert entry.extra["count"] == "5" and entry.extra["what"] == "all" and entry.extra["rate"] == "60/min"


@pytest.mark.e2e
@needs_postfix
def test_without_rate_the_egress_budget_paces(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    """One IP may send (the other paused) at 60/min: releases follow its GCRA, about 1/s."""
    cfg = write_config(tmp_path, redis_url, postfix, rate=60)
    store = store_of(cfg)
    store.pause(IP2, 3600, "maintenance", "pytest")
    ids = held_mail(postfix, store, 4)
    started = time.monotonic()
    res = run(cfg, "release", "--ip", IP1)
    took = time.monotonic() - started
    assert res.exit_code == 0, res.output
    assert res.output.count("released ") >= 4 and "released 4 of 4 held messages" in res.output
    assert took >= 2.5, took                    # 4 tokens at 1/s: at least ~3 s
    assert postfix.queue_ids("hold") == [] and not any(q in postfix.queue_ids("hold") for q in ids)


@pytest.mark.e2e
@needs_postfix
def test_no_ip_may_send_stops_and_keeps_mail_held(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    cfg = write_config(tmp_path, redis_url, postfix)
    store = store_of(cfg)
    ids = held_mail(postfix, store, 2)
    store.pause("provider", 3600, "yahoo incident", "pytest")
    res = run(cfg, "release", "--all")
    assert res.exit_code == 1
    assert "no egress IP may send to Yahoo now (provider-paused" in res.output
    assert sorted(postfix.queue_ids("hold")) == sorted(ids) and len(store.holds()) == 2


# --------------------------------------------------------------------------- dry run, selection, JSON
@pytest.mark.e2e
@needs_postfix
def test_dry_run_lists_and_changes_nothing(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    cfg = write_config(tmp_path, redis_url, postfix)
    store = store_of(cfg)
    ids = held_mail(postfix, store, 3)
    before_audit = len(store.audit())
    text = run(cfg, "release", "--all", "--dry-run", "--rate", "10/min")
    assert text.exit_code == 0, text.output
    assert all(f"would release {q}" in text.output for q in ids)
    assert "3 held messages would be released, at most 10/min" in text.output
    js = run(cfg, "release", "--ip", IP1, "--dry-run", "--json")
    out = lines(js.output)
    assert [o["event"] for o in out] == ["would-release"] * 3 + ["summary"]
    assert set(out[0]) == {"event", "queue_id", "mta", "ip", "reason", "since"}
    assert out[0]["ip"] == IP1 and out[0]["reason"] == "cooldown:TSS04"
    assert out[-1] == {"event": "summary", "dry_run": True, "total": 3, "released": 0, "missing": [],
                       "rate_per_minute": None}
    assert run(cfg, "release", "--ip", IP2, "--dry-run", "--json").output.count("would-release") == 0
    assert sorted(postfix.queue_ids("hold")) == sorted(ids) and len(store.holds()) == 3
    assert len(store.audit()) == before_audit


@pytest.mark.e2e
@needs_postfix
def test_named_queue_ids_json_shape_and_missing_ids(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    cfg = write_config(tmp_path, redis_url, postfix)
    store = store_of(cfg)
    ids = held_mail(postfix, store, 3, register=False)   # held by hand: not in the registry
    res = run(cfg, "release", ids[0], ids[1], "NOSUCHID123", "--json")
    assert res.exit_code == 1                            # one named id is not held
    out = lines(res.output)
    released = [o for o in out if o["event"] == "released"]
    assert sorted(o["queue_id"] for o in released) == sorted(ids[:2])
    assert set(released[0]) == {"event", "queue_id", "ip", "done", "total", "elapsed"}
    summary = out[-1]
    assert set(summary) == {"event", "dry_run", "total", "released", "gone", "missing", "elapsed",
                            "rate_per_minute", "stopped"}
    assert summary["missing"] == ["NOSUCHID123"] and summary["released"] == 2
    assert postfix.queue_ids("hold") == [ids[2]]
    entry = [e for e in store.audit() if e.action == "admin:release"][-1]
    assert entry.extra["count"] == "2" and ids[0] in entry.extra["what"]


@pytest.mark.e2e
@needs_postfix
def test_release_lines_reach_syslog_with_queue_ids(postfix, tmp_path: Path, redis_url: str, store_of) -> None:
    sock_path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log_sock:
        log_sock.bind(str(sock_path))
        log_sock.settimeout(5)
        cfg = write_config(tmp_path, redis_url, postfix,
                           extra=f"logging: {{syslog: true, syslog_socket: '{sock_path}'}}\n")
        cfg_text = Path(cfg).read_text().replace("logging: {syslog: false}\n", "")
        Path(cfg).write_text(cfg_text)
        store = store_of(cfg)
        ids = held_mail(postfix, store, 2)
        assert run(cfg, "release", "--all", "--reason", "test").exit_code == 0
        got = [log_sock.recv(4096).decode().rstrip("\x00") for _ in range(3)]
    for qid in ids:
        assert any(f"action=release queue_id={qid} ip={IP1} mta=postfix by=" in g for g in got), got
    assert any("action=release-done what=all by=" in g and "count=2" in g for g in got), got
    assert all(g.startswith("<21>yahoo-governor[") for g in got), got     # mail.notice


# --------------------------------------------------------------------------- bad usage
@pytest.mark.parametrize("args, needle", [
    (["release"], "say what to release"),
    (["release", "--ip", IP1, "--all"], "--ip and --all cannot be combined"),
    (["release", "--all", "ABC123"], "--all and QUEUEID cannot be combined"),
    (["release", "--all", "--rate", "0/min"], "--rate: must be more than 0"),
    (["release", "--all", "--rate", "fast"], "--rate: expected N/min"),
    (["release", "--ip", "not-an-ip"], "expected an IP address"),
    (["release", "bad/id"], "queue id"),
    (["release", "--all", "--mta", "qmail"], "Invalid value for '--mta'"),
])
def test_bad_arguments_exit_2_with_one_clear_line(tmp_path: Path, redis_url: str, args: list[str],
                                                  needle: str) -> None:
    cfg = write_config(tmp_path, redis_url)
    res = CliRunner().invoke(main, ["--config", cfg, *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output, res.output
    if args[-1] != "qmail":            # click's own usage errors keep click's format
        assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("governor: release: ")


def test_rate_forms() -> None:
    from governor.cli.release_cmd import parse_rate

    assert parse_rate("60/min") == parse_rate("60") == parse_rate("1/s") == parse_rate("3600/h") == 60.0
    assert parse_rate("0.5/min") == 0.5
