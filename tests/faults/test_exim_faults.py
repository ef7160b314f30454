"""Faults injected into a governed Exim mid-drain (real Exim 4.96, real Redis, the
simulator, ``governor serve`` as a subprocess; the Exim lab of tests/e2e/test_exim_e2e.py).

40 Yahoo messages are queued and drained at 60/min per IP over four IPs; once a
fifth is delivered one fault is injected and 10 more messages are queued while it
lasts. Then every message is accounted for: in = delivered + still queued, none
bounced, no lease left once ``lease_ttl`` (5 s here) has passed, at most 5
connections per IP at the simulator.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from governor.config import load_config_text
from governor.lab import faults
from governor.lab.exim import EximInstance, lab_unavailable
from governor.lab.faults import Outcome, wait_for
from governor.redisproc import RedisProc
from governor.sim.process import SimProcess
from governor.store import Store



def _exim_e2e() -> Any:
    """tests/e2e/test_exim_e2e.py, for its daemon, config and queue helpers (tests/
    is not a package; tests/faults/conftest.py loads it under the same name)."""
    import importlib.util
    import sys

    name = "governor_exim_e2e"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "e2e" / "test_exim_e2e.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


X = _exim_e2e()
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")]

N, DURING, START_AFTER, CAP = 40, 10, 8, 5
LEASE_TTL_S = 5.0                      # lease_ttl 5000s x time_scale 0.001


@contextlib.contextmanager
def governor(workdir: Path, redis_url: str, mode: str) -> Iterator[Any]:
    """``governor serve`` for the Exim lab, with a lease_ttl long enough to matter."""
    sock = workdir / "gov.sock"
    text = X.governor_yaml(redis_url, sock, redis_down=mode, rate=60).replace(
        "burst: 0,", f"burst: 0, lease_ttl: {LEASE_TTL_S * 1000:.0f}s,")
    cfg_path = workdir / "governor.yaml"
    cfg_path.write_text(text)
    cfg = load_config_text(text, str(cfg_path))
    runner = X.ServeProcess(cfg_path, sock, workdir / "serve.log")
    runner.start()
    store = Store.connect(cfg)
    try:
        yield X.Governor(cfg, sock, store, runner)
    finally:
        runner.stop()
        store.close()


@pytest.fixture
def sim(yahoo_sim: SimProcess) -> SimProcess:
    for key, value in {**X.SIM_LIMITS, "max_rate": 120}.items():
        yahoo_sim.set(key, value)
    return yahoo_sim


def delivered(sim: SimProcess) -> int:
    return sum(s["recipients"] for s in sim.stats(include_times=False)["ips"].values())


def run(workdir: Path, redis: RedisProc, sim: SimProcess, name: str, mode: str,
        fault: Callable[[Any, EximInstance, Callable[[], None]], float], **notes: Any) -> Outcome:
    with governor(workdir, redis.url, mode) as gov:
        inst = X.exim_for(gov, sim)
        try:
            inst.prepare()
            X.queue_batch(inst, N, lambda i: f"drain{i}@yahoo.com")
            inst.start()
            wait_for("first deliveries", lambda: delivered(sim) >= START_AFTER, 60)
            t_end = fault(gov, inst, lambda: X.queue_batch(inst, DURING, lambda i: f"during{i}@yahoo.com"))
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                wait_for("drained", lambda: delivered(sim) >= N + DURING and inst.queue_count() == 0, 120, 0.3)
            drain = time.monotonic() - t0
            time.sleep(LEASE_TTL_S + 1.0)
            stats = sim.stats(include_times=True)
            log = inst.read_mainlog()
            out = Outcome(name=name, n_in=N + DURING, delivered=delivered(sim), queued=inst.queue_count(),
                          rejected=log.count(" ** "), maxconc=faults.max_concurrency(stats), cap=CAP,
                          leases_left=faults.leases_left(redis, gov.cfg.redis.prefix, X.POOL),
                          recover_s=faults.first_accept_after(stats, t_end) or 0.0, drain_s=drain,
                          notes=dict(notes))
            out.notes["stale_leases"] = faults.stale_leases(redis, gov.cfg.redis.prefix, X.POOL)
            if out.problems():
                print(log[-5000:], gov.runner.child.log_text()[-3000:])
            return out
        finally:
            inst.stop()


@pytest.mark.parametrize("mode,persist", [("fail-open", True), ("fail-closed", False)])
def test_redis_killed_mid_drain_and_restarted(lab_workdir: Path, private_redis: RedisProc, sim: SimProcess,
                                              fault_report: Any, mode: str, persist: bool) -> None:
    """fail-open: deliveries go on from pool IPs (lease=-); fail-closed: the router
    DEFERs governed mail while Redis is down. The daemon reconnects by itself."""
    if persist:
        faults.enable_aof(private_redis)
    pid: list[int | None] = []

    def fault(gov: Any, inst: EximInstance, during: Callable[[], None]) -> float:
        pid.append(gov.runner.child.pid)
        private_redis.kill()
        during()
        time.sleep(3.0)
        private_redis.start()
        pid.append(gov.runner.child.pid if gov.runner.child.alive() else None)
        return time.time()

    out = run(lab_workdir, private_redis, sim, f"exim-redis-kill-{mode}-{'aof' if persist else 'nopersist'}",
              mode, fault)
    out.notes["reconnected"] = pid[0] == pid[1]
    fault_report(out)
    assert out.notes["reconnected"] and out.queued == 0


def test_redis_slow_beyond_readsocket_timeout(lab_workdir: Path, private_redis: RedisProc, sim: SimProcess,
                                             fault_report: Any) -> None:
    """CLIENT PAUSE 9 s, past readsocket_timeout (7 s) and exim.wait (5 s), fail-closed:
    the router DEFERs, nothing hangs, everything is delivered after the pause."""
    def fault(gov: Any, inst: EximInstance, during: Callable[[], None]) -> float:
        end = faults.pause_redis(private_redis, 9.0)
        during()
        time.sleep(max(0.0, end - time.time()))
        return time.time()

    out = run(lab_workdir, private_redis, sim, "exim-redis-slow-fail-closed", "fail-closed", fault)
    fault_report(out)
    assert out.queued == 0


def test_kill9_governor_serve_while_leases_are_held(lab_workdir: Path, private_redis: RedisProc, sim: SimProcess,
                                                   fault_report: Any) -> None:
    """kill -9 ``governor serve`` while deliveries hold leases, restart it 2 s later:
    the leases expire within lease_ttl and everything is delivered."""
    held: list[int] = []

    def fault(gov: Any, inst: EximInstance, during: Callable[[], None]) -> float:
        held.append(faults.leases_left(private_redis, gov.cfg.redis.prefix, X.POOL))
        child = gov.runner.child
        faults.kill9([child.pid])
        child.proc.wait(5)
        during()
        time.sleep(2.0)
        gov.runner.start()
        return time.time()

    out = run(lab_workdir, private_redis, sim, "exim-kill9-serve", "fail-open", fault)
    out.notes["leases_at_kill"] = held[0]
    fault_report(out)
    assert out.queued == 0


def test_kill9_exim_delivery_processes(lab_workdir: Path, private_redis: RedisProc, sim: SimProcess,
                                       fault_report: Any) -> None:
    """kill -9 every Exim process but the daemon (queue runners and their deliveries,
    which hold leases) three times, 1 s apart: the leases expire within lease_ttl, the
    messages stay queued and are delivered by later queue runs."""
    killed: list[int] = []
    held: list[int] = []

    def fault(gov: Any, inst: EximInstance, during: Callable[[], None]) -> float:
        assert inst.daemon is not None
        for _ in range(3):
            held.append(faults.leases_left(private_redis, gov.cfg.redis.prefix, X.POOL))
            killed.extend(faults.kill9(p for p in inst.processes() if p != inst.daemon.pid))
            time.sleep(1.0)
        during()
        return time.time()

    out = run(lab_workdir, private_redis, sim, "exim-kill9-delivery", "fail-open", fault)
    out.notes.update(killed=len(killed), leases_at_kill=max(held))
    fault_report(out)
    assert killed and out.queued == 0


def test_simulator_drops_mid_data(lab_workdir: Path, private_redis: RedisProc, sim: SimProcess,
                                  fault_report: Any) -> None:
    """Every 3rd session cut after its data until 3 were hit: Exim defers and retries; each
    message is delivered once and the lease of each cut delivery is released."""
    hits: list[int] = []

    def fault(gov: Any, inst: EximInstance, during: Callable[[], None]) -> float:
        sim.fault("drop-data", 3)
        during()
        wait_for("drop-data injected", lambda: sim.stats(include_times=False)["faults"]["drop-data"] >= 3, 40, 0.2)
        sim.fault(None)
        hits.append(sim.stats(include_times=False)["faults"]["drop-data"])
        return time.time()

    out = run(lab_workdir, private_redis, sim, "exim-sim-drop-data", "fail-open", fault)
    out.notes["faults"] = hits[0]
    fault_report(out)
    assert hits[0] > 0 and out.queued == 0
