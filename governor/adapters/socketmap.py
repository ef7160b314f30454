"""Postfix socketmap (socketmap_table(5)): netstring requests, netstring replies.

Each request is ``<len>:<name> <key>,``; one connection carries many requests (Postfix
keeps it up to 100 s, idle up to 10 s), answered in order with ``OK <data>``,
``NOTFOUND ``, ``TEMP <reason>`` or ``PERM <reason>``. Maps served (details and
Postfix configuration in docs/protocols.md):

``transport``
    ``transport_maps = socketmap:unix:PATH:transport``. A governed recipient gets the
    slot transport the store's assign picks, ``OK yahoo-ip2-s3:<nexthop>``; when no IP
    may send, ``OK retry:4.7.0 governor: ...`` (Postfix defers it with that text).
    Everything else (``*``, other domains, non-addresses) is ``NOTFOUND ``, so Postfix
    routes it as if the map did not exist.
``status-<egress name>``
    ``smtp_delivery_status_filter = socketmap:unix:PATH:status-<name>`` on each slot
    transport of that IP. The key is the delivery status (``4.7.0 host ... said: 421
    ...``); it is classified and recorded on the IP in the background and the answer
    is always ``NOTFOUND `` at once (Postfix keeps its own status; a slow Redis never
    slows a delivery agent).

A malformed netstring closes the connection (Postfix reconnects); an unknown map is
``PERM unknown map``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Awaitable
from typing import Any

from governor import metrics
from governor.adapters import READ_TIMEOUT, Runtime, feedback
from governor.config import EgressIP
from governor.domains import domain_of
from governor.logsetup import kv
from governor.store.keys import valid_ip, valid_recipient

MAX_NETSTRING = 100_000
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")
NOTFOUND = "NOTFOUND "
MAX_QUEUED = 64  # requests read ahead on one connection before it is dropped as abusive


class NetstringError(ValueError):
    """The peer broke the netstring framing; the only safe answer is to hang up."""


def encode(payload: str | bytes) -> bytes:
    """``b"5:hello,"``."""
    raw = payload.encode() if isinstance(payload, str) else payload
    return b"%d:%s," % (len(raw), raw)


class NetstringReader:
    """Incremental netstring decoder: ``feed(data)`` returns the complete payloads.

    Strict: the length is 1-6 ASCII digits without leading zeros, at most ``limit``,
    and the payload must be followed by ``,``; anything else raises NetstringError
    (and the reader is then useless: the caller drops the connection).
    """

    def __init__(self, limit: int = MAX_NETSTRING) -> None:
        self.limit = limit
        self.digits = len(str(limit))
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        while buf:
            colon = buf.find(b":", 0, self.digits + 1)
            if colon < 0:
                if len(buf) > self.digits or not buf.isdigit():
                    raise NetstringError("netstring length is not 1-%d digits and ':'" % self.digits)
                break
            head = bytes(buf[:colon])
            if not head.isdigit() or (head[0] == 0x30 and len(head) > 1):  # "0" yes, "01" no
                raise NetstringError("netstring length is not a number without leading zeros")
            size = int(head)
            if size > self.limit:
                raise NetstringError(f"netstring longer than {self.limit} bytes")
            end = colon + 1 + size
            if len(buf) <= end:
                break
            if buf[end] != 0x2C:  # ","
                raise NetstringError("netstring not terminated by ','")
            out.append(bytes(buf[colon + 1:end]))
            del buf[:end + 1]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete netstring held."""
        return len(self.buf)


