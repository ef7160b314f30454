"""governor report: snapshots from a real store become a PNG showing a cooldown."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.classify import classify
from governor.cli import main
from governor.cli.admin_cmds import status_json
from governor.config import load_config
from governor.report import ReportError, read_snapshots
from governor.store import Store

TSS04 = "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints"


def test_cooldown_shows_up_in_the_snapshots_and_the_png(tmp_path: Path, redis_url: str) -> None:
    cfg_path = tmp_path / "governor.yaml"
    cfg_path.write_text(f"time_scale: 0.0002\nredis: {{url: '{redis_url}'}}\n"
                        "pool: [{ip: 192.0.2.10}, {ip: 192.0.2.11}]\nlimits: {per_ip: {messages_per_minute: 600}}\n")
    store = Store.connect(load_config(cfg_path))
    lines = []
    for i in range(12):
        for ip in ("192.0.2.10", "192.0.2.11"):
            d = store.acquire(ip)
            if d.granted:
                store.release(d.lease)
        if i == 3:
            store.record("192.0.2.10", classify(TSS04))  # 2 h × 0.0002 = 1.44 s
        lines += [json.dumps(status_json(s), default=str) for s in store.status()]
        time.sleep(0.2)
    store.close()
    series = read_snapshots(lines)
    assert any(series["192.0.2.10"].cooling) and not any(series["192.0.2.11"].cooling)
    snap = tmp_path / "snap.jsonl"
    snap.write_text("\n".join(lines) + "\n")
    png = tmp_path / "out.png"
    res = CliRunner().invoke(main, ["report", "--png", str(png), str(snap)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_input_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"snap:2: not a `governor status --json` line"):
        read_snapshots(['{"ip": "192.0.2.1", "now": 1, "rate_now": 0, "cooldown_until": 0, "held": false, '
                        '"rate_allowed": 1, "leases": 0, "concurrency": 5}', "garbage"], "snap")
    bad = tmp_path / "empty.jsonl"
    bad.write_text("\n")
    res = CliRunner().invoke(main, ["report", "--png", str(tmp_path / "x.png"), str(bad)])
    assert res.exit_code == 2 and "no status snapshots" in res.output
