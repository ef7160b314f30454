"""Postfix commands: ``governor milter``, ``governor postfix-config``, ``governor queue-agent``.

Also runnable without the ``governor`` entry point (for tests and service files that
pin one module): ``python -m governor.cli.postfix_cmds milter --config X``.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import signal
import sys
import threading
from typing import Any

import click

from governor.cli import main
from governor.cli.common import EXIT_FAIL, EXIT_USAGE, config_from, emit_json, fail
from governor.config import Config


# --------------------------------------------------------------------------- shared
def setup_logging(cfg: Config, verbose: bool = False) -> None:
    """key=value lines to syslog and/or stderr (governor.logsetup, from config.logging)."""
    from governor import logsetup

    logsetup.setup(cfg.logging, level="debug" if verbose else None)
    atexit.register(logsetup.shutdown)


def connect_store(cfg: Config) -> Any:
    """A Store; it connects lazily, so a Redis that is down at start is the
    ``redis_down`` case, not a startup failure."""
    from governor.store import Store

    try:
        return Store.connect(cfg)
    except NotImplementedError as exc:
        fail(str(exc), EXIT_USAGE)


def serve_metrics(listen: str | None, store: Any) -> None:
    """Prometheus /metrics for this process when asked: --metrics-listen, else
    metrics.milter_listen / metrics.queue_agent_listen (each process needs its own port;
    ``governor serve`` owns metrics.listen). A port that is taken is a startup failure."""
    if listen:
        import logging

        from governor import metrics
        from governor.logsetup import kv

        try:
            port = metrics.serve(listen, store.status)
        except OSError as exc:
            fail(f"metrics on {listen}: {exc}", EXIT_FAIL)
        logging.getLogger("governor.metrics").info(kv(event="metrics", listen=f"{listen.rpartition(':')[0]}:{port}"))


METRICS_OPTION = click.option(
    "--metrics-listen", metavar="HOST:PORT", default=None,
    help="Serve Prometheus /metrics here (port 0: any free port, logged) instead of "
         "metrics.milter_listen / metrics.queue_agent_listen (both off by default).")


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


# --------------------------------------------------------------------------- milter
@main.command("milter")
@click.option("--socket", "socket_spec", metavar="SPEC", default=None,
              help="Listen here instead of sockets.milter: unix:/path or inet:127.0.0.1:PORT.")
@click.option("--timeout", default=600, show_default=True, type=click.IntRange(1, 86400),
              help="Seconds libmilter waits for Postfix before dropping an idle connection.")
@METRICS_OPTION
@click.option("-v", "--verbose", is_flag=True, help="Log every decision (debug level).")
@click.pass_context
def milter_cmd(ctx: click.Context, socket_spec: str | None, timeout: int, metrics_listen: str | None,
               verbose: bool) -> None:
    """Run the Postfix milter (smtpd_milters) until SIGTERM/SIGINT.

    For each RCPT to a Yahoo-managed domain it asks the store whether any egress IP
    may send to Yahoo (cached 0.5 s per process). While one may, mail continues:
    routing and pacing happen later, in the transport map and the slot transports.
    When none may (all cooling, held or paused):

    \b
      holds.action: hold      all-Yahoo messages go to Postfix's hold queue at end of
                              message and are recorded in the holds registry (queue id
                              macro i); mixed messages are accepted and flow, their
                              Yahoo recipients are deferred later by the transport map
      holds.action: tempfail  451 4.7.1 for each Yahoo recipient; others are accepted

    It never rejects or discards. When Redis cannot be reached: redis_down:
    fail-open continues, fail-closed answers 451 4.7.1 for Yahoo recipients. The
    socket is created owner-only (umask 0177), then given sockets.mode/owner/group; its
    directory is created setgid to sockets.group when missing. Postfix settings:
    `governor postfix-config`. Exit status 0 after a clean stop, 1 when the socket
    cannot be opened, 2 for a bad configuration.
    """
    from governor.adapters import milter

    milter.block_stop_signals()  # before any thread: libmilter's own thread must get SIGTERM
    cfg = config_from(ctx)
    setup_logging(cfg, verbose)
    store = connect_store(cfg)
    serve_metrics(metrics_listen or cfg.metrics.milter_listen, store)
    try:
        policy = milter.run(cfg, store, socket_spec or cfg.sockets.milter, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - libmilter raises milter.error for socket problems
        fail(f"milter on {socket_spec or cfg.sockets.milter}: {exc}", EXIT_FAIL)
    click.echo(" ".join(f"{k}={v}" for k, v in sorted(policy.counts.items())) or "no recipients seen", err=True)


# --------------------------------------------------------------------------- postfix-config
@main.command("postfix-config")
@click.option("--apply", "do_apply", is_flag=True,
              help="Change main.cf/master.cf with postconf instead of printing the lines.")
@click.option("--config-directory", metavar="DIR", default=None,
              help="Postfix configuration directory to read (and with --apply, change). "
                   "Default: postfix.config_directory with --apply, none otherwise.")
@click.option("--dry-run", is_flag=True, help="With --apply: print the postconf commands, change nothing.")
@click.option("--chroot", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Whether smtpd runs chrooted (then the milter socket path is given relative to "
                   "queue_directory); auto reads master.cf.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as one JSON object.")
@click.pass_context
def postfix_config(ctx: click.Context, do_apply: bool, config_directory: str | None, dry_run: bool,
                   chroot: str, as_json: bool) -> None:
    """Print (or apply) the Postfix settings for the configured egress pool.

    \b
    main.cf:   <slot>_transport_rate_delay for every slot transport (qmgr reads it
               only from main.cf), connection_cache_ttl_limit, and smtpd_milters
               with default_action (accept for fail-open, tempfail for
               fail-closed) and short milter timeouts.
    master.cf: qmgr gets -o rewrite_service_name=gov-rewrite; gov-rewrite is a
               trivial-rewrite whose transport_maps start with the governor's
               socketmap (so smtpd never asks it); per egress IP,
               slot_plan(concurrency, messages_per_minute) slot transports
               <name>-s<N>: smtp clones with maxproc 1, bound to the IP, feeding
               every delivery status to socketmap ...:status-<name>, caching
               their connection across the rate delay, and reusing it for
               messages_per_connection messages.

    Existing transport_maps and smtpd_milters are kept (ours is added); slot
    services of an earlier run that the pool no longer has are removed. Run
    `postfix reload` after --apply. Why each line is there: docs/postfix.md.
    Exit status 0 on success, 1 when postconf fails, 2 for a bad configuration.
    """
    cfg = config_from(ctx)
    from governor import postfix_setup as ps

    directory = config_directory or (cfg.postfix.config_directory if do_apply else None)
    try:
        pdir = ps.PostfixDir(directory, cfg.postfix.command_directory) if directory else None
        plan = ps.plan_for(cfg, pdir, chroot)
        if not do_apply:
            emit_json(ps.as_json(plan)) if as_json else click.echo(ps.render(plan), nl=False)
            return
        assert pdir is not None
        commands = ps.apply(plan, pdir, cfg, dry_run=dry_run)
    except ps.SetupError as exc:
        fail(str(exc), EXIT_USAGE if "pool" in str(exc) or "chroot" in str(exc) else EXIT_FAIL)
    if as_json:
        emit_json({"applied": not dry_run, "config_directory": directory, "commands": commands})
    elif dry_run:
        import shlex

        click.echo("\n".join(shlex.join(c) for c in commands))
    else:
        click.echo(f"{directory}: {len(plan.master) - 1} slot transports, gov-rewrite, milter and rate delays "
                   f"set ({len(commands)} postconf commands); now run: postfix -c {directory} reload")


# --------------------------------------------------------------------------- queue-agent
def queue_backend(cfg: Config, mta: str) -> Any:
    """The QueueBackend for ``mta``; Exim's module is imported only when asked for."""
    if mta == "postfix":
        from governor.adapters.postfix_queue import PostfixQueue

        return PostfixQueue(cfg.postfix.config_directory, cfg.postfix.command_directory)
    try:
        exim_queue = importlib.import_module("governor.adapters.exim_queue")
    except ImportError as exc:
        fail(f"--mta exim: governor.adapters.exim_queue is not available ({exc})", EXIT_FAIL)
    return exim_queue.EximQueue.from_config(cfg)