class SocketmapHandler:
    """Answers one request payload ``<name> <key>``: a reply string, or an awaitable of one."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        nexthop = rt.config.postfix.nexthop
        self.nexthop = nexthop
        self.unavailable = "OK retry:4.7.0 governor unavailable"
        self.debug = rt.log.isEnabledFor(logging.DEBUG)
        self.status_maps: dict[bytes, EgressIP] = {b"status-" + e.name.encode(): e for e in rt.config.pool}

    def answer(self, payload: bytes) -> str | Awaitable[str]:
        name, _, key = payload.partition(b" ")
        if name == b"transport":
            return self.transport(key)
        egress = self.status_maps.get(name)
        if egress is not None:
            return self.status(egress, key)
        return "PERM unknown map"

    # ------------------------------------------------------------------ transport
    async def transport(self, raw: bytes) -> str:
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            return NOTFOUND
        if "@" not in key:
            return NOTFOUND  # "*", a bare name: not a recipient
        domain = domain_of(key)
        if domain is None or not await self.rt.governed(domain):
            return NOTFOUND
        try:
            rcpt: str | None = valid_recipient(key)
        except ValueError:
            rcpt = None  # route it all the same, just don't remember an odd address
        try:
            a = await self.rt.store.assign(rcpt)
        except Exception as exc:  # noqa: BLE001 - Redis down or broken: the fail mode answers
            self.rt.store_failed(exc, "assign")
            return self._unavailable()
        self.rt.store_ok()
        metrics.DECISIONS.labels("granted" if a.granted else "denied", metrics.reason_label(a.reason)).inc()
        if self.debug:
            self.rt.log.debug(kv(event="assign", rcpt=key, ip=a.ip, transport=a.transport,
                                 result="ok" if a.granted else "retry", reason=a.reason))
        if a.granted:
            return f"OK {a.transport}:{self.nexthop}"
        return f"OK retry:4.7.0 governor: no egress IP may send to Yahoo now ({a.reason})"

    def _unavailable(self) -> str:
        if self.rt.fail_open:
            slot = self.rt.next_open_slot()
            if slot is not None:
                self.rt.stats["failopen"] += 1
                metrics.DECISIONS.labels("failopen", "redis-down").inc()
                return f"OK {slot}:{self.nexthop}"
        return self.unavailable

    # ------------------------------------------------------------------ status filter
    def status(self, egress: EgressIP, raw: bytes) -> str:
        """Classify now (cheap), record in the background, answer NOTFOUND at once."""
        text = raw.decode("utf-8", "replace")
        dsn = _DSN.match(text)
        if dsn:
            text = text[dsn.end():]
        c = feedback.classify(text)
        if feedback.worth_recording(c):
            self.rt.spawn(self._record(valid_ip(egress.ip), c), "status")
        elif self.debug:
            feedback.log_event(self.rt.log, egress.ip, c, feedback.Feedback(None), mta="postfix",
                               event=egress.name, level=logging.DEBUG)
        return NOTFOUND

    async def _record(self, ip: str, c: Any) -> None:
        try:
            await feedback.record(self.rt.store, ip, c, self.rt.log, mta="postfix")
        except Exception as exc:  # noqa: BLE001
            self.rt.store_failed(exc, "status")
            self.rt.lost("status")
            return
        self.rt.store_ok()


class Connection(asyncio.Protocol):
    """Base of both protocols' connections: registry, read timeout, busy state.

    ``busy`` while a request is being answered: the read timeout does not run then,
    and shutdown lets it finish (bounded by the daemon's grace period) instead of
    closing it like an idle connection.
    """

    timeout = READ_TIMEOUT

    def __init__(self, live: set[Connection]) -> None:
        self.live = live
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.live.add(self)
        self._deadline = self._loop.time() + self.timeout
        self._timer = self._loop.call_at(self._deadline, self._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def touch(self) -> None:
        """Restart the read timeout (socketmap: after each answered request)."""
        self._deadline = self._loop.time() + self.timeout

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        if self.busy or now < self._deadline:
            self._timer = self._loop.call_at(max(self._deadline, now + 0.1), self._tick)
            return
        self.timed_out()

    def timed_out(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


class SocketmapListener:
    """The socketmap's asyncio server and its live connections, for a bounded shutdown.

    Postfix keeps socketmap connections open and sends many requests on each, so the
    per-connection cost of asyncio transports does not matter here (unlike Exim's)."""

    def __init__(self, server: asyncio.AbstractServer, live: set[Connection]) -> None:
        self.server = server
        self.live = live

    def stop(self) -> None:
        self.server.close()

    @property
    def busy(self) -> int:
        return sum(1 for c in self.live if c.busy)

    def close_idle(self) -> None:
        for conn in list(self.live):
            if not conn.busy:
                conn.close()

    def abort(self) -> None:
        for conn in list(self.live):
            conn.abort()


class SocketmapConnection(Connection):
    """One Postfix client connection: many requests, answered strictly in order."""

    def __init__(self, live: set[Connection], handler: SocketmapHandler) -> None:
        super().__init__(live)
        self.handler = handler
        self.reader = NetstringReader()
        self.queue: collections.deque[bytes] = collections.deque()
        self.eof = False

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.reader.feed(data)
        except NetstringError as exc:
            if self.handler.debug:
                self.handler.rt.log.debug(kv(event="socketmap-dropped", why=str(exc)))
            self.handler.rt.stats["socketmap_malformed"] += 1
            self.abort()
            return
        if not payloads:
            return
        self.touch()
        self.queue.extend(payloads)
        if len(self.queue) > MAX_QUEUED:
            self.abort()
        elif not self.busy:
            self._next()

    def _next(self) -> None:
        """Answer queued requests in order; synchronous answers need no task."""
        while self.queue and not self.closed:
            reply = self.handler.answer(self.queue.popleft())
            if isinstance(reply, str):
                self.transport.write(encode(reply))  # type: ignore[union-attr]
                continue
            self.busy = True
            self._loop.create_task(self._finish(reply))
            return
        self.busy = False
        self.touch()
        if self.eof:
            self.close()

    async def _finish(self, pending: Awaitable[str]) -> None:
        try:
            reply = await pending
        except Exception as exc:  # noqa: BLE001 - never leave Postfix without an answer
            self.handler.rt.log.error(kv(event="internal-error", where="socketmap",
                                         error=f"{type(exc).__name__}: {exc}"))
            reply = "TEMP internal error"
        if not self.closed and self.transport is not None:
            self.transport.write(encode(reply))
        self._next()

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy  # still answering: keep the write side open, close after the answer
