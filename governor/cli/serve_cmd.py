"""governor serve: run the MTA-facing daemon (Exim line protocol + Postfix socketmap)."""
from __future__ import annotations

import click

from governor.cli import main
from governor.cli.common import config_from


@main.command("serve")
@click.option("-c", "--config", "config_path", metavar="PATH", default=None,
              help="Configuration file (overrides the global --config / GOVERNOR_CONFIG).")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay attached to the terminal instead of detaching (systemd Type=simple, runit, "
                   "containers, debugging).")
@click.option("--pidfile", metavar="PATH", type=click.Path(dir_okay=False), default=None,
              help="Write the daemon's PID here once it listens; removed at exit.")
@click.option("--log-level", type=click.Choice(["debug", "info", "notice", "warning", "error"]), default=None,
              help="Override logging.level (debug logs one line per decision).")
@click.option("--stderr/--no-stderr", "stderr", default=None,
              help="Also log to stderr (default: logging.stderr; stderr is used anyway when there is no "
                   "syslog socket).")
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, foreground: bool, pidfile: str | None,
          log_level: str | None, stderr: bool | None) -> None:
    """Serve the governor to Postfix and Exim on local sockets.

    One asyncio process answers both MTAs from the shared Redis store:

    \b
    sockets.exim       Exim line protocol for ${readsocket}: one request line
                       in, one reply line out, then close. Requests:
                         acquire <domain> <ip|auto> <msgid|-> <rcpt|->
                         release <lease>
                         report <ip|lease|-> <domain|-> <event> <msgid|-> <rcpt|-> <text>
                         held <domain>
                       Replies start with OK, DEFER or ERR.
    sockets.socketmap  Postfix socketmap (netstrings), maps:
                         transport          transport_maps: governed recipients get
                                            a slot transport of an IP that may send
                         status-<egress>    smtp_delivery_status_filter: Yahoo's
                                            replies drive cooldowns; always NOTFOUND

    Sockets are created with sockets.mode and sockets.owner/group before they
    accept connections; a stale socket file is replaced, a live one is refused.
    Requests are bounded (2048-byte Exim lines, 100000-byte netstrings, 5 s to
    send a request). When Redis is unreachable the answers follow redis_down
    (fail-open: mail flows through the pool round robin; fail-closed: Yahoo mail
    is deferred) and the daemon reconnects by itself.

    Logs go to syslog (logging.facility, ident with PID) as key=value lines:
    one per feedback event at info, one per decision at debug.

    \b
    Signals:
      SIGTERM, SIGINT  stop accepting, finish in-flight requests (at most 5 s),
                       remove the socket files, exit 0
      SIGHUP           logged; the configuration is read at start only

    \b
    Exit status:
      0  stopped by a signal
      1  could not start (socket in use, unknown owner/group, path too long, ...)
      2  invalid configuration

    \b
    Examples:
      governor serve --foreground --log-level debug
      governor serve -c /etc/yahoo-governor/governor.yaml --pidfile /run/yahoo-governor/serve.pid

    The protocols, with Exim and Postfix configuration, are in docs/protocols.md.
    """
    from governor.daemon import serve as run

    root = ctx.find_root()
    if config_path is not None:
        root.ensure_object(dict)["config_path"] = config_path
        root.obj.pop("config", None)
    cfg = config_from(ctx)
    raise SystemExit(run(cfg, foreground=foreground, pidfile=pidfile, stderr=stderr, log_level=log_level))
