"""``python -m governor.sim`` — the same command as ``governor sim``."""
from __future__ import annotations

from governor.sim.cli import standalone

if __name__ == "__main__":
    standalone(prog_name="governor sim")
