"""Operator commands over the shared store: see what is happening, and act safely.

status, show ip, holds, audit (read); pause, resume, release-ip, reset-level
(act — each recorded in the audit stream with who and why, and mirrored to syslog as
one ``action=... by=...`` line). Output is one table for people, ``--json`` (JSON
Lines, one object per row) for scripts.
"""
from __future__ import annotations

import dataclasses
import getpass
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click
import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from governor import logsetup
from governor.cli import main
from governor.cli.common import EXIT_FAIL, config_from, emit_json, fail
from governor.policy import LEVEL_NAMES
from governor.store import Store
from governor.store.model import AuditEntry, IpStatus
from governor.yamlnode import format_duration, parse_duration


# --------------------------------------------------------------------------- plumbing
@contextmanager
def store_for(ctx: click.Context) -> Iterator[Store]:
    """A Store on the configured Redis; unreachable Redis → one clear line, exit 1."""
    cfg = config_from(ctx)
    try:
        store = Store.connect(cfg)
    except (redis.RedisError, OSError) as exc:
        fail(f"cannot reach Redis at {cfg.redis.display}: {exc}", EXIT_FAIL)
    try:
        yield store
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"Redis at {cfg.redis.display} did not answer: {exc}", EXIT_FAIL)
    finally:
        store.close()


