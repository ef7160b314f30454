"""Faults injected into a governed Postfix mid-drain (real Postfix 3.7, real Redis,
the simulator, ``governor serve`` / ``milter`` / ``queue-agent`` as subprocesses).

Each scenario drains 60 Yahoo messages at 60/min per IP over four IPs (about 15 s),
injects one fault once a fifth is delivered, sends 20 more messages while the fault
lasts (a client retries what is tempfailed), and then accounts for every recipient:
in = delivered + still queued, none rejected or bounced, no lease left, at most 5
connections per IP at the simulator. One ``FAULT …`` line per scenario goes to
stdout and to tests/faults/results.json.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from governor.demo import POOL, Outcome as Sent, PostfixLab, inject, postfix_lab_problem, yahoo_recipients
from governor.lab import faults
from governor.lab.faults import Outcome, wait_for

PROBLEM = postfix_lab_problem()
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")]

N, DURING, START_AFTER = 60, 20, 12
CAP = 5
#: short retry timers: a message deferred by a fault is tried again within seconds
FAST_RETRY = {"minimal_backoff_time": "2s", "maximal_backoff_time": "4s", "queue_run_delay": "2s"}


def make_lab(lab_factory: Callable[..., PostfixLab], mode: str = "fail-open") -> PostfixLab:
    return lab_factory(redis_down=mode, rate=60, sim_rate=120, concurrency=CAP, sim_conn=CAP,
                       postfix_main=dict(FAST_RETRY))


class Client:
    """The submitting application: sends, and sends again what got a 4xx (bounded)."""

    def __init__(self, lab: PostfixLab) -> None:
        assert lab.pf is not None
        self.port = lab.pf.smtpd_port
        self.accepted = 0
        self.rejected = 0
        self.tempfailed = 0
        self.retry: list[tuple[int, list[str]]] = []
        self.lock = threading.Lock()

    def send(self, messages: list[tuple[int, list[str]]], connections: int = 4) -> None:
        self._count(inject(self.port, messages, connections=connections), dict(messages))

    def _count(self, sent: list[Sent], rcpts: dict[int, list[str]]) -> None:
        with self.lock:
            for o in sent:
                self.accepted += len(o.accepted)
                again = [r for r, reply in o.refused.items() if reply.startswith("4")]
                self.rejected += len(o.refused) - len(again)
                if o.error and o.error.startswith("5"):
                    self.rejected += len(rcpts[o.seq])
                elif o.error:                 # 4xx or a dropped session: send it all again
                    again = list(rcpts[o.seq])
                if again:
                    self.tempfailed += len(again)
                    self.retry.append((o.seq, again))

    def resend(self, timeout: float = 60.0) -> None:
        """Send the tempfailed recipients again until accepted (a real MTA would)."""
        deadline = time.monotonic() + timeout
        while self.retry and time.monotonic() < deadline:
            todo, self.retry = self.retry, []
            time.sleep(1.0)
            self._count(inject(self.port, todo, connections=2), dict(todo))
        assert not self.retry, f"still tempfailed after {timeout}s: {self.retry[:3]}"


def account(lab: PostfixLab, name: str, client: Client, t_end: float, drain_timeout: float = 120.0,
            **notes: Any) -> Outcome:
    """Wait for the drain, then count everything (see the module docstring)."""
    assert lab.pf is not None and lab.sim is not None and lab.redis is not None
    t0 = time.monotonic()
    try:
        lab.wait_delivered(client.accepted, timeout=drain_timeout)
        lab.pf.wait_empty(timeout=15)
    except TimeoutError:
        pass                                  # counted below as queued (or lost)
    drain = time.time() - t_end if time.monotonic() - t0 < drain_timeout else drain_timeout
    time.sleep(1.0)                           # lease_ttl (0.3 s at this time scale) passes
    stats = lab.sim.stats(include_times=True)
    log = lab.pf.log_text()
    out = Outcome(
        name=name, n_in=client.accepted, delivered=sum(lab.delivered()),
        queued=sum(len(m.get("recipients", [])) for m in lab.pf.queue()),
        rejected=client.rejected + log.count("status=bounced") + log.count("status=expired"),
        tempfailed=client.tempfailed, maxconc=faults.max_concurrency(stats), cap=CAP,
        leases_left=faults.leases_left(lab.redis, "lab", POOL),
        recover_s=faults.first_accept_after(stats, t_end) or 0.0, drain_s=max(0.0, drain), notes=dict(notes))
    if out.problems():
        print(lab.logs()[-6000:])
    return out


def drain_with_fault(lab: PostfixLab, fault: Callable[[Callable[[], None]], float]) -> tuple[Client, float]:
    """Start the drain, call ``fault(during)`` once a fifth is delivered (``during()``
    sends the extra messages; the fault decides when), then resend what was tempfailed."""
    client = Client(lab)
    client.send(yahoo_recipients(N))
    wait_for("first deliveries", lambda: lab.delivered()[0] >= START_AFTER, 60)
    t_end = fault(lambda: client.send(yahoo_recipients(DURING, start=500, tag="during")))
    client.resend()
    return client, t_end


def same_children(lab: PostfixLab, pids: dict[str, int | None]) -> bool:
    return {n: c.pid for n, c in lab.children.items()} == pids and all(c.alive() for c in lab.children.values())


# --------------------------------------------------------------------------- Redis
@pytest.mark.parametrize("mode,persist", [("fail-open", False), ("fail-closed", False),
                                          ("fail-open", True), ("fail-closed", True)])
def test_redis_killed_mid_drain_and_restarted(lab_factory: Any, fault_report: Any, mode: str, persist: bool) -> None:
    """SIGKILL redis-server for 3 s. fail-open: nothing refused; fail-closed: Yahoo
    recipients 451 4.7.1 at RCPT while it is down. Either way every daemon reconnects
    by itself (same PIDs) and everything is delivered."""
    lab = make_lab(lab_factory, mode)
    assert lab.redis is not None
    if persist:
        faults.enable_aof(lab.redis)
    pids = {n: c.pid for n, c in lab.children.items()}

    def fault(during: Callable[[], None]) -> float:
        lab.redis.kill()
        time.sleep(0.6)                       # past the milter's 0.5 s cache
        during()
        time.sleep(max(0.0, 3.0 - 0.6))
        lab.redis.start()
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    name = f"postfix-redis-kill-{mode}-{'aof' if persist else 'nopersist'}"
    out = account(lab, name, client, t_end, reconnected=same_children(lab, pids))
    fault_report(out)
    assert out.notes["reconnected"]
    if mode == "fail-open":
        assert client.tempfailed == 0
    else:
        assert client.tempfailed > 0
    assert out.queued == 0


@pytest.mark.parametrize("command", ["SCRIPT FLUSH", "FLUSHALL"])
def test_redis_script_flush_and_flushall_mid_drain(lab_factory: Any, fault_report: Any, command: str) -> None:
    """Scripts or all state vanish mid-drain: the store reloads its scripts, starts
    from fresh state, and nothing is refused (fail-closed would show any error)."""
    lab = make_lab(lab_factory, "fail-closed")
    assert lab.redis is not None
    pids = {n: c.pid for n, c in lab.children.items()}

    def fault(during: Callable[[], None]) -> float:
        faults.redis_command(lab.redis, *command.split())
        during()
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    out = account(lab, f"postfix-redis-{command.lower().replace(' ', '-')}", client, t_end,
                  reconnected=same_children(lab, pids))
    fault_report(out)
    assert client.tempfailed == 0 and out.queued == 0


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_slow_beyond_the_timeouts(lab_factory: Any, fault_report: Any, mode: str) -> None:
    """CLIENT PAUSE 8 s (past redis.socket_timeout 0.5 s and the milter's 5 s
    command_timeout): SMTP sessions still end within bounded time, the fail mode
    applies, and mail flows governed again after the pause."""
    lab = make_lab(lab_factory, mode)
    assert lab.redis is not None
    took: list[float] = []

    def fault(during: Callable[[], None]) -> float:
        end = faults.pause_redis(lab.redis, 8.0)
        t = time.monotonic()
        during()
        took.append(time.monotonic() - t)
        time.sleep(max(0.0, end - time.time()))
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    out = account(lab, f"postfix-redis-slow-{mode}", client, t_end, inject_during_s=round(took[0], 1))
    fault_report(out)
    assert took[0] < 30.0, "SMTP sessions stuck behind the paused Redis"
    assert out.queued == 0
    if mode == "fail-open":
        assert client.tempfailed == 0


# --------------------------------------------------------------------------- processes
@pytest.mark.parametrize("victim", ["serve", "milter", "queue-agent"])
def test_kill9_governor_process_and_restart(lab_factory: Any, fault_report: Any, victim: str) -> None:
    """kill -9 one governor process mid-drain, restart it 2 s later (what systemd's
    Restart= does): nothing lost, everything delivered."""
    lab = make_lab(lab_factory)
    restart = {"serve": lab.start_serve, "milter": lab.start_milter, "queue-agent": lab.start_agent}[victim]

    def fault(during: Callable[[], None]) -> float:
        child = lab.children[victim]
        assert child.proc is not None
        faults.kill9([child.proc.pid])
        child.proc.wait(5)
        during()
        time.sleep(2.0)
        restart()
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    out = account(lab, f"postfix-kill9-{victim}", client, t_end)
    fault_report(out)
    assert out.queued == 0


def test_kill9_postfix_smtp_processes_mid_delivery(lab_factory: Any, fault_report: Any) -> None:
    """kill -9 every slot smtp client three times, 1 s apart: the messages they were
    delivering are deferred and retried, none lost, the cap holds."""
    lab = make_lab(lab_factory)
    assert lab.pf is not None
    killed: list[int] = []

    def fault(during: Callable[[], None]) -> float:
        worker = threading.Thread(target=during)
        worker.start()
        for _ in range(3):
            killed.extend(faults.kill9(faults.postfix_slot_smtp(lab.pf.processes())))
            time.sleep(1.0)
        worker.join(60)
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    out = account(lab, "postfix-kill9-smtp", client, t_end, killed=len(killed))
    fault_report(out)
    assert killed and out.queued == 0


# --------------------------------------------------------------------------- the MX misbehaves
@pytest.mark.parametrize("kind", ["drop-data", "garbage-data", "garbage-greeting"])
def test_simulator_drops_or_answers_garbage(lab_factory: Any, fault_report: Any, kind: str) -> None:
    """Every 3rd session is cut after its data, or gets a non-SMTP line instead of the
    end-of-DATA reply or the greeting, until 3 sessions were hit: Postfix defers those messages and
    delivers them later, each exactly once (the simulator counts only accepted ones)."""
    lab = make_lab(lab_factory)
    assert lab.sim is not None
    hits: list[int] = []

    def fault(during: Callable[[], None]) -> float:
        if kind == "garbage-greeting":
            # the slots keep their connections cached: a 2-message cap makes them reconnect
            lab.sim.set("max_per_conn", 2)
        lab.sim.fault(kind, 3)
        during()
        # Postfix's slots deliver in bursts (one message per slot per rate delay):
        # keep the fault on until it hit a few sessions
        wait_for(f"{kind} injected", lambda: lab.sim.stats(include_times=False)["faults"][kind] >= 3, 60, 0.2)
        lab.sim.fault(None)
        lab.sim.set("max_per_conn", 20)
        hits.append(lab.sim.stats(include_times=False)["faults"][kind])
        return time.time()

    client, t_end = drain_with_fault(lab, fault)
    out = account(lab, f"postfix-sim-{kind}", client, t_end, faults=hits[0])
    fault_report(out)
    assert hits[0] > 0 and out.queued == 0
