"""The README's first command runs end to end (shortened)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOVERNOR = Path(sys.executable).parent / "governor"


@pytest.mark.slow
def test_demo_delivers_everything_and_shows_the_contrast() -> None:
    proc = subprocess.run([str(GOVERNOR), "demo", "--messages", "80"], capture_output=True, text=True,
                          timeout=180, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "80/80 delivered" in out and "0 not delivered" in out
    assert "HELD (TS03)" in out            # the blocked IP is held, traffic failed over
    assert "blind, 8 conns from 1 IP" in out
