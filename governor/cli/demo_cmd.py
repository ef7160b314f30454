"""governor demo: the README's first command."""
from __future__ import annotations

import click

from governor.cli import main


@main.command("demo")
@click.option("--messages", default=400, show_default=True, type=click.IntRange(20, 100000),
              help="Messages the governed sender delivers.")
@click.option("--rate", default=280.0, show_default=True, type=click.FloatRange(1, 10000),
              help="Messages per minute per egress IP the governor allows.")
@click.option("--sim-rate", default=300, show_default=True, type=click.IntRange(1, 100000),
              help="Messages per minute per IP the simulated Yahoo tolerates.")
def demo(messages: int, rate: float, sim_rate: int) -> None:
    """Show the governor at work against a simulated Yahoo, on loopback only.

    Starts a private redis-server and the Yahoo MX simulator, then sends real
    SMTP from 127.0.0.x addresses: first blindly (like an ungoverned MTA, which
    the simulator escalates to TS02/TS03), then through the governor's shared
    store over four egress IPs, one of which "Yahoo" blocks midway. Ends with a
    summary table and removes everything it started. Exit status 0 when every
    governed message was delivered.
    """
    from governor.demo import Options, run

    raise SystemExit(run(Options(messages=messages, rate=rate, sim_rate=sim_rate)))
