"""Control interface of the simulator: a line protocol answering one JSON line per command.

Reachable on a unix socket (``--control /path/sim.sock``) or a loopback TCP port
(``--control 127.0.0.1:2599``). A client may send several commands on one
connection; each answer is one line of JSON with ``"ok": true|false``. Sending one
line and reading to EOF after shutting down the write side works too (``nc -U``).

Commands (IP arguments accept IPv4 and IPv6)::

    ping                 → {"ok", "pid", "listen", "sink", "control"}
    stats                → {"ok", "stats": {...}} full accounting, with accept_times
    summary              → same without the accept_times lists
    settings             → {"ok", "settings": {...}}
    reset                → forget all counters and standings
    reset-ip IP          → release IP: clear its penalty, violations and TS02/TS03
    set KEY VALUE        → change a limit at run time (see RUNTIME_KEYS)
    cold IP | warm IP    → add IP to / remove it from the cold-IP list
    block IP | unblock IP→ TS03 at connect for IP / lift that
    limit IP KEY VALUE   → per-IP max_conn, max_rate or max_per_conn for IP
    unlimit IP           → drop IP's own limits (the global settings apply again)
    fault KIND [EVERY]   → misbehave on every EVERY-th event (default 1): drop-data,
                           garbage-data or garbage-greeting (see state.FAULT_KINDS)
    fault none           → behave again
    dump PATH            → write the full stats JSON to PATH
    help                 → the list of commands
    quit                 → close this control connection
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governor.sim.settings import RUNTIME_KEYS, Endpoint, SettingsError, coerce, normalize_ip
from governor.sim.state import FAULT_KINDS, IP_LIMIT_KEYS

if TYPE_CHECKING:
    from governor.sim.server import Simulator

MAX_LINE = 65536

COMMANDS = ("ping", "stats", "summary", "settings", "reset", "reset-ip IP", "set KEY VALUE",
            "cold IP", "warm IP", "block IP", "unblock IP", "limit IP KEY VALUE", "unlimit IP",
            "fault KIND [EVERY]", "fault none",
            "dump PATH", "help", "quit")


class ControlError(ValueError):
    """A control command was malformed; becomes ``{"ok": false, "error": ...}``."""


def execute(sim: Simulator, line: str) -> dict[str, Any]:
    """Run one command line against ``sim`` and return the JSON-ready answer."""
    words = line.strip().split(None, 1)
    if not words:
        return {"ok": False, "error": "empty command; try 'help'"}
    verb, rest = words[0].lower(), (words[1].strip() if len(words) > 1 else "")
    handler = _VERBS.get(verb)
    if handler is None:
        return {"ok": False, "error": f"unknown command {verb!r}; try 'help'"}
    try:
        return {"ok": True, **handler(sim, rest)}
    except (ControlError, SettingsError) as exc:
        return {"ok": False, "error": str(exc)}
    except OSError as exc:
        return {"ok": False, "error": f"{exc.strerror or exc}"}


def _no_args(rest: str) -> None:
    if rest:
        raise ControlError(f"unexpected argument {rest!r}")


def _ip(rest: str) -> str:
    if not rest or len(rest.split()) != 1:
        raise ControlError("expected one IP address")
    return normalize_ip(rest)


def _ping(sim: Simulator, rest: str) -> dict[str, Any]:
    _no_args(rest)
    return {"pid": os.getpid(), "listen": [str(a) for a in sim.addresses],
            "sink": [str(a) for a in sim.sink_addresses], "control": sim.control_address}


def _stats(sim: Simulator, rest: str) -> dict[str, Any]:
    _no_args(rest)
    return {"stats": sim.stats()}


def _summary(sim: Simulator, rest: str) -> dict[str, Any]:
    _no_args(rest)
    return {"stats": sim.stats(include_times=False)}


def _settings(sim: Simulator, rest: str) -> dict[str, Any]:
    _no_args(rest)
    return {"settings": sim.settings.as_dict()}


def _reset(sim: Simulator, rest: str) -> dict[str, Any]:
    _no_args(rest)
    sim.reset()
    return {}


def _reset_ip(sim: Simulator, rest: str) -> dict[str, Any]:
    ip = _ip(rest)
    sim.state.reset_ip(ip)
    return {"ip": ip}


def _set(sim: Simulator, rest: str) -> dict[str, Any]:
    parts = rest.split(None, 1)
    if len(parts) != 2:
        raise ControlError("usage: set KEY VALUE")
    key = parts[0].lower().replace("-", "_")
    if key not in RUNTIME_KEYS:
        raise ControlError(f"cannot set {parts[0]!r}; settable: {', '.join(RUNTIME_KEYS)}")
    value: Any = parts[1]
    if key.endswith("_pattern") and value in ("''", '""', "-"):
        value = ""  # a way to disable a pattern on the line protocol
    sim.settings = sim.settings.with_value(key, value)
    return {"settings": sim.settings.as_dict()}


def _limit(sim: Simulator, rest: str) -> dict[str, Any]:
    parts = rest.split()
    if len(parts) != 3:
        raise ControlError("usage: limit IP KEY VALUE (KEY: max_conn, max_rate or max_per_conn)")
    ip, key = normalize_ip(parts[0]), parts[1].lower().replace("-", "_")
    if key not in IP_LIMIT_KEYS:
        raise ControlError(f"cannot limit {parts[1]!r} per IP; one of: {', '.join(IP_LIMIT_KEYS)}")
    value = coerce(key, parts[2])
    sim.state.set_ip_limit(ip, key, value)
    return {"ip": ip, "limits": dict(sim.state.ip_limits.get(ip, {}))}


def _unlimit(sim: Simulator, rest: str) -> dict[str, Any]:
    ip = _ip(rest)
    sim.state.set_ip_limit(ip, "", None)
    return {"ip": ip}


def _fault(sim: Simulator, rest: str) -> dict[str, Any]:
    parts = rest.split()
    if not parts or len(parts) > 2 or (parts[0] == "none" and len(parts) > 1):
        raise ControlError(f"usage: fault KIND [EVERY] | fault none (KIND: {', '.join(FAULT_KINDS)})")
    if parts[0] == "none":
        sim.state.set_fault(None)
        return {"fault": None}
    if parts[0] not in FAULT_KINDS:
        raise ControlError(f"unknown fault {parts[0]!r}; one of: {', '.join(FAULT_KINDS)}, none")
    every = parts[1] if len(parts) == 2 else "1"
    if not every.isdigit() or int(every) < 1:
        raise ControlError(f"fault EVERY must be a whole number >= 1, got {every!r}")
    sim.state.set_fault(parts[0], int(every))
    return {"fault": {"kind": parts[0], "every": int(every)}}


def _marker(method: str, flag: bool) -> Callable[[Simulator, str], dict[str, Any]]:
    def run(sim: Simulator, rest: str) -> dict[str, Any]:
        ip = _ip(rest)
        getattr(sim.state, method)(ip, flag)
        return {"ip": ip}

    return run


def _dump(sim: Simulator, rest: str) -> dict[str, Any]:
    if not rest:
        raise ControlError("usage: dump PATH")
    return {"path": str(sim.dump(rest))}


def _help(sim: Simulator, rest: str) -> dict[str, Any]:
    return {"commands": list(COMMANDS), "settable": list(RUNTIME_KEYS)}


_VERBS: dict[str, Callable[[Simulator, str], dict[str, Any]]] = {
    "ping": _ping, "stats": _stats, "summary": _summary, "settings": _settings,
    "reset": _reset, "reset-ip": _reset_ip, "set": _set,
    "cold": _marker("set_cold", True), "warm": _marker("set_cold", False),
    "block": _marker("set_blocked", True), "unblock": _marker("set_blocked", False),
    "limit": _limit, "unlimit": _unlimit, "fault": _fault, "dump": _dump, "help": _help,
}


class ControlServer:
    """asyncio server for the line protocol on a unix socket or loopback TCP port."""

    def __init__(self, sim: Simulator, address: str | Endpoint) -> None:
        self.sim = sim
        self.address = address
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        """Listen; return the address as text (TCP port resolved)."""
        from governor.sim.server import SimError

        try:
            if isinstance(self.address, Endpoint):
                self._server = await asyncio.start_server(
                    self._client, host=self.address.host, port=self.address.port, limit=MAX_LINE)
                port = self._server.sockets[0].getsockname()[1]
                return str(Endpoint(self.address.host, port))
            path = Path(self.address)
            _remove_stale_socket(path)
            self._server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_LINE)
            os.chmod(path, 0o600)
            return str(path)
        except OSError as exc:
            raise SimError(f"cannot open control socket {self.address}: {exc.strerror or exc}") from None

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None
        if not isinstance(self.address, Endpoint):
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "line too long"}\n')
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if line.lower() == "quit":
                    break
                if not line:
                    continue
                answer = execute(self.sim, line)
                writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; never remove anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, f"{path} exists and is not a socket")
    path.unlink()


def request(address: str | Endpoint, line: str, timeout: float = 5.0) -> dict[str, Any]:
    """Synchronous client: send one command, return the decoded JSON answer."""
    if isinstance(address, Endpoint):
        family, target = (socket.AF_INET6 if address.is_ipv6 else socket.AF_INET), (address.host, address.port)
    else:
        family, target = socket.AF_UNIX, str(address)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(line.strip().encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ConnectionError(f"control {address}: connection closed without an answer")
    return json.loads(data.split(b"\n", 1)[0])
