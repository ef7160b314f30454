"""``governor release``: let held Yahoo mail go, paced through the normal budget.

Why a command and not just ``postsuper -H ALL``: releasing a hold queue at once is
exactly the flood that got the IP deferred. Each message costs one store token
(``acquire(None)`` then release of the lease, as the queue agent does), so the
release goes at the per-IP pace of the IPs that may send, slower while one ramps
back, and never faster than ``--rate``. Held messages are taken oldest first (the
nearest to the queue lifetime go first). Every release is audited in the store and in
syslog, with the operator and the count.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import click

from governor import logsetup
from governor.adapters.queue_agent import (
    TRANSIENT_DENIALS, QueueCommandError, RateLimit, budget_token,
)
from governor.cli import main
from governor.cli.admin_cmds import audit_log, ip_or_provider, operator, store_for, who
from governor.cli.common import EXIT_FAIL, EXIT_USAGE, config_from, emit_json, fail
from governor.config import Config
from governor.domains import DomainSet
from governor.store.keys import valid_queue_id
from governor.store.model import Hold

BATCH = 50              # messages per MTA command when the budget allows several at once
WAIT_STEP = 1.0         # longest single sleep while the budget refills (Ctrl-C stays prompt)
MAX_TOKEN_WAIT = 600.0  # give up when one message's token has not come in this long (leases stuck)
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?")
_PER_MINUTE = {None: 1.0, "m": 1.0, "min": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}


def parse_rate(text: str) -> float:
    """``60/min``, ``60`` (per minute), ``1/s``, ``600/h`` → messages per minute (> 0)."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"--rate: expected N/min (or N/s, N/h), got {text!r}")
    per_minute = float(m.group(1)) * _PER_MINUTE[m.group(2)]
    if not 0 < per_minute <= 1_000_000:
        raise ValueError(f"--rate: must be more than 0 and at most 1000000/min, got {text!r}")
    return per_minute


@dataclass
class Selection:
    """What to release: registry holds (and explicitly named held messages), oldest first."""

    holds: list[Hold]
    mta: str
    missing: list[str] = field(default_factory=list)   # named ids that are not held


@dataclass
class Progress:
    """Counts and timing of one release run (its summary and audit entry)."""

    total: int
    released: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped: str = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def per_minute(self) -> float:
        """The measured pace: releases after the first, over the time since it."""
        return 60.0 * (len(self.released) - 1) / self.elapsed if len(self.released) > 1 and self.elapsed else 0.0


# --------------------------------------------------------------------------- arguments
def _check_usage(ip: str | None, release_all: bool, queue_ids: tuple[str, ...], rate: str | None,
                 cfg: Config) -> tuple[str | None, list[str], float | None]:
    """Exactly one selector; a valid IP, queue ids and rate; else one line and exit 2."""
    chosen = [name for name, on in (("--ip", ip is not None), ("--all", release_all), ("QUEUEID", queue_ids)) if on]
    if not chosen:
        fail("release: say what to release: --ip IP, --all, or one or more QUEUEIDs", EXIT_USAGE)
    if len(chosen) > 1:
        fail(f"release: {' and '.join(chosen)} cannot be combined; give exactly one of --ip, --all, QUEUEID",
             EXIT_USAGE)
    try:
        ip = ip_or_provider(ip, provider_ok=False) if ip is not None else None
        ids = [valid_queue_id(q) for q in queue_ids]
        per_minute = parse_rate(rate) if rate is not None else cfg.holds.release_rate
    except (click.BadParameter, ValueError) as exc:
        fail(f"release: {getattr(exc, 'message', None) or exc}", EXIT_USAGE)
    return ip, ids, per_minute


def select(store: Any, backend: Any, cfg: Config, ip: str | None, ids: list[str]) -> Selection:
    """Registry holds of this MTA (all, one IP's, or the named ones). A named id that the
    registry does not know is still released when the MTA holds it as Yahoo mail (held
    by hand, or its registry entry lost): the operator asked for that message."""
    registry = [h for h in store.holds(ip) if h.mta == backend.mta]
    if not ids:
        return Selection(sorted(registry, key=lambda h: h.since), backend.mta)
    known = {h.queue_id: h for h in registry}
    unknown = [q for q in ids if q not in known]
    queued = {}
    if unknown:
        queued = {m.queue_id: m for m in backend.list_governed(DomainSet.from_config(cfg)) if m.state == "hold"}
    picked, missing = [], []
    for qid in dict.fromkeys(ids):
        if qid in known:
            picked.append(known[qid])
        elif qid in queued:
            picked.append(Hold(queue_id=qid, mta=backend.mta, ip="", since=queued[qid].arrival, reason="manual"))
        else:
            missing.append(qid)
    return Selection(sorted(picked, key=lambda h: h.since), backend.mta, missing)


