"""The README's first command runs end to end (shortened): real Postfix, blind then governed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from governor.demo import postfix_lab_problem

PROBLEM = postfix_lab_problem()
LAUNCH = ("import governor.cli.postfix_cmds, governor.cli.serve_cmd\n"
          "from governor.cli import main\nmain(prog_name='governor')")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
def test_demo_delivers_everything_and_shows_the_contrast() -> None:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "demo", "--messages", "200", "--blind-seconds", "5"],
                          capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "160", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "200/200 delivered" in out and "0 not delivered" in out
    assert "160/160 Yahoo, 40/40 other" in out
    assert "blind: Debian defaults, 4 IPs" in out and "governed: 4 IPs, 2 incidents" in out
    assert "Yahoo throttles 127.0.0.3 (TSS04)" in out
    assert "held /" in out and "time vs ideal" in out
