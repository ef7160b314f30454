"""Options, help text and main loop of ``governor sim``.

The options live here (not in ``governor/cli/sim_cmd.py``) so that the same command
also runs as ``python -m governor.sim`` without importing the whole ``governor``
CLI — that is what :class:`governor.sim.process.SimProcess` starts.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from governor.sim.server import SimError, Simulator
from governor.sim.settings import (
    DEFAULT_DD_PATTERN,
    DEFAULT_DEFER_PATTERN,
    STAGES,
    Settings,
    SettingsError,
)

D = Settings()  # defaults quoted in the help, so help and code cannot drift apart

SIM_SHORT_HELP = "Run a Yahoo MX simulator on loopback addresses (for tests and benchmarks)."

SIM_HELP = """Run a simulated Yahoo MX pool on loopback addresses.

It accepts and discards mail and answers each sending IP (the peer address of the
connection) the way Yahoo's MX hosts do: per-IP limits on concurrent connections,
messages per minute and messages per connection; TSS04 deferrals with a penalty
memory that escalates to TS02 and TS03 when the sender keeps retrying; TS01 for
cold IPs over their daily budget; dd and [160] replies for chosen recipients. It is
the yardstick of the project's benchmarks and end-to-end tests, so it is strict.
It binds loopback addresses only (127.0.0.0/8, ::1) and runs in the foreground.

All listeners (--listen, repeatable) share ONE per-IP view, like Yahoo's MX pool.
Every setting can also come from a YAML file (--config): a flat mapping whose keys
are the option names with underscores (max_conn: 5, cold_ips: [127.0.0.9], ...);
command-line options override the file, the file overrides the defaults.

