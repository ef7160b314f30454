"""The queue agent against a real redis-server with an in-memory queue backend, and the
Postfix backend's parsing (plus one run against a real private Postfix, marked e2e)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from governor.adapters.postfix_queue import PostfixQueue, parse_queue
from governor.adapters.queue_agent import (
    QueueAgent, QueueBackend, QueuedMessage, RateLimit, hold_queue_ips, provider_state,
)
from governor.classify import classify
from governor.config import Config, load_config_text
from governor.domains import DomainSet
from governor.store import Hold, Store
from governor.store.model import IpStatus

IP1, IP2 = "192.0.2.10", "192.0.2.11"
CONFIG = f"""
pool:
  - {{ip: {IP1}, name: yahoo-ip1}}
  - {{ip: {IP2}, name: yahoo-ip2}}
limits: {{per_ip: {{concurrency: 5, messages_per_minute: 60}}}}
domains: {{dns: false}}
"""


def tss04(ip: str) -> str:
    return (f"host mx.yahoo.com[198.51.100.1] said: 421 4.7.0 [TSS04] Messages from {ip} temporarily deferred "
            f"due to unexpected volume or user complaints - 4.16.55.1 (in reply to MAIL FROM command)")


def make_config(url: str, extra: str = "") -> Config:
    cfg = load_config_text(CONFIG + extra, "test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url))


class AssigningStore(Store):
    """A Store with the daemon's recipient -> IP assignments, set by the test."""

    assignments: dict[str, str]

    def assigned_ip(self, recipients: list[str]) -> dict[str, str]:
        return {r: self.assignments[r] for r in recipients if r in self.assignments}


@dataclasses.dataclass
class MemoryQueue:
    """An in-memory QueueBackend: messages by id, hold/release just flip the state."""

    messages: dict[str, QueuedMessage] = dataclasses.field(default_factory=dict)
    calls: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    mta: str = "postfix"

    def add(self, qid: str, rcpt: str, state: str = "active", reason: str = "", arrival: float | None = None) -> None:
        self.messages[qid] = QueuedMessage(qid, (rcpt,), state, arrival or time.time(), reason)

    def list_governed(self, domains: DomainSet) -> list[QueuedMessage]:
        return list(self.messages.values())

    def hold(self, ids: list[str]) -> list[str]:
        self.calls.append(("hold", ids))
        done = [i for i in ids if i in self.messages]
        for i in done:
            self.messages[i] = dataclasses.replace(self.messages[i], state="hold")
        return done

    def release(self, ids: list[str]) -> list[str]:
        self.calls.append(("release", ids))
        done = [i for i in ids if i in self.messages]
        for i in done:
            self.messages[i] = dataclasses.replace(self.messages[i], state="deferred")
        return done

    def state(self, qid: str) -> str:
        return self.messages[qid].state


@pytest.fixture
def store(redis_url: str) -> Iterator[AssigningStore]:
    s = AssigningStore.connect(make_config(redis_url))
    s.assignments = {}
    yield s
    s.close()


def agent_for(store: Store, queue: MemoryQueue, extra: str = "") -> QueueAgent:
    cfg = make_config(store.config.redis.url, extra) if extra else store.config
    return QueueAgent(cfg, store, queue, DomainSet.from_config(cfg), busy_scan=0.0, idle_scan=0.0)


def test_memory_and_postfix_backends_satisfy_the_protocol() -> None:
    assert isinstance(MemoryQueue(), QueueBackend)
    assert isinstance(PostfixQueue("/tmp/x"), QueueBackend)


