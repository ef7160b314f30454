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


# --------------------------------------------------------------------------- the milter and the queue agent
import os  # noqa: E402 - the subprocess tests below
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from governor.adapters.milter import MilterPolicy  # noqa: E402
from governor.domains import DomainSet  # noqa: E402
from governor.lab.postfix import free_port  # noqa: E402


def counter(text: str, prefix: str) -> float:
    """A counter's value, 0 when the series does not exist yet."""
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_milter_decisions_are_counted(redis_url: str) -> None:
    base = default_config()
    cfg = dataclasses.replace(base, redis=dataclasses.replace(base.redis, url=redis_url, prefix="mm"),
                              pool=(EgressIP("127.0.0.2", "yahoo-ip1"),))
    store = Store.connect(cfg)
    port = metrics.serve("127.0.0.1:0", store.status)
    policy = MilterPolicy(cfg, store, DomainSet(dns=False), ttl=0.0)
    ok, hold = 'governor_decisions_total{reason="ok",result="continue"}', \
        'governor_decisions_total{reason="cooldown:admin",result="hold"}'
    before = scrape(port)
    assert policy.recipient("u@yahoo.com").action == "continue"
    store.pause("127.0.0.2", 60, "test", "pytest")
    assert policy.recipient("v@yahoo.com").action == "hold"
    policy.recipient("w@example.org")                                   # not governed: not a decision
    after = scrape(port)
    assert counter(after, ok) == counter(before, ok) + 1
    assert counter(after, hold) == counter(before, hold) + 1
    store.close()


def _config(tmp_path: Path, redis_url: str, metrics_yaml: str) -> Path:
    path = tmp_path / "governor.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', prefix: mp{os.getpid()}}}\npool: [{{ip: 127.0.0.2}}]\n"
                    "domains: {dns: false}\nlogging: {syslog: false, stderr: true}\n"
                    f"postfix: {{config_directory: '{tmp_path}/no-postfix'}}\nholds: {{scan_interval: 0.2s}}\n"
                    + metrics_yaml)
    return path


def _scrape_until(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            return scrape(port)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no /metrics on {port}")


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM, then collect its output (which also closes the pipes)."""
    proc.terminate()
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=5)


def test_queue_agent_serves_metrics_from_config_and_counts_queue_ops(tmp_path: Path, redis_url: str) -> None:
    """The agent's queue operations move on its own /metrics (metrics.queue_agent_listen):
    here every scan fails (no Postfix at that path), which it counts as mta_errors."""
    port = free_port()
    cfg = _config(tmp_path, redis_url, f"metrics: {{queue_agent_listen: '127.0.0.1:{port}'}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "governor.cli.postfix_cmds", "-c", str(cfg), "queue-agent",
                             "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        series = 'governor_queue_operations_total{mta="postfix",op="mta_errors"}'
        first = counter(_scrape_until(port, proc), series)
        deadline = time.monotonic() + 30
        while counter(scrape(port), series) < first + 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        text = scrape(port)
        assert counter(text, series) >= first + 2
        assert 'governor_leases_in_use{ip="127.0.0.2"}' in text        # the store's gauges too
    finally:
        _stop(proc)


def _milter_rcpt(port: int, rcpt: str) -> bytes:
    """Talk the milter protocol (v6) far enough for one RCPT; return the RCPT reply code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def send(cmd: bytes, data: bytes = b"") -> None:
            s.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

        def recv() -> bytes:
            (n,) = struct.unpack("!I", f.read(4))
            return f.read(n)

        send(b"O", struct.pack("!III", 6, 0x1FF, 0))
        proto = struct.unpack("!III", recv()[1:13])[2]
        reply = b""
        steps = [(b"C", b"client\0" + b"4" + struct.pack("!H", 4000) + b"127.0.0.1\0", 0x01, 0x1000),
                 (b"H", b"client\0", 0x02, 0x2000), (b"M", b"<a@example.org>\0", 0x04, 0x4000),
                 (b"R", f"<{rcpt}>\0".encode(), 0x08, 0x8000)]
        for cmd, data, skip, no_reply in steps:
            if proto & skip:
                continue
            send(cmd, data)
            if not proto & no_reply:
                reply = recv()[:1]
        send(b"A")
        send(b"Q")
        return reply


def test_milter_serves_metrics_from_config_and_counts_decisions(tmp_path: Path, redis_url: str) -> None:
    mport, port = free_port(), free_port()
    cfg = _config(tmp_path, redis_url, f"metrics: {{milter_listen: '127.0.0.1:{mport}'}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "governor.cli.postfix_cmds", "-c", str(cfg), "milter",
                             "--socket", f"inet:127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        series = 'governor_decisions_total{reason="ok",result="continue"}'
        before = counter(_scrape_until(mport, proc), series)
        deadline = time.monotonic() + 20
        while True:
            try:
                replies = [_milter_rcpt(port, "u@yahoo.com") for _ in range(3)]
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert all(r in (b"c", b"a") for r in replies), replies
        after = scrape(mport)
        assert counter(after, series) == before + 3
        assert counter(after, 'governor_requests_total{outcome="rcpt_governed",protocol="milter"}') >= 3
    finally:
        _stop(proc)
