"""Recording test doubles for the MTA lab: an SMTP sink and a socketmap server.

``SmtpSink`` stands in for Yahoo's MX: an aiosmtpd server on a loopback port that
records every connection (peer address, open/close time) and every transaction
(sender, recipients, timing), and can answer with scripted failures (421 at MAIL
FROM, 451 at RCPT, 554 after DATA, slow DATA) so delivery-status paths can be
exercised without the internet.

``SocketmapSink`` is a socketmap(5) server (netstring protocol, see
socketmap_table(5)) that records each request together with the asking process
(``SO_PEERCRED``) and answers through a callable, so lab experiments can watch
exactly when and how often Postfix asks ``transport_maps`` or
``smtp_delivery_status_filter``.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

# ---------------------------------------------------------------------------
# SMTP sink
# ---------------------------------------------------------------------------

#: ``rule(stage, arg, envelope) -> reply or None``; stage is "MAIL", "RCPT" or "DATA",
#: arg the address (MAIL/RCPT) or "" (DATA). ``None`` means the default 250.
Rule = Callable[[str, str, Envelope], "str | None"]


@dataclass
class SinkConnection:
    """One TCP connection seen by the sink."""

    conn_id: int
    peer: str
    peer_port: int
    opened: float
    closed: float | None = None
    helo: str | None = None
    messages: int = 0


@dataclass
class SinkMessage:
    """One accepted message (DATA answered 250)."""

    conn_id: int
    peer: str
    mail_from: str
    rcpts: list[str]
    mail_at: float
    done_at: float
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class SinkReply:
    """A non-250 answer the sink gave (for checking scripted failures)."""

    conn_id: int
    peer: str
    stage: str
    arg: str
    reply: str
    at: float


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP with connect/disconnect bookkeeping (aiosmtpd has no hook for that)."""

    def __init__(self, handler: "_SinkHandler", **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink_handler = handler
        self.conn_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn_id = self._sink_handler.sink._opened(peer[0], peer[1])
        if self.session is not None:
            self.session.conn_id = self.conn_id  # type: ignore[attr-defined]

    def connection_lost(self, error: Exception | None) -> None:
        self._sink_handler.sink._closed(self.conn_id)
        super().connection_lost(error)


class _SinkHandler:
    """aiosmtpd handler: applies the sink's rules and records results."""

    def __init__(self, sink: "SmtpSink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.sink._helo(getattr(session, "conn_id", 0), hostname)
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        self.sink._helo(getattr(session, "conn_id", 0), hostname)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_at = time.monotonic()  # type: ignore[attr-defined]
        reply = self._ruled(server, session, envelope, "MAIL", address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self._ruled(server, session, envelope, "RCPT", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        reply = self._ruled(server, session, envelope, "DATA", "")
        if reply:
            return reply
        self.sink._message(getattr(session, "conn_id", 0), session.peer[0], envelope)
        return f"250 2.0.0 Ok: sink#{len(self.sink._messages)}"

    def _ruled(self, server: SMTP, session: Session, envelope: Envelope,
               stage: str, arg: str) -> str | None:
        """Ask the rule; record a non-default reply and hang up after a 421 (as Yahoo does)."""
        if self.sink.rule is None:
            return None
        reply = self.sink.rule(stage, arg, envelope)
        if not reply:
            return None
        self.sink._reply(getattr(session, "conn_id", 0), session.peer[0], stage, arg, reply)
        if reply.startswith("421") and server.transport is not None:
            # push() writes the reply right after we return and then awaits drain();
            # close() runs at that point and still flushes the buffered reply.
            asyncio.get_running_loop().call_soon(server.transport.close)
        return reply


class _SinkController(Controller):
    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)


class SmtpSink:
    """A recording SMTP server on 127.0.0.1 (the lab's stand-in for a Yahoo MX).

    Use as a context manager. ``rule`` scripts failures; ``data_delay`` makes DATA slow.
    Times are ``time.monotonic()`` values.
    """

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", rule: Rule | None = None,
                 data_delay: float = 0.0, hostname: str = "sink.lab.test") -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.rule = rule
        self.data_delay = data_delay
        self._lock = threading.Lock()
        self._conns: dict[int, SinkConnection] = {}
        self._messages: list[SinkMessage] = []
        self._replies: list[SinkReply] = []
        self._next_id = 0
        self._controller = _SinkController(
            _SinkHandler(self), hostname=host, port=self.port, server_hostname=hostname,
            enable_SMTPUTF8=False, data_size_limit=10 * 1024 * 1024)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "SmtpSink":
        self._controller.start()
        self.reset()  # forget aiosmtpd's own readiness probe connection
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nexthop(self) -> str:
        """The sink as a Postfix nexthop (``[127.0.0.1]:PORT``: no MX/DNS lookup)."""
        return f"[{self.host}]:{self.port}"

    # -- recording (called on the server thread) ---------------------------
    def _opened(self, peer: str, port: int) -> int:
        with self._lock:
            self._next_id += 1
            self._conns[self._next_id] = SinkConnection(self._next_id, peer, port, time.monotonic())
            return self._next_id

    def _closed(self, conn_id: int) -> None:
        with self._lock:
            if conn_id in self._conns:
                self._conns[conn_id].closed = time.monotonic()

    def _helo(self, conn_id: int, name: str) -> None:
        with self._lock:
            if conn_id in self._conns:
                self._conns[conn_id].helo = name

    def _message(self, conn_id: int, peer: str, env: Envelope) -> None:
        raw = env.original_content or b""
        hdrs = BytesHeaderParser().parsebytes(raw if isinstance(raw, bytes) else raw.encode())
        wanted = ("Message-ID", "Subject", "X-Lab-Seq", "X-Lab-Run")
        msg = SinkMessage(conn_id, peer, env.mail_from or "", list(env.rcpt_tos),
                          getattr(env, "mail_at", time.monotonic()), time.monotonic(),
                          {k: str(hdrs[k]) for k in wanted if hdrs[k] is not None})
        with self._lock:
            self._messages.append(msg)
            if conn_id in self._conns:
                self._conns[conn_id].messages += 1

    def _reply(self, conn_id: int, peer: str, stage: str, arg: str, reply: str) -> None:
        with self._lock:
            self._replies.append(SinkReply(conn_id, peer, stage, arg, reply, time.monotonic()))

    # -- inspection (any thread) ------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._conns.clear()
            self._messages.clear()
            self._replies.clear()

    @property
    def messages(self) -> list[SinkMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> list[SinkConnection]:
        """Connections that said EHLO/HELO (probe connections are left out)."""
        with self._lock:
            return [c for c in self._conns.values() if c.helo is not None]

    @property
    def replies(self) -> list[SinkReply]:
        with self._lock:
            return list(self._replies)

    def wait_messages(self, count: int, timeout: float) -> list[SinkMessage]:
        """Wait until at least ``count`` messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages
            if len(msgs) >= count:
                return msgs
            time.sleep(0.05)
        raise TimeoutError(f"sink got {len(self.messages)} of {count} messages in {timeout}s")

    def max_concurrency(self, peer: str | None = None) -> int:
        """Most connections open at the same time (optionally from one peer address)."""
        events: list[tuple[float, int]] = []
        for c in self.connections:
            if peer is not None and c.peer != peer:
                continue
            events.append((c.opened, 1))
            events.append((c.closed if c.closed is not None else float("inf"), -1))
        best = cur = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
            cur += delta
            best = max(best, cur)
        return best


def rule_by_address(table: dict[str, tuple[str, str]]) -> Rule:
    """Build a sink rule from ``{substring: (stage, reply)}``.

    For MAIL the substring is matched against the sender, for RCPT against the
    recipient, for DATA against any accepted recipient of the envelope.
    """
    def rule(stage: str, arg: str, env: Envelope) -> str | None:
        for needle, (want_stage, reply) in table.items():
            if want_stage != stage:
                continue
            hay = list(env.rcpt_tos) if stage == "DATA" else [arg]
            if any(needle in h for h in hay):
                return reply
        return None
    return rule


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# socketmap server
# ---------------------------------------------------------------------------

#: ``answer(name, key) -> reply`` such as ``"OK smtp:[127.0.0.1]:2525"`` or ``"NOTFOUND "``.
Answer = Callable[[str, str], str]


@dataclass
class SocketmapRequest:
    """One socketmap lookup as Postfix sent it."""

    at: float
    pid: int
    process: str
    name: str
    key: str
    reply: str


class NetstringError(ValueError):
    """The peer sent something that is not a netstring."""


def netstring(data: bytes) -> bytes:
    """Encode ``data`` as a netstring (``len:data,``)."""
    return b"%d:%s," % (len(data), data)


def read_netstring(rfile: Any, limit: int = 100_000) -> bytes | None:
    """Read one netstring from a binary file object; None at clean EOF."""
    digits = b""
    while True:
        ch = rfile.read(1)
        if not ch:
            if digits:
                raise NetstringError("EOF inside length")
            return None
        if ch == b":":
            break
        if not ch.isdigit() or len(digits) > 6:
            raise NetstringError(f"bad length byte {ch!r}")
        digits += ch
    size = int(digits or b"-1")
    if size < 0 or size > limit:
        raise NetstringError(f"bad length {digits!r}")
    data = rfile.read(size)
    if len(data) != size or rfile.read(1) != b",":
        raise NetstringError("truncated netstring")
    return data


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class _SocketmapHandler(socketserver.StreamRequestHandler):
    server: "_SocketmapServer"

    def handle(self) -> None:
        pid = _peer_pid(self.request)
        proc = _process_name(pid)
        sink = self.server.sink
        while not sink._stopping:
            try:
                raw = read_netstring(self.rfile)
            except (NetstringError, OSError):
                return
            if raw is None:
                return
            name, _, key = raw.decode("utf-8", "surrogateescape").partition(" ")
            reply = sink._answer(name, key)
            sink._record(SocketmapRequest(time.monotonic(), pid, proc, name, key, reply))
            if sink.delay:
                time.sleep(sink.delay)
            try:
                self.wfile.write(netstring(reply.encode("utf-8", "surrogateescape")))
                self.wfile.flush()
            except OSError:
                return


class _SocketmapServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: str, sink: "SocketmapSink") -> None:
        self.sink = sink
        super().__init__(path, _SocketmapHandler)


class SocketmapSink:
    """A recording socketmap server on a unix socket (mode 0666, so Postfix's
    unprivileged daemons can connect).

    ``answer`` decides each reply; it can be replaced while running. ``delay``
    (seconds) is slept before every reply to simulate a slow server.
    """

    def __init__(self, path: str | Path, answer: Answer | None = None, *, delay: float = 0.0) -> None:
        self.path = Path(path)
        self.answer: Answer = answer or (lambda name, key: "NOTFOUND ")
        self.delay = delay
        self._lock = threading.Lock()
        self._requests: list[SocketmapRequest] = []
        self._server: _SocketmapServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> "SocketmapSink":
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self._stopping = False
        self._server = _SocketmapServer(str(self.path), self)
        os.chmod(self.path, 0o666)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and remove the socket (Postfix then sees 'connection refused')."""
        self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.path.exists():
            self.path.unlink()

    def __enter__(self) -> "SocketmapSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spec(self, name: str) -> str:
        """The Postfix table spec, e.g. ``socketmap:unix:/path:transport``."""
        return f"socketmap:unix:{self.path}:{name}"

    def _answer(self, name: str, key: str) -> str:
        try:
            return self.answer(name, key)
        except Exception as exc:  # noqa: BLE001 - a lab server must keep answering
            return f"TEMP answer raised {type(exc).__name__}"

    def _record(self, req: SocketmapRequest) -> None:
        with self._lock:
            self._requests.append(req)

    @property
    def requests(self) -> list[SocketmapRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def keys(self, name: str | None = None, process: str | None = None) -> list[str]:
        """Keys asked so far, optionally only for one map name / asking process."""
        return [r.key for r in self.requests
                if (name is None or r.name == name) and (process is None or r.process == process)]


def match_answers(rules: Iterable[tuple[str, str]], default: str = "NOTFOUND ") -> Answer:
    """An ``Answer`` from ``[(regex over 'name key', reply), ...]``; first match wins."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def answer(name: str, key: str) -> str:
        line = f"{name} {key}"
        for rx, reply in compiled:
            if rx.search(line):
                return reply
        return default
    return answer
