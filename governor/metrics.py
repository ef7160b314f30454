"""Prometheus metrics: what the governor decided, what Yahoo said, and the store's state.

Counters and histograms are updated in-process by the adapters (daemon, milter,
queue agent); per-IP gauges (leases, cooldowns, levels, held mail) are read from
the shared store at scrape time, so every host's exporter shows the same, true
numbers. Labels are low-cardinality only: an egress IP (the pool is small), a
reply code, an action — never a recipient or a message.

Naming follows Prometheus practice and postfix_exporter: ``governor_`` prefix,
base units, ``_total`` counters, ``_seconds`` histograms.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "governor_decisions_total",
    "Admission decisions by result and reason (daemon: granted/denied/failopen; milter: continue/hold/tempfail).",
    ["result", "reason"], registry=REGISTRY,
)
FEEDBACK = Counter(
    "governor_replies_total", "Yahoo replies seen by egress IP and code (code 'ok' for 2xx, 'other' unrecognised).",
    ["ip", "code"], registry=REGISTRY,
)
ACTIONS = Counter(
    "governor_actions_total", "Policy actions applied, by kind.", ["kind"], registry=REGISTRY,
)
REQUESTS = Counter(
    "governor_requests_total", "MTA-facing requests by protocol and outcome.",
    ["protocol", "outcome"], registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "governor_redis_errors_total", "Store operations that failed to reach Redis (fail mode applied).",
    registry=REGISTRY,
)
REDIS_LATENCY = Histogram(
    "governor_redis_latency_seconds", "Round trip of one store operation.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
QUEUE_OPS = Counter(
    "governor_queue_operations_total", "Queue agent operations on MTA queues (scans, held, released, deadline_released, mta_errors).",
    ["mta", "op"], registry=REGISTRY,
)


def reply_code_label(code: str | None, success: bool) -> str:
    """Bounded label for a reply: 'ok', a Yahoo code/label, or 'other'."""
    if success:
        return "ok"
    return code if code else "other"


def reason_label(reason: str) -> str:
    """Bounded label for a decision reason ("ok", "rate", "cooldown:TSS04", ...)."""
    return reason[:40] if reason else "unknown"


class StoreCollector(Collector):
    """Per-IP gauges read from the store at scrape time (cached briefly)."""

    def __init__(self, status: Callable[[], Iterable[Any]], ttl: float = 1.0) -> None:
        self._status = status
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any]] = (0.0, [])

    def use(self, status: Callable[[], Iterable[Any]]) -> None:
        with self._lock:
            self._status = status
            self._cached = (0.0, [])

    def _rows(self) -> list[Any]:
        with self._lock:
            at, rows = self._cached
            if time.monotonic() - at > self._ttl:
                try:
                    rows = list(self._status())
                except Exception:  # noqa: BLE001 - a scrape must never fail on Redis
                    REDIS_ERRORS.inc()
                    rows = []
                self._cached = (time.monotonic(), rows)
            return rows

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """Nothing up front: registering must not read the store (and cache an old answer)."""
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rows = self._rows()
        families = {
            "leases": GaugeMetricFamily("governor_leases_in_use", "Concurrency leases held per egress IP.",
                                        labels=["ip"]),
            "limit": GaugeMetricFamily("governor_concurrency_limit", "Concurrency cap per egress IP.",
                                       labels=["ip"]),
            "rate": GaugeMetricFamily("governor_rate_allowed_per_minute",
                                      "Messages per minute allowed now (limit × ramp factor).", labels=["ip"]),
            "sent": GaugeMetricFamily("governor_rate_granted_last_minute", "Grants in the last 60 s.",
                                      labels=["ip"]),
            "cooling": GaugeMetricFamily("governor_cooldown_active", "1 while the IP is cooling or paused.",
                                         labels=["ip", "reason"]),
            "held": GaugeMetricFamily("governor_ip_held", "1 while the IP is held until an admin releases it.",
                                      labels=["ip"]),
            "level": GaugeMetricFamily("governor_escalation_level", "Escalation level (0-3).", labels=["ip"]),
            "holds": GaugeMetricFamily("governor_holds_active", "Messages held in MTA queues for the IP.",
                                       labels=["ip"]),
            "deferrals": GaugeMetricFamily("governor_deferrals_window", "Deferrals within the complaint window.",
                                           labels=["ip"]),
        }
        for s in rows:
            families["leases"].add_metric([s.ip], s.leases)
            families["limit"].add_metric([s.ip], s.concurrency)
            families["rate"].add_metric([s.ip], s.rate_allowed)
            families["sent"].add_metric([s.ip], s.rate_now)
            families["cooling"].add_metric([s.ip, s.cooldown_reason or ""], 1 if s.cooling else 0)
            families["held"].add_metric([s.ip], 1 if s.held else 0)
            families["level"].add_metric([s.ip], s.level)
            families["holds"].add_metric([s.ip], s.holds)
            families["deferrals"].add_metric([s.ip], s.deferrals)
        yield from families.values()


_collector: StoreCollector | None = None
_port: int | None = None


def serve(listen: str | None, status: Callable[[], Iterable[Any]] | None = None) -> int | None:
    """Start the /metrics HTTP endpoint on ``listen`` (host:port; port 0 = any free one).

    Returns the bound port, or None when ``listen`` is None (metrics disabled).
    ``status`` (e.g. ``Store.status``) feeds the per-IP gauges.
    """
    global _collector, _port
    if listen is None:
        return None
    if status is not None:
        if _collector is None:
            _collector = StoreCollector(status)
            REGISTRY.register(_collector)
        else:  # the latest store wins (one collector per process)
            _collector.use(status)
    if _port is not None:  # one exporter per process (the daemon, the milter)
        return _port
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=REGISTRY)
    _port = server.server_address[1]
    return _port