def operator() -> str:
    """The Unix user acting: the sudo user if any (syslog adds the host itself)."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def who() -> str:
    """The operator, as the audit stream records it: the user and the host."""
    return f"{operator()}@{socket.gethostname()}"


@contextmanager
def audit_log(ctx: click.Context) -> Iterator[None]:
    """Syslog (config ``logging``) for the audit lines of one admin command: never to
    the terminal, flushed before the command returns. Logging a caller already set up
    (a program running the command in-process) is used as it is."""
    if logsetup.active():
        yield
        return
    cfg = config_from(ctx)
    logsetup.setup(cfg.logging, stderr=False, fallback=False)
    try:
        yield
    finally:
        logsetup.shutdown()


def audit_line(ctx: click.Context, action: str, **fields: object) -> None:
    """One ``action=... by=<user> ...`` syslog line for an admin action already in the store."""
    with audit_log(ctx):
        logsetup.audit(action, **fields)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def ip_or_provider(value: str, *, provider_ok: bool = True) -> str:
    if provider_ok and value == "provider":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        what = 'an IP address or "provider"' if provider_ok else "an IP address"
        raise click.BadParameter(f"expected {what}, got {value!r}") from None


def _ip_arg(provider_ok: bool):
    def convert(ctx: click.Context, param: click.Parameter, value: str) -> str:
        return ip_or_provider(value, provider_ok=provider_ok)
    return convert


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than zero")
    return seconds


def _left(until: float, now: float) -> str:
    return format_duration(until - now) if until > now else ""


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts > 0 else "-"


# --------------------------------------------------------------------------- status
def ip_state_text(s: IpStatus) -> str:
    """One phrase: held, cooling, paused, ramping, or ok."""
    if s.held:
        return f"HELD {s.held_reason} (admin release)"
    if s.provider_paused_until > s.now:
        return f"provider paused {_left(s.provider_paused_until, s.now)} ({s.provider_pause_reason})"
    if s.cooldown_until > s.now:
        return f"cooling {s.cooldown_reason} {_left(s.cooldown_until, s.now)}"
    if not s.enabled:
        return "disabled"
    if s.rate_factor < 1:
        return f"ramping back {s.rate_factor:.0%}"
    return "ok"


def status_table(rows: list[IpStatus]) -> Table:
    open_ips = sum(1 for s in rows if not s.held and not s.cooling and s.enabled)
    title = f"Yahoo: {open_ips}/{len(rows)} egress IPs may send"
    table = Table(title=title, title_justify="left")
    for col, just in (("egress IP", "left"), ("name", "left"), ("leases", "right"), ("rate/min", "right"),
                      ("state", "left"), ("cause", "left"), ("level", "left"), ("deferrals", "right"),
                      ("complaints", "right"), ("held msgs", "right")):
        table.add_column(col, justify=just)
    for s in rows:
        cause = s.held_reply or s.cooldown_reply if (s.held or s.cooldown_until > s.now) else ""
        table.add_row(
            s.ip, s.name, f"{s.leases}/{s.concurrency}", f"{s.rate_now}/{s.rate_allowed:g}", ip_state_text(s),
            (cause[:60] + "…") if len(cause) > 61 else cause, LEVEL_NAMES.get(s.level, str(s.level)),
            str(s.deferrals), str(s.complaints), str(s.holds),
        )
    return table


def status_json(s: IpStatus) -> dict:
    d = dataclasses.asdict(s)
    d["state"] = ip_state_text(s)
    d["level_name"] = LEVEL_NAMES.get(s.level, str(s.level))
    return d


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per egress IP (JSON Lines).")
@click.option("--watch", is_flag=True, help="Refresh the table in place until interrupted.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2, 3600),
              help="Seconds between refreshes with --watch.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float) -> None:
    """Show every egress IP: leases, rate, cooldown, level, deferrals, held mail.

    The title line says how many IPs may send to Yahoo right now. An IP is
    "cooling" after a deferral (with the reply that caused it and the time left),
    "HELD" after a block until an admin runs `governor release-ip`, "ramping back"
    while its rate recovers after a cooldown. `--json --watch` streams snapshots
    that `governor report --png` turns into a picture.
    """
    with store_for(ctx) as store:
        if as_json:
            _status_lines(store, watch, interval)
            return
        console = Console()
        if not watch:
            console.print(status_table(store.status()))
            return
        with Live(status_table(store.status()), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(status_table(store.status()), refresh=True)
            except KeyboardInterrupt:
                pass


def _status_lines(store: Store, watch: bool, interval: float) -> None:
    """JSON Lines, once or every ``interval`` (a stream `governor report` can draw)."""
    try:
        while True:
            for row in store.status():
                emit_json(status_json(row))
            if not watch:
                return
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


@main.group("show")
def show() -> None:
    """Show one object in detail."""


@show.command("ip")
@click.argument("ip", callback=_ip_arg(False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (status, holds, recent audit).")
@click.option("--audit", "audit_count", default=20, show_default=True, type=click.IntRange(0, 10000),
              help="Recent audit entries to show.")
@click.pass_context
def show_ip(ctx: click.Context, ip: str, as_json: bool, audit_count: int) -> None:
    """Everything about one egress IP: limits, state, last limit, audit trail."""
    with store_for(ctx) as store:
        row = next((s for s in store.status() if s.ip == ip), None)
        if row is None:
            fail(f"{ip} is not in the configured pool", 2)
        trail = [e for e in store.audit(count=max(audit_count * 10, 100)) if e.ip == ip][-audit_count:]
        holds = store.holds(ip)
    if as_json:
        emit_json({"status": status_json(row), "holds": [dataclasses.asdict(h) for h in holds],
                   "audit": [dataclasses.asdict(e) for e in trail]})
        return
    lines = [
        ("state", ip_state_text(row)), ("leases", f"{row.leases} of {row.concurrency}"),
        ("rate", f"{row.rate_now} in the last minute, {row.rate_allowed:g}/min allowed (factor {row.rate_factor:.2f})"),
        ("cooldown", f"{row.cooldown_reason} until {_when(row.cooldown_until)} — {row.cooldown_reply}"
         if row.cooldown_until > row.now else "-"),
        ("held", f"{row.held_reason} since {_when(row.held_since)} — {row.held_reply}" if row.held else "no"),
        ("level", f"{row.level} ({LEVEL_NAMES.get(row.level, row.level)}); only `governor reset-level` lowers it"),
        ("last limit", f"{row.last_limit or '-'} at {_when(row.last_limit_at)}; budget back "
         + ("only by admin" if row.budget_at < 0 else _when(row.budget_at))),
        ("per connection", str(row.per_connection)),
        ("warm-up", "-" if row.warmup_cap is None else f"{row.warmup_used} of {row.warmup_cap} today"),
        ("deferrals", f"{row.deferrals} (complaint signals {row.complaints}) in the window"),
        ("held messages", str(len(holds))),
    ]
    console = Console()
    console.print(f"[bold]{row.ip}[/] ({row.name})")
    for key, value in lines:
        console.print(f"  {key + ':':<16}{value}")
    console.print(audit_table(trail, title="recent audit"))


# --------------------------------------------------------------------------- holds / audit
@main.command("holds")
@click.option("--ip", callback=lambda c, p, v: v and ip_or_provider(v, provider_ok=False),
              help="Only mail held for this egress IP.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per held message (JSON Lines).")
@click.pass_context
def holds_cmd(ctx: click.Context, ip: str | None, as_json: bool) -> None:
    """Mail the MTAs parked in their hold queue for the governor, oldest first.

    "release before" is when the queue agent releases a message whatever the
    budget (arrival + holds.queue_lifetime - holds.release_margin). To release
    earlier, paced: `governor release`.
    """
    cfg = config_from(ctx)
    with store_for(ctx) as store:
        rows = sorted(store.holds(ip), key=lambda h: h.since)
        now = store.now()
    if as_json:
        for h in rows:
            emit_json(dataclasses.asdict(h) | {"deadline": h.since + cfg.holds.queue_lifetime
                                               - cfg.holds.release_margin})
        return
    table = Table(title=f"{len(rows)} held messages", title_justify="left")
    for col in ("queue id", "MTA", "IP", "reason", "age", "release before"):
        table.add_column(col)
    for h in rows:
        deadline = h.since + cfg.holds.queue_lifetime - cfg.holds.release_margin
        table.add_row(h.queue_id, h.mta, h.ip, h.reason, format_duration(max(0.0, now - h.since)), _when(deadline))
    Console().print(table)


def audit_table(entries: list[AuditEntry], title: str = "audit") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("time", "IP", "action", "reason", "who", "queue id", "reply"):
        table.add_column(col)
    for e in entries:
        table.add_row(_when(e.ts), e.ip or "-", e.action, e.reason, e.who or "governor", e.queue_id or "",
                      (e.reply[:50] + "…") if len(e.reply) > 51 else e.reply)
    return table


@main.command("audit")
@click.option("--since", callback=_duration, metavar="DURATION", help="Only entries newer than this (e.g. 1h, 2d).")
@click.option("--ip", callback=lambda c, p, v: v and ip_or_provider(v), help="Only entries for this IP.")
@click.option("--count", default=100, show_default=True, type=click.IntRange(1, 100000), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry (JSON Lines).")
@click.pass_context
def audit(ctx: click.Context, since: float | None, ip: str | None, count: int, as_json: bool) -> None:
    """Every automatic reaction and admin action: when, which IP, what, why, who."""
    with store_for(ctx) as store:
        start = store.now() - since if since else None
        entries = store.audit(start, count)
    if ip:
        entries = [e for e in entries if e.ip == ip]
    if as_json:
        for e in entries:
            emit_json(dataclasses.asdict(e))
        return
    Console().print(audit_table(entries))


# --------------------------------------------------------------------------- actions
@main.command("pause")
@click.argument("target", callback=_ip_arg(True))
@click.option("--for", "seconds", required=True, callback=_duration, metavar="DURATION",
              help="How long, e.g. 30m, 4h, 2d.")
@click.option("--reason", required=True, help="Why (kept in the audit stream).")
@click.pass_context
def pause(ctx: click.Context, target: str, seconds: float, reason: str) -> None:
    """Stop TARGET (an egress IP, or "provider" for every IP) sending to Yahoo.

    A pause never shortens one already running; `governor resume` ends it early.
    """
    with store_for(ctx) as store:
        store.pause(target, seconds, reason, who())
        until = store.now() + seconds
    audit_line(ctx, "pause", ip=target, by=operator(), reason=reason, until=_iso(until),
               seconds=f"{seconds:g}")
    click.echo(f"{target}: paused for Yahoo for {format_duration(seconds)} ({reason})")


@main.command("resume")
@click.argument("target", callback=_ip_arg(True))
@click.pass_context
def resume(ctx: click.Context, target: str) -> None:
    """End the cooldown or pause of TARGET (an IP or "provider"). Holds and levels stay."""
    with store_for(ctx) as store:
        store.resume(target, who())
    audit_line(ctx, "resume", ip=target, by=operator())
    click.echo(f"{target}: resumed")


@main.command("release-ip")
@click.argument("ip", callback=_ip_arg(False))
@click.pass_context
def release_ip(ctx: click.Context, ip: str) -> None:
    """Let a held IP (TS03-style block) send to Yahoo again.

    Do this only once Yahoo has lifted the block; its level stays until
    `governor reset-level`. Exit status 1 when the IP was not held.
    """
    with store_for(ctx) as store:
        was_held = store.release_ip(ip, who())
    audit_line(ctx, "release-ip", ip=ip, by=operator(), changed="yes" if was_held else "no")
    if not was_held:
        fail(f"{ip} was not held", EXIT_FAIL)
    click.echo(f"{ip}: released; it may send to Yahoo again")


@main.command("reset-level")
@click.argument("ip", callback=_ip_arg(False))
@click.pass_context
def reset_level(ctx: click.Context, ip: str) -> None:
    """Lower IP's escalation level to 0 — the only way a level ever goes down."""
    with store_for(ctx) as store:
        changed = store.reset_level(ip, who())
    audit_line(ctx, "reset-level", ip=ip, by=operator(), changed="yes" if changed else "no")
    click.echo(f"{ip}: escalation level reset to 0")
