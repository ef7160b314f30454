"""The /metrics endpoint: counters move, per-IP gauges come from the real store."""
from __future__ import annotations

import dataclasses
import time
import urllib.request

from governor import metrics
from governor.classify import classify
from governor.config import EgressIP, default_config
from governor.store import Store

TSS04 = "421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred due to unexpected volume or user complaints"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, prefix: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return float(line.rsplit(" ", 1)[1])


def test_metrics_endpoint_shows_store_state_and_counters(redis_url: str) -> None:
    base = default_config()
    cfg = dataclasses.replace(base, redis=dataclasses.replace(base.redis, url=redis_url, prefix="m"),
                              pool=(EgressIP("127.0.0.2", "yahoo-ip1"), EgressIP("127.0.0.3", "yahoo-ip2")))
    store = Store.connect(cfg)
    port = metrics.serve("127.0.0.1:0", store.status)
    d = store.acquire("127.0.0.3")
    metrics.DECISIONS.labels("granted", "ok").inc()
    store.record("127.0.0.2", classify(TSS04))
    metrics.FEEDBACK.labels("127.0.0.2", metrics.reply_code_label("TSS04", False)).inc()
    text = scrape(port)
    assert value(text, 'governor_leases_in_use{ip="127.0.0.3"}') == 1
    assert value(text, 'governor_cooldown_active{ip="127.0.0.2",reason="TSS04"}') == 1
    assert value(text, 'governor_decisions_total{reason="ok",result="granted"}') >= 1
    assert value(text, 'governor_replies_total{code="TSS04",ip="127.0.0.2"}') >= 1
    store.release(d.lease)
    metrics.FEEDBACK.labels("127.0.0.2", "TSS04").inc()
    time.sleep(1.1)  # past the collector's cache
    again = scrape(port)
    assert value(again, 'governor_leases_in_use{ip="127.0.0.3"}') == 0
    assert value(again, 'governor_replies_total{code="TSS04",ip="127.0.0.2"}') >= 2
    store.close()


def test_grafana_dashboard_only_uses_exported_metrics() -> None:
    """Every metric the shipped dashboard queries is one the governor exports."""
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parent.parent / "packaging/grafana/yahoo-governor.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(governor_[a-z_]+?)(?:_bucket|_total)?\b", e)}
    exported = {"governor_decisions", "governor_replies", "governor_actions", "governor_requests",
                "governor_redis_errors", "governor_redis_latency_seconds", "governor_queue_operations",
                "governor_leases_in_use", "governor_concurrency_limit", "governor_rate_allowed_per_minute",
                "governor_rate_granted_last_minute", "governor_cooldown_active", "governor_ip_held",
                "governor_escalation_level", "governor_holds_active", "governor_deferrals_window"}
    assert used <= exported, used - exported