\b
REPLIES (the IP in the text is the peer's own, IPv4 or IPv6)
  TSS04  421 4.7.0 [TSS04] Messages from IP temporarily deferred due to
         unexpected volume or user complaints - 4.16.55.1; https://...
  TS01   421 4.7.0 [TS01] Messages from IP temporarily deferred due to user
         complaints - 4.16.55.1; https://...
  TS02   421 4.16.56 [TS02] Messages from IP temporarily deferred due to
         excessive user complaints - 4.16.56.1; https://...
  TS03   421 4.7.1 [TS03] All messages from IP will be permanently deferred;
         Retrying will NOT succeed. See https://...
  max    421 Max message per connection reached, closing transmission channel
  dd     554 delivery error: dd This user doesn't have a DOMAIN account (ADDR)
         [0] - HOSTNAME
  defer  451 Message temporarily deferred - [160]
  Every 421 is followed by closing the connection; 554/451 are per recipient.
  Accepted messages get "250 ok dirdel".

\b
HOW A SENDING IP IS JUDGED
  At connect: a blocked IP gets TS03 instead of the greeting. Otherwise the
  IP's standing is judged once per connection and the verdict is sent at
  --stage: escalated IPs get TS02/TS03; an IP inside its penalty window gets
  TSS04; the connection that makes more than --max-conn open connections
  gets TSS04 (with 5 allowed, the 6th, 7th, ... simultaneous ones).
  At each MAIL FROM of an admitted connection: the (--max-per-conn + 1)-th
  message gets "421 Max message per connection" (not a penalty); a message
  that would exceed --max-rate accepted messages in the sliding --rate-window
  gets TSS04; a cold IP (--cold) whose --cold-window already holds
  --cold-budget messages gets TS01. With --stage rcpt these verdicts are sent
  at the first RCPT TO instead; with --stage connect they are also checked
  before the greeting ("refused to talk to me").

\b
PENALTY AND ESCALATION
  Every TSS04/TS01 and every connection attempt while the IP is in a
  penalty window or escalated counts one violation. A TSS04-type violation
  (re)starts the penalty window of --penalty seconds: retrying into the
  window keeps it closed, waiting it out opens it. The --ts02-after-th
  violation is answered with TS02 and the --ts03-after-th with TS03; both
  stay until "reset-ip IP" on the control socket (Yahoo never downgrades
  by itself). An IP without violations for --violation-reset seconds (4 h,
  the pause the sources say resets Yahoo's counter) counts from zero again.
  Why these defaults (60 s, 20, 50, 4 h): a sender that stops at its first
  TSS04 can have at most --max-conn sessions caught in flight, so one episode
  costs it at most 5 violations and it survives several; a sender that keeps
  connecting through the penalty (an MTA retrying its backlog, default
  Postfix concurrency 20) collects one violation per attempt, is answered
  TS02 from its 20th and TS03 from its 50th, and stays there - the
  TSS04 -> TS02 -> TS03 path the sources describe for blind retrying.

\b
CONTROL PROTOCOL (--control; one command per line, one JSON line back)
  ping | stats | summary | settings | reset | reset-ip IP | set KEY VALUE
  cold IP | warm IP | block IP | unblock IP | limit IP KEY VALUE | unlimit IP
  fault KIND [EVERY] | fault none | dump PATH | help | quit
  "stats" has everything incl. accept timestamps; "summary" omits them.
  "reset" forgets all counters and standings (settings, cold and blocked
  lists stay); "reset-ip" releases one IP (penalty, violations, TS02/TS03)
  and keeps its counters. "set" changes a limit at run time, e.g.
  "set max_rate 300"; "limit IP max_rate 10" gives one IP its own
  max_conn, max_rate or max_per_conn ("unlimit IP" drops them).
  "fault drop-data 3" cuts every 3rd session after its message data, before
  the reply; "garbage-data" / "garbage-greeting" answer a non-SMTP line
  instead of the end-of-DATA reply / the greeting. Faulted messages are not
  counted; "fault none" ends it.
  Example: echo summary | nc -U /run/sim.sock

\b
STATS (JSON; per IP under "ips", summed under "total", sink under "sink")
  connections, accepted, recipients, replies{{TSS04,TS01,TS02,TS03,dd,defer,
  max_per_conn}} (counted as sent), open, concurrency_hwm, first_accept,
  last_accept, accept_times[] (unix seconds), in_rate_window, standing,
  penalty_remaining, violations, cold, blocked; plus listeners{{ADDR: count}}
  and the settings in force.

\b
SHUTDOWN AND EXIT STATUS
  SIGTERM or SIGINT: stop accepting, close idle sessions, let transactions in
  flight finish (new MAIL FROM gets 421 4.3.2), abort what is left after
  --shutdown-timeout, write --stats-file, exit 0. Exit 1 if a listener or the
  control socket cannot be opened, 2 on invalid options or configuration
  (including any non-loopback address).

\b
EXAMPLES
  governor sim --listen 127.0.0.10:2525 --listen 127.0.0.11:2525 \\
      --sink 127.0.0.1:2526 --control /tmp/sim.sock --stats-file sim.json
  governor sim --config sim.yaml --max-rate 10000 --max-conn 100
"""


def _opt(*decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*decls, show_default=False, **kwargs)


#: (decorator, settings key) — in the order they appear in --help.
_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    _opt("--config", "config", metavar="PATH", type=click.Path(dir_okay=False),
         help="YAML file with settings (flat mapping, keys as the option names with "
              "underscores). Options given on the command line override it. [default: none]"),
    _opt("--listen", "listen", metavar="ADDR:PORT", multiple=True,
         help="Simulated Yahoo MX listener; repeat for several MX hosts sharing one per-IP "
              "view. Loopback only: 127.x.y.z:PORT or [::1]:PORT; port 0 lets the kernel "
              f"choose. [default: {D.listen[0]}]"),
    _opt("--sink", "sink", metavar="ADDR:PORT", multiple=True,
         help="Plain sink listener: accepts everything with no limits (for non-Yahoo mail "
              "in benchmarks), counted separately under \"sink\". Repeatable. [default: none]"),
    _opt("--control", "control", metavar="PATH|ADDR:PORT",
         help="Control interface: a unix socket path (contains '/') or a loopback "
              "ADDR:PORT. See CONTROL PROTOCOL. [default: none]"),
    _opt("--stats-file", "stats_file", metavar="PATH",
         help="Write the stats JSON here at exit (and keep 'dump PATH' for on-demand "
              "copies). [default: none]"),
    _opt("--hostname", "hostname", metavar="NAME",
         help=f"Host name in the 220 greeting and in dd replies. [default: {D.hostname}]"),
    _opt("--max-conn", "max_conn", metavar="N", type=int,
         help="Concurrent connections allowed per sending IP; the next one gets TSS04. "
              f"[default: {D.max_conn}]"),
    _opt("--max-rate", "max_rate", metavar="N", type=int,
         help="Accepted messages allowed per sending IP in the sliding --rate-window; "
              f"the next MAIL FROM gets TSS04. [default: {D.max_rate}]"),
    _opt("--rate-window", "rate_window", metavar="SECONDS", type=float,
         help=f"Length of the sliding rate window. [default: {D.rate_window:g}]"),
    _opt("--max-per-conn", "max_per_conn", metavar="N", type=int,
         help="Messages accepted per connection; the next MAIL FROM gets '421 Max message "
              f"per connection reached' and the connection is closed. [default: {D.max_per_conn}]"),
    _opt("--stage", "stage", type=click.Choice(STAGES),
         help="Where IP verdicts (TSS04/TS01/TS02/TS03) are sent: instead of the greeting, "
              f"at MAIL FROM, or at the first RCPT TO. [default: {D.stage}]"),
    _opt("--penalty", "penalty", metavar="SECONDS", type=float,
         help="Penalty window after a TSS04: new connections from the IP get TSS04 and each "
              f"attempt restarts the window. 0 disables the memory. [default: {D.penalty:g}]"),
    _opt("--ts02-after", "ts02_after", metavar="N", type=int,
         help=f"The N-th violation escalates the IP to TS02 (sticky). [default: {D.ts02_after}]"),
    _opt("--ts03-after", "ts03_after", metavar="N", type=int,
         help="The N-th violation escalates the IP to TS03 (sticky; must be >= "
              f"--ts02-after). [default: {D.ts03_after}]"),
    _opt("--violation-reset", "violation_reset", metavar="SECONDS", type=float,
         help="A non-escalated IP without violations for this long counts from zero again. "
              f"[default: {D.violation_reset:g} (4 h)]"),
    _opt("--cold", "cold_ips", metavar="IP", multiple=True,
         help="Treat IP as cold (no history): TS01 once its budget is spent. Repeatable. "
              "[default: none]"),
    _opt("--cold-budget", "cold_budget", metavar="N", type=int,
         help=f"Messages a cold IP may deliver per --cold-window. [default: {D.cold_budget}]"),
    _opt("--cold-window", "cold_window", metavar="SECONDS", type=float,
         help=f"Sliding window of the cold budget. [default: {D.cold_window:g} (a day)]"),
    _opt("--block", "blocked_ips", metavar="IP", multiple=True,
         help="Blocked IP: TS03 instead of the greeting. Repeatable. [default: none]"),
    _opt("--dd-pattern", "dd_pattern", metavar="REGEX",
         help="Recipients matching this case-insensitive regex (searched in the whole "
              "address) get 554 dd at RCPT TO; '' disables. "
              f"[default: {DEFAULT_DD_PATTERN}]"),
    _opt("--defer-pattern", "defer_pattern", metavar="REGEX",
         help="Recipients matching this regex get '451 Message temporarily deferred - [160]' "
              f"at RCPT TO; '' disables. [default: {DEFAULT_DEFER_PATTERN}]"),
    _opt("--idle-timeout", "idle_timeout", metavar="SECONDS", type=float,
         help=f"Close a session idle this long. [default: {D.idle_timeout:g}]"),
    _opt("--shutdown-timeout", "shutdown_timeout", metavar="SECONDS", type=float,
         help="On SIGTERM/SIGINT, abort sessions still open after this long. "
              f"[default: {D.shutdown_timeout:g}]"),
    click.option("-v", "--verbose", count=True,
                 help="-v logs every IP verdict (TSS04/TS0x) to stderr, -vv also aiosmtpd's "
                      "session log. [default: warnings only]"),
]


def sim_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every ``governor sim`` option to ``func`` (keeps --help order)."""
    for decorator in reversed(_OPTIONS):
        func = decorator(func)
    return func


def build_settings(options: dict[str, Any]) -> Settings:
    """Defaults ← YAML file ← command-line options; raises SettingsError."""
    options = dict(options)
    options.pop("verbose", None)
    config = options.pop("config", None)
    settings = Settings.from_yaml(config) if config else Settings()
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    return Settings.from_mapping(given, settings)


def run_command(options: dict[str, Any]) -> None:
    """Body of the click command: validate, run, exit with the documented status."""
    _setup_logging(int(options.get("verbose") or 0))
    try:
        settings = build_settings(options)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        code = asyncio.run(serve(settings))
    except SimError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


async def serve(settings: Settings, ready: Callable[[Simulator], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down within bounds and write the stats file."""
    sim = Simulator(settings)
    await sim.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    (ready or _announce)(sim)
    await stop.wait()
    logging.getLogger("governor.sim").info("shutting down")
    await sim.stop()
    if settings.stats_file:
        try:
            sim.dump(settings.stats_file)
        except OSError as exc:
            raise SimError(f"cannot write stats file {settings.stats_file}: {exc.strerror or exc}") from None
    return 0


def _announce(sim: Simulator) -> None:
    parts = ["governor sim: listening on " + " ".join(map(str, sim.addresses)) if sim.addresses else
             "governor sim: no Yahoo listener"]
    if sim.sink_addresses:
        parts.append("sink " + " ".join(map(str, sim.sink_addresses)))
    if sim.control_address:
        parts.append(f"control {sim.control_address}")
    print("; ".join(parts), flush=True)


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("governor.sim").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.INFO if verbose > 1 else logging.WARNING)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("sim", help=SIM_HELP, short_help=SIM_SHORT_HELP, context_settings=CONTEXT_SETTINGS)
@sim_options
def standalone(**options: Any) -> None:
    run_command(options)