@main.command("queue-agent")
@click.option("--mta", type=click.Choice(["postfix", "exim"]), default="postfix", show_default=True,
              help="Which MTA's queue to manage.")
@click.option("--once", is_flag=True, help="One step (scan, hold, release), print what it did, exit.")
@click.option("--duration", type=click.FloatRange(0.1), default=None, metavar="SECONDS",
              help="Stop after this long (default: run until SIGTERM/SIGINT).")
@click.option("--follow-maillog", metavar="PATH", default=None,
              help="Also follow Postfix's mail log for delivery feedback (fallback when "
                   "smtp_delivery_status_filter is not configured; never both).")
@click.option("--json", "as_json", is_flag=True, help="Print the report/counters as JSON.")
@METRICS_OPTION
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def queue_agent(ctx: click.Context, mta: str, once: bool, duration: float | None, follow_maillog: str | None,
                as_json: bool, metrics_listen: str | None, verbose: bool) -> None:
    """Hold Yahoo mail that must not go out now; release it paced when it may.

    Every 0.25 s it reads the store. When an egress IP starts a cooldown or hold
    whose reaction says hold_queue, queued messages whose Yahoo recipients were
    assigned to that IP (or that Yahoo deferred from it) are put on hold
    (Postfix: postsuper -h; it stops active-queue mail at once) and recorded in
    the store's holds registry. When no IP may send, mail the transport map
    deferred with retry: is held too. Held mail is released as soon as some IP
    may send: one store token per message (the per-IP rate of the IPs that may
    send, slower while one ramps back; at most holds.release_rate/min when set),
    postsuper -H and postqueue -i per message. Holds that reach arrival +
    holds.queue_lifetime - holds.release_margin are released whatever the budget,
    with a warning. Without Redis it holds and releases nothing.

    Exit status 0 after a clean stop (or a --once step that worked), 1 when the
    store or the MTA command failed in --once, 2 for bad usage or configuration.
    """
    cfg = config_from(ctx)
    setup_logging(cfg, verbose)
    from governor.adapters.queue_agent import QueueAgent

    store = connect_store(cfg)
    agent = QueueAgent(cfg, store, queue_backend(cfg, mta))
    if once:
        report = agent.step()
        out = dataclasses.asdict(report)
        emit_json(out) if as_json else click.echo(" ".join(f"{k}={v}" for k, v in out.items()))
        sys.exit(EXIT_FAIL if report.error else 0)
    serve_metrics(metrics_listen or cfg.metrics.queue_agent_listen, store)
    stop = stop_on_signals()
    if follow_maillog:
        from governor.adapters.postfix_log import follow_in_thread
        from governor.postfix_setup import service_ips

        follow_in_thread(follow_maillog, service_ips(cfg), store, stop)
    agent.run(stop, max_seconds=duration)
    stop.set()
    counts = dict(sorted(agent.counts.items()))
    click.echo(json.dumps(counts) if as_json else " ".join(f"{k}={v}" for k, v in counts.items()), err=not as_json)


if __name__ == "__main__":
    main()