# --------------------------------------------------------------------------- output
def _show_plan(sel: Selection, per_minute: float | None, now: float, as_json: bool) -> None:
    for h in sel.holds:
        if as_json:
            emit_json({"event": "would-release", "queue_id": h.queue_id, "mta": h.mta, "ip": h.ip or None,
                       "reason": h.reason, "since": h.since})
        else:
            age = max(0.0, now - h.since) if h.since else 0.0
            click.echo(f"would release {h.queue_id} (held for {h.ip or 'no IP'}: {h.reason or '-'}, "
                       f"{age / 60:.0f} min)")
    pace = f"at most {per_minute:g}/min and " if per_minute else ""
    if as_json:
        emit_json({"event": "summary", "dry_run": True, "total": len(sel.holds), "released": 0,
                   "missing": sel.missing, "rate_per_minute": per_minute})
    else:
        click.echo(f"{len(sel.holds)} held messages would be released, {pace}no faster than the egress "
                   f"IPs' budget allows (dry run: nothing changed)")


def _progress_line(p: Progress, qids: list[str], hold_ip: dict[str, str], as_json: bool) -> None:
    base = len(p.released) - len(qids)
    for i, qid in enumerate(qids):
        n = base + i + 1
        if as_json:
            emit_json({"event": "released", "queue_id": qid, "ip": hold_ip.get(qid) or None, "done": n,
                       "total": p.total, "elapsed": round(p.elapsed, 3)})
        else:
            click.echo(f"released {qid} ({n}/{p.total}, {p.elapsed:.1f} s)")


def _summary(p: Progress, sel: Selection, as_json: bool) -> None:
    if as_json:
        emit_json({"event": "summary", "dry_run": False, "total": p.total, "released": len(p.released),
                   "gone": p.gone, "missing": sel.missing, "elapsed": round(p.elapsed, 3),
                   "rate_per_minute": round(p.per_minute, 2), "stopped": p.stopped or None})
        return
    click.echo(f"released {len(p.released)} of {p.total} held messages in {p.elapsed:.1f} s"
               + (f" ({p.per_minute:.0f}/min)" if p.per_minute else "")
               + (f"; {len(p.gone)} were no longer queued" if p.gone else ""))
    for qid in sel.missing:
        click.echo(f"governor: {qid}: not held (not in {sel.mta}'s hold queue nor in the holds registry)",
                   err=True)
    if p.stopped:
        click.echo(f"governor: stopped: {p.stopped}", err=True)


# --------------------------------------------------------------------------- the paced loop
def _tokens(store: Any, limit: RateLimit, want: int, p: Progress) -> int:
    """Wait for at least one token (or a lasting denial), then take what is ready now, up
    to ``want``. Returns how many; sets ``p.stopped`` when no IP may send."""
    got = 0
    give_up = time.monotonic() + MAX_TOKEN_WAIT
    while got < want:
        decision = budget_token(store, limit, "admin-release")
        if decision is not None and decision.granted:
            got += 1
            continue
        if got:
            return got  # send what we have; the next call waits
        if decision is not None and decision.reason not in TRANSIENT_DENIALS:
            p.stopped = (f"no egress IP may send to Yahoo now ({decision.reason}, budget back in "
                         f"{decision.retry_after:.0f} s); held mail stays held")
            return 0
        if time.monotonic() > give_up:
            p.stopped = f"no budget for {MAX_TOKEN_WAIT:.0f} s ({decision.reason if decision else 'rate'})"
            return 0
        wait = limit.delay() if decision is None else decision.retry_after
        time.sleep(min(WAIT_STEP, max(0.005, wait)))
    return got


