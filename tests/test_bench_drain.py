"""bench/drain.py runs end to end (smoke scenario, small workload) and writes its JSON.

Checks the shape and the invariants only — every contender loses nothing, the governed
ones provoke no TS02/TS03 — never the speed (that is what the benchmark itself reports).
The workload is 400 messages with a 45 s limit per contender so that all five
contenders fit in a few minutes on a small machine; ``--quick`` (1000 messages) takes
about ten.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from governor.lab.contenders import NAMES, problem

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = [p for p in (problem(n) for n in NAMES) if p]

pytestmark = [pytest.mark.slow, pytest.mark.e2e,
              pytest.mark.skipif(bool(PROBLEMS), reason=PROBLEMS[0] if PROBLEMS else "")]

KEYS = {"ratio_to_ideal", "tss04", "ts02", "ts03", "lost", "non_yahoo_drain_s", "yahoo_drain_s", "bounced",
        "still_queued", "max_concurrency_per_ip", "replies", "curve"}


def test_drain_smoke_writes_results_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "drain.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "drain.py"), "--quick", "--scenario", "smoke",
                           "--messages", "400", "--time-limit", "45", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert data["scenario"] == "smoke" and data["messages"] == 400 and data["ideal_s"] > 0
    assert set(data["contenders"]) == set(NAMES)
    for name, m in data["contenders"].items():
        assert KEYS <= set(m), (name, KEYS - set(m))
        assert "error" not in m, (name, m.get("error"))
        assert m["lost"] == 0, (name, m)
        assert m["injected"] == 400, (name, m["injected"])
    for name in ("postfix_governor", "exim_governor"):
        m = data["contenders"][name]
        assert m["ts02"] == 0 and m["ts03"] == 0, (name, m["replies"])
        assert m["delivered_yahoo"] + m["delivered_other"] == 400, (name, m)


def test_unknown_contender_is_bad_usage() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "drain.py"), "--contenders", "sendmail"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "unknown contender" in proc.stderr
