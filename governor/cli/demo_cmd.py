"""governor demo: the README's first command."""
from __future__ import annotations

import click

from governor.cli import main


@main.command("demo")
@click.option("--messages", default=2000, show_default=True, type=click.IntRange(20, 100000),
              help="Messages the governed Postfix delivers (Yahoo recipients mixed with other domains).")
@click.option("--rate", default=300.0, show_default=True, type=click.FloatRange(1, 10000),
              help="Messages per minute per egress IP the governor allows.")
@click.option("--sim-rate", default=300, show_default=True, type=click.IntRange(1, 100000),
              help="Messages per minute per IP the simulated Yahoo tolerates.")
@click.option("--blind-seconds", default=10.0, show_default=True, type=click.FloatRange(1, 600),
              help="How long Postfix without the governor is watched first.")
@click.option("--no-incidents", is_flag=True,
              help="Do not throttle one IP (TSS04) and block another (TS03) midway.")
def demo(messages: int, rate: float, sim_rate: int, blind_seconds: float, no_incidents: bool) -> None:
    """Show the governor at work: real Postfix against a simulated Yahoo, on loopback only.

    Starts a private redis-server, the Yahoo MX simulator (127.0.0.1) and a private
    Postfix with four egress IPs, 127.0.0.2-127.0.0.5. First Postfix runs as
    installed (Debian's default concurrency, no governor) and the simulator answers
    with a storm of TSS04. Then the same Postfix is configured by `governor
    postfix-config --apply` and runs with `governor serve`, `governor milter` and
    `governor queue-agent`: MESSAGES messages (80 % to Yahoo domains) drain at the
    pace Yahoo tolerates while one IP is throttled (it cools down, its queued mail is
    held and re-routed, it ramps back) and another is blocked (held until an admin
    releases it, traffic fails over). Progress every 2 s; a summary at the end
    (delivered, deferrals by code, held/released, time vs ideal). Everything it
    started is stopped and removed. Needs root and Postfix (scripts/setup.sh).
    Exit status 0 when every message was delivered, 1 otherwise.
    """
    from governor.demo import Options, run

    raise SystemExit(run(Options(messages=messages, rate=rate, sim_rate=sim_rate, blind_seconds=blind_seconds,
                                 events=not no_incidents)))
