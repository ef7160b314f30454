"""Fault injection for the labs: break Redis, the governor's processes, MTA processes
or the simulated MX mid-drain, then account for every message.

The end-to-end fault suite (tests/faults/) and anyone reproducing an incident by hand
use the same pieces: :class:`Outcome` (count in = delivered + still queued, nothing
lost, cap kept, leases gone), Redis faults (SIGKILL with or without an append-only
file, ``SCRIPT FLUSH``, ``FLUSHALL``, ``CLIENT PAUSE``), ``kill -9`` of a process
found by its command line, and the simulator's ``fault`` knob (governor/sim/state.py).
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from governor.lab import wait_for  # noqa: F401  (re-exported for the fault tests)
from governor.redisproc import RedisProc


# --------------------------------------------------------------------------- outcome
@dataclass
class Outcome:
    """What one fault scenario measured; ``line()`` is the one-line summary."""

    name: str
    n_in: int = 0            # recipients the MTA accepted (after client retries)
    delivered: int = 0       # recipients the simulator (Yahoo + sink) accepted
    queued: int = 0          # recipients still in the MTA's queue (held, deferred, frozen)
    rejected: int = 0        # 5xx answers or bounces (must stay 0: never by the governor's doing)
    tempfailed: int = 0      # 4xx answers at RCPT that the client sent again (fail-closed)
    maxconc: int = 0         # highest concurrent connections from one egress IP
    cap: int = 0             # the per-IP concurrency limit
    leases_left: int = 0     # leases in Redis once lease_ttl has passed
    recover_s: float = 0.0   # fault end -> first delivery after it
    drain_s: float = 0.0     # fault end -> everything delivered
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.n_in - self.delivered - self.queued

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (f"FAULT {self.name} in={self.n_in} delivered={self.delivered} held={self.queued} "
                f"lost={self.lost} rejected={self.rejected} tempfailed={self.tempfailed} "
                f"maxconc={self.maxconc}/{self.cap} leases_left={self.leases_left} "
                f"recover_s={self.recover_s:.1f} drain_s={self.drain_s:.1f}" + (f" {extra}" if extra else ""))

    def problems(self) -> list[str]:
        """The invariants every scenario asserts; empty when all hold."""
        out = []
        if self.lost:
            out.append(f"{self.lost} messages lost")
        if self.rejected:
            out.append(f"{self.rejected} rejected or bounced")
        if self.leases_left:
            out.append(f"{self.leases_left} leases left after the TTL")
        if self.maxconc > self.cap:
            out.append(f"concurrency {self.maxconc} > cap {self.cap}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost}


def record(path: Path, outcome: Outcome) -> None:
    """Merge one outcome into the JSON results file (keyed by scenario name)."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[outcome.name] = {**outcome.as_dict(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- simulator view
def max_concurrency(stats: dict[str, Any]) -> int:
    """Highest concurrent connections the simulator saw from any one egress IP."""
    return max((s["concurrency_hwm"] for s in stats["ips"].values()), default=0)


def first_accept_after(stats: dict[str, Any], wall: float) -> float | None:
    """Seconds from wall time ``wall`` to the first accepted message after it (needs
    ``stats(include_times=True)``)."""
    later = [t for s in stats["ips"].values() for t in s.get("accept_times", []) if t >= wall]
    return (min(later) - wall) if later else None


# --------------------------------------------------------------------------- Redis faults
def client(proc: RedisProc) -> redis.Redis:
    """A plain client on the lab's Redis (short timeouts: the server may be paused)."""
    return redis.Redis(unix_socket_path=str(proc.unixsocket), socket_timeout=5, socket_connect_timeout=2)


def enable_aof(proc: RedisProc, timeout: float = 20.0) -> None:
    """Turn on the append-only file of a running server (``appendfsync everysec``) and
    make later restarts load it, as production Redis should be run."""
    c = client(proc)
    try:
        c.config_set("appendfsync", "everysec")
        c.config_set("appendonly", "yes")
        wait_for("AOF rewrite finished", lambda: int(c.info("persistence")["aof_rewrite_in_progress"]) == 0
                 and int(c.info("persistence")["aof_enabled"]) == 1, timeout)
    finally:
        c.close()
    proc.persist = True


def kill_redis(proc: RedisProc, down_for: float) -> float:
    """SIGKILL redis-server, keep it down ``down_for`` s, start it again on the same
    socket and port; returns the wall time it answered again."""
    proc.kill()
    time.sleep(down_for)
    proc.start()
    return time.time()


def redis_command(proc: RedisProc, *args: str) -> Any:
    c = client(proc)
    try:
        return c.execute_command(*args)
    finally:
        c.close()


def pause_redis(proc: RedisProc, seconds: float) -> float:
    """``CLIENT PAUSE`` every client for ``seconds`` (Redis slow: commands hang, then run);
    returns the wall time the pause ends."""
    redis_command(proc, "CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
    return time.time() + seconds


def leases_left(proc: RedisProc, prefix: str, ips: Iterable[str]) -> int:
    """Leases still in force on ``ips`` (expiry after Redis's clock), as ``status``
    counts them. Expired members stay in the ZSET until an acquire needs the room
    (acquire.lua purges them only then); they bind nothing: see :func:`stale_leases`."""
    c = client(proc)
    try:
        return leases_in_force(c, prefix, ips)
    finally:
        c.close()


def leases_in_force(c: Any, prefix: str, ips: Iterable[str]) -> int:
    """:func:`leases_left` on any client (a Sentinel master or a cluster client too)."""
    sec, usec = c.time()
    now = int(sec) * 1_000_000 + int(usec)
    return sum(c.zcount(f"{prefix}:{{{ip}}}:leases", f"({now}", "+inf") for ip in ips)


def stale_leases(proc: RedisProc, prefix: str, ips: Iterable[str]) -> int:
    """Expired lease members not purged yet (a crashed holder's; harmless)."""
    c = client(proc)
    try:
        return sum(c.zcard(f"{prefix}:{{{ip}}}:leases") for ip in ips) - leases_left(proc, prefix, ips)
    finally:
        c.close()


# --------------------------------------------------------------------------- processes
def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def kill9(pids: Iterable[int]) -> list[int]:
    """SIGKILL each pid; returns those that existed."""
    done = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(pid)
        except ProcessLookupError:
            pass
    return done


def postfix_slot_smtp(pids: Iterable[int]) -> list[int]:
    """Of a Postfix instance's processes, the smtp clients of governor slot transports
    (``smtp -n yahoo-ipN-sK``)."""
    out = []
    for pid in pids:
        args = cmdline(pid)
        if args and args[0].endswith("smtp") and any(a.startswith("yahoo-ip") for a in args):
            out.append(pid)
    return out


def markdown_table(path: Path) -> str:
    """The results file as the outcomes table of docs/faults.md."""
    data = json.loads(path.read_text())
    rows = ["| scenario | in | delivered | held | lost | rejected | tempfailed (retried) | max conc./cap "
            "| leases left | recover s | drain s | notes |", "|" + "---|" * 12]
    for name, r in sorted(data.items()):
        notes = ", ".join(f"{k}={v}" for k, v in r.get("notes", {}).items())
        rows.append(f"| {name} | {r['n_in']} | {r['delivered']} | {r['queued']} | {r['lost']} | {r['rejected']} "
                    f"| {r['tempfailed']} | {r['maxconc']}/{r['cap']} | {r['leases_left']} | {r['recover_s']:.1f} "
                    f"| {r['drain_s']:.1f} | {notes} |")
    return "\n".join(rows)