def release_paced(store: Any, backend: Any, sel: Selection, per_minute: float | None, as_json: bool,
                  by: str) -> Progress:
    """Release ``sel`` oldest first, one store token per message, reporting progress."""
    p = Progress(total=len(sel.holds))
    limit = RateLimit(per_minute)
    hold_ip = {h.queue_id: h.ip for h in sel.holds}
    todo = [h.queue_id for h in sel.holds]
    try:
        while todo:
            n = _tokens(store, limit, min(BATCH, len(todo)), p)
            if not n:
                break
            batch, todo = todo[:n], todo[n:]
            done = backend.release(batch)
            for qid in batch:
                store.remove_hold(qid, backend.mta)
            p.released += done
            p.gone += [q for q in batch if q not in set(done)]
            for qid in done:
                logsetup.audit("release", queue_id=qid, ip=hold_ip.get(qid) or None, mta=backend.mta, by=by)
            _progress_line(p, done, hold_ip, as_json)
    except QueueCommandError as exc:
        p.stopped = f"MTA command failed: {exc}"
    except KeyboardInterrupt:
        p.stopped = "interrupted"
    return p


# --------------------------------------------------------------------------- the command
@main.command("release")
@click.argument("queue_ids", nargs=-1, metavar="[QUEUEID]...")
@click.option("--ip", default=None, metavar="IP", help="Release the mail held for this egress IP.")
@click.option("--all", "release_all", is_flag=True, help="Release all mail the governor holds in this MTA.")
@click.option("--rate", default=None, metavar="N/min",
              help="At most this many messages a minute (also N/s, N/h) [default: holds.release_rate, "
                   "else only the egress IPs' budget].")
@click.option("--dry-run", is_flag=True, help="List what would be released; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per message, then a summary.")
@click.option("--mta", type=click.Choice(["postfix", "exim"]), default="postfix", show_default=True,
              help="Whose queue holds the mail.")
@click.option("--reason", default="admin release", show_default=True, help="Why (kept in the audit).")
@click.pass_context
def release(ctx: click.Context, queue_ids: tuple[str, ...], ip: str | None, release_all: bool, rate: str | None,
            dry_run: bool, as_json: bool, mta: str, reason: str) -> None:
    """Release held Yahoo mail, paced through the normal budget (never a flood).

    Give exactly one of --ip IP, --all, or QUEUEIDs. Messages go oldest first,
    each taking one token of the egress IPs' budget (the same per-IP rate as new
    mail, slower while an IP ramps back), and no faster than --rate; a progress
    line is printed per message. When no IP may send (every IP cooling, held or
    paused) the release stops and the rest stays held: resume or release-ip
    first. The release is audited (operator, reason, count) in the store and in
    syslog. The queue agent also releases held mail by itself once an IP may
    send; use this to release earlier, slower, or selected messages.

    Exit status 0 when every selected message was released (or --dry-run), 1 when
    a named QUEUEID is not held, the release stopped early, or the store or the MTA
    command failed, 2 for bad usage.
    """
    cfg = config_from(ctx)
    ip, ids, per_minute = _check_usage(ip, release_all, queue_ids, rate, cfg)
    from governor.cli.postfix_cmds import queue_backend

    backend = queue_backend(cfg, mta)
    with store_for(ctx) as store:
        try:
            sel = select(store, backend, cfg, ip, ids)
        except QueueCommandError as exc:
            fail(f"release: {exc}", EXIT_FAIL)
        if dry_run:
            _show_plan(sel, per_minute, store.now(), as_json)
            raise SystemExit(EXIT_FAIL if sel.missing else 0)
        with audit_log(ctx):
            p = release_paced(store, backend, sel, per_minute, as_json, operator())
            if not p.total:  # nothing was selected: nothing to audit
                _summary(p, sel, as_json)
                raise SystemExit(EXIT_FAIL if sel.missing else 0)
            what = ip or ("all" if release_all else " ".join(ids))
            store.note("admin:release", ip=ip or "", reason=reason, who=who(),
                       queue_id=ids[0] if len(ids) == 1 else "",
                       extra={"count": len(p.released), "selected": p.total, "what": what[:200], "mta": mta,
                              "rate": f"{per_minute:g}/min" if per_minute else "budget"})
            logsetup.audit("release-done", ip=ip, what=what[:200], by=operator(), reason=reason,
                           count=len(p.released), selected=p.total, mta=mta, stopped=p.stopped or None)
    _summary(p, sel, as_json)
    raise SystemExit(EXIT_FAIL if (p.stopped or sel.missing) else 0)
