"""``governor sim``: the Yahoo MX simulator (options and behaviour in governor.sim.cli)."""
from __future__ import annotations

from typing import Any

from governor.cli import main
from governor.sim.cli import SIM_HELP, SIM_SHORT_HELP, run_command, sim_options


@main.command("sim", help=SIM_HELP, short_help=SIM_SHORT_HELP)
@sim_options
def sim(**options: Any) -> None:
    run_command(options)
