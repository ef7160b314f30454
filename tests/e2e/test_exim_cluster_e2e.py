"""Exim end to end on Redis's own HA modes, with a failover mid-drain.

The flow of tests/e2e/test_exim_e2e.py (real Exim 4.96, ``governor serve``, the
Yahoo simulator), but the governor's store is a private 3-master Redis Cluster
(governor.lab.redisha.ClusterLab) or a primary + replica + 3 Sentinels
(SentinelLab), and while the queue drains the primary is failed over to its
replica (``CLUSTER FAILOVER`` of the master owning the first egress IP's slot, or
``SENTINEL FAILOVER``). Every message arrives, the simulator never sees more than
5 connections per IP, and no lease is left behind.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_exim_e2e import POOL, SIM_LIMITS, exim_for, governor_daemon, leases_left, queue_batch, sim_ips

from governor.lab import wait_for
from governor.lab.exim import lab_unavailable
from governor.lab.faults import leases_in_force
from governor.lab.redisha import ClusterLab, SentinelLab
from governor.sim.process import SimProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or ""),
]


@pytest.fixture
def sim(yahoo_sim: SimProcess) -> SimProcess:
    """The shared simulator at Yahoo's limits, as in test_exim_e2e.py."""
    for key, value in SIM_LIMITS.items():
        yahoo_sim.set(key, value)
    return yahoo_sim


@pytest.fixture
def cluster() -> Iterator[ClusterLab]:
    with ClusterLab(masters=3, replicas=1) as lab:
        yield lab


@pytest.fixture
def sentinels() -> Iterator[SentinelLab]:
    with SentinelLab() as lab:
        yield lab


def test_drain_on_a_cluster_through_a_failover(lab_workdir: Path, cluster: ClusterLab, sim: SimProcess) -> None:
    drain_through_failover(lab_workdir, cluster.url, lambda: cluster.failover(f"{{{POOL[0]}}}"), sim, "cluster")


def test_drain_on_sentinel_through_a_failover(lab_workdir: Path, sentinels: SentinelLab, sim: SimProcess) -> None:
    drain_through_failover(lab_workdir, sentinels.url, sentinels.failover, sim, "sentinel")


def drain_through_failover(lab_workdir: Path, url: str, failover_now: Callable[[], tuple[int, int]],
                           sim: SimProcess, what: str) -> None:
    """Queue 200 messages, start Exim, fail the primary over 3 s in; all arrive within the caps."""
    n = 200
    moved: list[tuple[int, int]] = []
    with governor_daemon(lab_workdir, url) as gov:
        assert gov.store.cluster == (what == "cluster")
        inst = exim_for(gov, sim)
        try:
            inst.prepare()
            queue_batch(inst, n, lambda i: f"{what}{i}@yahoo.com")
            assert inst.queue_count() == n
            t0 = time.time()
            inst.start()
            failover = threading.Timer(3.0, lambda: moved.append(failover_now()))
            failover.start()
            inst.wait_empty(timeout=180, poll=0.5)
            failover.join(60)
            stats = sim_ips(sim)
            last = max(s["last_accept"] for s in stats.values() if s["last_accept"])
            print(f"\n{what} drain: {n} messages in {last - t0:.1f}s, failover {moved}")
            for ip, s in stats.items():
                print(f"  {ip}: accepted {s['accepted']} hwm {s['concurrency_hwm']} TSS04 {s['replies']['TSS04']}")
            assert moved and moved[0][0] != moved[0][1]
            assert sum(s["accepted"] for s in stats.values()) == n  # nothing lost
            for s in stats.values():
                assert s["concurrency_hwm"] <= 5
            if what == "cluster":   # CLUSTER FAILOVER is graceful: no release is lost
                assert leases_left(gov) == dict.fromkeys(POOL, 0)
            # A release lost in the failover window binds only until lease_ttl (docs/store.md).
            wait_for("leases expired", lambda: leases_in_force(gov.store.client, gov.cfg.redis.prefix, POOL) == 0,
                     10)
        finally:
            inst.stop()
