"""Yahoo MX simulator (``governor sim``): the yardstick of the benchmarks and e2e tests.

An aiosmtpd server on loopback addresses that accepts and discards mail and treats
every sending IP the way Yahoo's MX pool does: per-IP limits on concurrency (5),
rate (100 accepted messages per sliding 60 s) and messages per connection (20);
TSS04 with a penalty memory (60 s, restarted by every attempt inside it) that
escalates to TS02 at the 20th and TS03 at the 50th violation (sticky until
``reset-ip``; a 4 h clean pause forgets the count); TS01 for cold IPs past their
500/day budget; 554 dd and 451 [160] for recipients matching patterns; TS03 at
connect for blocked IPs. Why those defaults: a sender that stops at its first TSS04
can be caught with at most ``max_conn`` sessions in flight, so one episode costs
≤ 5 violations and a governed sender survives several; an MTA that retries blindly
(Postfix opens new connections right away, queue runs every few minutes) piles up
a violation per attempt and reaches TS02 within minutes, TS03 soon after — the
escalation the sources describe (seeds 001-004). See ``governor sim --help``.

API::

    sim = Simulator(Settings(...)); await sim.start(); sim.stats(); await sim.stop()
    with SimThread(settings) as sim: ...     # background thread, sync helpers
    with SimProcess(settings) as sim: ...    # child process + control socket
"""
from __future__ import annotations

from governor.sim.process import SimProcess, SimThread, ephemeral_settings
from governor.sim.replies import Reply
from governor.sim.server import SimError, Simulator
from governor.sim.settings import Endpoint, Settings, SettingsError
from governor.sim.state import SimState

__all__ = [
    "Endpoint", "Reply", "Settings", "SettingsError", "SimError", "SimProcess", "SimState",
    "SimThread", "Simulator", "ephemeral_settings",
]