def test_cooldown_holds_mail_assigned_to_that_ip_and_its_yahoo_deferrals(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("A1", "a1@yahoo.com")                                   # active, assigned to IP1
    q.add("A2", "a2@yahoo.com")                                   # active, assigned to IP2
    q.add("D1", "d1@yahoo.com", "deferred", tss04(IP1))           # deferred by Yahoo from IP1
    q.add("D2", "d2@yahoo.com", "deferred", tss04(IP2))           # from IP2 (not cooling)
    store.assignments = {"a1@yahoo.com": IP1, "a2@yahoo.com": IP2}
    store.pause(IP2, 60, "x", "pytest")                           # IP2 cooling WITHOUT hold_queue
    store.record(IP1, classify(tss04(IP1)))                       # TSS04: pause + hold_queue
    assert set(hold_queue_ips(store.status())) == {IP1}
    agent = agent_for(store, q)
    report = agent.step()
    assert report.scanned and sorted(report.held) == ["A1", "D1"]
    holds = {h.queue_id: h for h in store.holds()}
    assert set(holds) == {"A1", "D1"} and holds["A1"].ip == IP1 and holds["A1"].reason == "cooldown:TSS04"
    # no IP may send (IP1 cooling, IP2 paused): nothing is released
    assert report.released == [] and q.state("A1") == "hold"


def test_held_mail_is_released_paced_once_an_ip_may_send(store: AssigningStore) -> None:
    q = MemoryQueue()
    for i in range(6):
        q.add(f"H{i}", f"h{i}@yahoo.com", "hold")
        store.add_hold(Hold(f"H{i}", "postfix", IP1, since=time.time() - 60 + i, reason="cooldown:TSS04"))
    agent = agent_for(store, q)
    # 60/min per IP, burst 0: one token per IP now, the next a second later
    first = agent.step().released
    assert first == ["H0", "H1"]                                   # oldest first, one per IP
    assert agent.step().released == []
    time.sleep(1.05)
    assert agent.step().released == ["H2", "H3"]
    assert {h.queue_id for h in store.holds()} == {"H4", "H5"}


def test_release_waits_while_no_ip_may_send_and_ramps_with_the_store(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("H0", "h0@yahoo.com", "hold")
    store.add_hold(Hold("H0", "postfix", IP1, reason="cooldown:TSS04"))
    store.pause(IP1, 60, "x", "pytest")
    store.pause(IP2, 60, "x", "pytest")
    agent = agent_for(store, q)
    assert agent.step().released == []
    store.resume(IP2, "pytest")
    assert agent.step().released == ["H0"]
    assert q.state("H0") == "deferred" and store.holds() == []


def test_all_ips_cooling_holds_mail_the_transport_map_deferred(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("R1", "r1@yahoo.com", "deferred", "governor: no IP may send to Yahoo (cooldown:TSS04)")
    q.add("R2", "r2@yahoo.com", "active")
    for ip in (IP1, IP2):
        store.record(ip, classify(tss04(ip)))
    agent = agent_for(store, q)
    assert agent.step().held == ["R1"]
    (hold,) = store.holds()
    assert hold.reason.startswith("cooldown:TSS04")


def test_retry_deferred_mail_is_kicked_when_an_ip_may_send(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("R1", "r1@yahoo.com", "deferred", "governor: no IP may send to Yahoo (cooldown:TSS04)")
    agent = agent_for(store, q)
    report = agent.step()
    assert report.held == [] and report.released == ["R1"]
    assert ("release", ["R1"]) in q.calls


def test_deadline_holds_are_released_whatever_the_budget(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("OLD", "o@yahoo.com", "hold")
    q.add("NEW", "n@yahoo.com", "hold")
    agent = agent_for(store, q, "holds: {queue_lifetime: 100s, release_margin: 10s}\n")
    store.add_hold(Hold("OLD", "postfix", IP1, since=time.time() - 95, reason="held:TS03"))
    store.add_hold(Hold("NEW", "postfix", IP1, since=time.time() - 5, reason="held:TS03"))
    for ip in (IP1, IP2):
        store.pause(ip, 60, "x", "pytest")
    report = agent.step()
    assert report.deadline == ["OLD"] and report.released == []
    assert [h.queue_id for h in store.holds()] == ["NEW"]


def test_released_mail_is_not_held_again_for_the_same_deferral(store: AssigningStore) -> None:
    q = MemoryQueue()
    q.add("D1", "d1@yahoo.com", "deferred", tss04(IP1))
    store.record(IP1, classify(tss04(IP1)))
    agent = agent_for(store, q)
    report = agent.step()
    assert report.held == ["D1"] and report.released == ["D1"]   # IP2 takes it at once
    for _ in range(3):                                            # still shows IP1's old deferral
        assert agent.step().held == []
    q.messages["D1"] = dataclasses.replace(q.messages["D1"], reason=tss04(IP1) + " again")
    time.sleep(1.05)
    assert agent.step().held == ["D1"]                            # a new deferral from IP1


def test_registry_lets_go_of_messages_that_are_no_longer_queued_yahoo_mail(store: AssigningStore) -> None:
    q = MemoryQueue()
    store.add_hold(Hold("GONE", "postfix", IP1, since=time.time() - 30, reason="cooldown:TSS04"))
    store.add_hold(Hold("YOUNG", "postfix", IP1, reason="cooldown:TSS04"))   # the milter's, just now
    store.add_hold(Hold("EXIM1", "exim", IP1, since=time.time() - 30, reason="cooldown:TSS04"))
    store.pause(IP1, 60, "x", "pytest")
    store.pause(IP2, 60, "x", "pytest")
    report = agent_for(store, q).step()
    assert report.forgotten == ["GONE"]
    assert ("release", ["GONE"]) in q.calls                       # whatever is left of it is not parked
    assert sorted(h.queue_id for h in store.holds()) == ["EXIM1", "YOUNG"]  # other MTAs' holds are not ours


def test_redis_down_does_nothing_and_says_so() -> None:
    cfg = make_config("unix:///nonexistent/redis.sock")
    q = MemoryQueue()
    q.add("A1", "a1@yahoo.com")
    agent = QueueAgent(cfg, Store.connect(cfg), q, DomainSet.from_config(cfg))
    report = agent.step()
    assert report.error.startswith("store:") and q.calls == [] and agent.counts["redis_errors"] == 1


def test_release_rate_caps_the_pace() -> None:
    now = [0.0]
    limit = RateLimit(60.0, clock=lambda: now[0])
    assert limit.ready()
    limit.take()
    assert not limit.ready()
    now[0] = 1.0
    assert limit.ready()
    assert RateLimit(None).ready()


def test_cli_once_reports_one_step_and_fails_cleanly(redis_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "governor.yaml"
    config.write_text(CONFIG + f"redis: {{url: '{redis_url}'}}\npostfix: {{config_directory: {tmp_path}/nope}}\n"
                      "logging: {syslog: false}\n")
    argv = [sys.executable, "-m", "governor.cli.postfix_cmds", "-c", str(config), "queue-agent", "--once", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["scanned"] and "postqueue" in report["error"]
    assert report["held"] == report["released"] == []
    bad = subprocess.run([*argv[:-3], "queue-agent", "--mta", "qmail"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


# --------------------------------------------------------------------------- provider state (shared with the milter)
def status(ip: str, **kw: Any) -> IpStatus:
    base = dict(ip=ip, name="x", enabled=True, cold=False, now=100.0, leases=0, concurrency=5, rate_now=0,
                rate_allowed=80.0, rate_factor=1.0, cooldown_until=0.0, cooldown_reason="", cooldown_reply="",
                cooldown_start=0.0, provider_paused_until=0.0, provider_pause_reason="", held=False,
                held_reason="", held_reply="", held_since=0.0, level=0, deferrals=0, complaints=0,
                recent_pauses=0, holds=0, per_connection=20, warmup_cap=None, warmup_used=0,
                hold_queue_until=0.0, last_limit="", last_limit_at=0.0, budget_at=0.0)
    base.update(kw)
    return IpStatus(**base)


def test_provider_state_open_when_any_ip_may_send() -> None:
    rows = [status("192.0.2.10", cooldown_until=150.0, cooldown_reason="TSS04"), status("192.0.2.11")]
    assert provider_state(rows).open


def test_provider_state_names_the_ip_whose_budget_returns_first() -> None:
    rows = [status("192.0.2.10", cooldown_until=190.0, cooldown_reason="TSS04"),
            status("192.0.2.11", cooldown_until=130.0, cooldown_reason="TS01"),
            status("192.0.2.12", held=True, held_reason="TS03")]
    st = provider_state(rows)
    assert (st.open, st.ip, st.reason, st.retry_after) == (False, "192.0.2.11", "cooldown:TS01", 30.0)
    assert provider_state([status("192.0.2.12", held=True, held_reason="TS03")]).reason == "held:TS03"
    assert provider_state([status("192.0.2.12", enabled=False)]).reason == "no-ip"
    paused = provider_state([status("192.0.2.10", provider_paused_until=160.0)])
    assert (paused.reason, paused.retry_after) == ("provider-paused", 60.0)


def test_hold_queue_ips_are_those_with_a_running_hold_queue() -> None:
    rows = [status("192.0.2.10", hold_queue_until=150.0, cooldown_reason="TSS04"),
            status("192.0.2.11", hold_queue_until=-1, held=True, held_reason="TS03"),
            status("192.0.2.12", hold_queue_until=90.0)]
    assert hold_queue_ips(rows) == {"192.0.2.10": "cooldown:TSS04", "192.0.2.11": "held:TS03"}
    assert hold_queue_ips(rows, margin=60.0) == {"192.0.2.11": "held:TS03"}   # ends too soon to bother


# --------------------------------------------------------------------------- Postfix parsing
POSTQUEUE_J = "\n".join(json.dumps(e) for e in [
    {"queue_name": "active", "queue_id": "8ED5320C2FA", "arrival_time": 1700000000, "message_size": 492,
     "forced_expire": False, "sender": "s@example.org",
     "recipients": [{"address": "b@example.org"}, {"address": "a@yahoo.com"}]},
    {"queue_name": "deferred", "queue_id": "9AB", "arrival_time": 1700000001, "sender": "s@example.org",
     "recipients": [{"address": "x@example.org", "delay_reason": "connection refused"},
                    {"address": "c@AOL.com", "delay_reason": tss04(IP1)}]},
    {"queue_name": "hold", "queue_id": "7CD", "arrival_time": 1700000002, "sender": "",
     "recipients": [{"address": "friend@example.org"}]},
]) + "\n"


def test_parse_queue_keeps_governed_recipients_and_their_delay_reason() -> None:
    msgs = parse_queue(POSTQUEUE_J + "not json\n", DomainSet(dns=False))
    assert msgs == [
        QueuedMessage("8ED5320C2FA", ("a@yahoo.com",), "active", 1700000000.0, ""),
        QueuedMessage("9AB", ("c@AOL.com",), "deferred", 1700000001.0, tss04(IP1)),
    ]


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("postfix") is None or os.geteuid() != 0, reason="needs Postfix and root")
def test_postfix_backend_holds_and_releases_real_queue_files() -> None:
    from governor.lab.postfix import PostfixInstance
    from governor.lab.sink import SmtpSink

    workdir = Path(tempfile.mkdtemp(prefix="gqa-", dir="/tmp"))
    try:
        with SmtpSink() as sink, PostfixInstance(workdir, relayhost=sink.nexthop,
                                                 main_cf={"defer_transports": "smtp"}) as pf:
            ids = pf.inject(3, recipients=["a@yahoo.com", "b@example.org"]).queue_ids
            backend = PostfixQueue(str(pf.config_dir))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                listed = backend.list_governed(DomainSet(dns=False))
                if len(listed) == 3 and all(m.state == "deferred" for m in listed):
                    break
                time.sleep(0.1)
            assert sorted(m.queue_id for m in listed) == sorted(ids)
            assert all(m.recipients == ("a@yahoo.com",) and m.reason == "deferred transport" for m in listed)
            assert sorted(backend.hold(ids + ["NOSUCHID"])) == sorted(ids)
            assert sorted(pf.queue_ids("hold")) == sorted(ids)
            pf.postconf(defer_transports="")
            pf.reload()
            assert sorted(backend.release(ids[:2])) == sorted(ids[:2])
            sink.wait_messages(2, timeout=20)
            assert pf.queue_ids("hold") == [ids[2]]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


