"""The SMTP side of the simulator: aiosmtpd sessions wired to :mod:`governor.sim.state`.

aiosmtpd does the SMTP; two small additions make it behave like a Yahoo MX:

* a reply *instead of* the 220 greeting (connect-stage TSS04/TS0x, "refused to talk
  to me" in Postfix terms) — :meth:`SimSMTP._handle_client`;
* hanging up right after a 421 (Yahoo closes after every 421), the way aiosmtpd's
  own QUIT does it — :meth:`SimSMTP.push` after a hook asked for it.

Everything else goes through aiosmtpd's handler hooks. The server advertises
PIPELINING like Yahoo does, so MTAs pipeline MAIL/RCPT/DATA and see a TSS04 "in
reply to MAIL FROM" exactly as in production logs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from governor.sim import replies
from governor.sim.replies import IP_KINDS, Reply
from governor.sim.settings import Endpoint, Settings, normalize_ip
from governor.sim.state import GARBAGE, Conn, SimState

log = logging.getLogger("governor.sim")

#: Yahoo advertises SIZE 41943040 (40 MiB).
DATA_SIZE_LIMIT = 41943040
GREETING_IDENT = "ESMTP ready"


class SimError(RuntimeError):
    """The simulator could not start (address in use, bad control path, ...)."""


class SimSMTP(SMTP):
    """One SMTP session; ``event_handler`` decides (Yahoo rules or plain sink)."""

    def __init__(self, handler: _BaseHandler, sim: Simulator, listener: str, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sim = sim
        self.listener = listener
        self.peer_ip = ""
        self.conn: Conn | None = None
        self._greeting_reply: Reply | None = None
        self._hang_up_after_push = False

    # -- connection lifecycle ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # first call (no STARTTLS here, but be exact)
            peer = transport.get_extra_info("peername")
            self.peer_ip = normalize_ip(peer[0]) if peer else "0.0.0.0"
            self.sim._sessions.add(self)
            self._greeting_reply = self.event_handler.connected(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sim._sessions.discard(self)
        self.event_handler.disconnected(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        """Send a connect-stage verdict instead of the 220 greeting, then hang up."""
        reply = self._greeting_reply
        if reply is None:
            await super()._handle_client()
            return
        self._greeting_reply = None
        await self.push(reply.text)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        await super().push(status)
        if self._hang_up_after_push:
            self._hang_up_after_push = False
            self.hang_up()

    # -- used by handlers and by shutdown ---------------------------------------------------

    def hang_up_after_reply(self) -> None:
        """Close the session right after the reply the current hook returns."""
        self._hang_up_after_push = True

    def hang_up(self) -> None:
        """Stop reading (pipelined commands are discarded) and close after the flush."""
        task = self._handler_coroutine
        if task is not None and not task.done():
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        """No transaction in progress (safe to close at shutdown)."""
        return self.envelope is None or self.envelope.mail_from is None

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine


class _BaseHandler:
    """Hooks shared by both listener roles."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.state = sim.state

    def connected(self, server: SimSMTP) -> Reply | None:
        return None

    def disconnected(self, server: SimSMTP) -> None:
        return None

    async def handle_EHLO(self, server: SimSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self._abandon(server)
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_HELO(self, server: SimSMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        self._abandon(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: SimSMTP, session: Session, envelope: Envelope) -> Any:
        self._abandon(server)
        return MISSING

    def _abandon(self, server: SimSMTP) -> None:
        """The current transaction (if any) is gone."""

    def _closing(self, server: SimSMTP) -> str | None:
        """During shutdown no new transaction starts: 421 and hang up."""
        if self.sim.closing:
            server.hang_up_after_reply()
            return replies.SHUTDOWN
        return None


class YahooHandler(_BaseHandler):
    """Yahoo rules: every decision comes from :class:`SimState`."""

    def connected(self, server: SimSMTP) -> Reply | None:
        self.sim._count_listener(server.listener)
        conn, reply = self.state.connect(server.peer_ip)
        server.conn = conn
        if reply is not None:
            self._log(server, reply, "connect")
        elif self.state.take_fault("garbage-greeting"):
            reply = Reply("garbage", GARBAGE, True)
            log.info("%s via %s at connect: fault garbage-greeting", server.peer_ip, server.listener)
        return reply

    def disconnected(self, server: SimSMTP) -> None:
        if server.conn is not None:
            self.state.disconnect(server.conn)

    def _abandon(self, server: SimSMTP) -> None:
        if server.conn is not None:
            self.state.rset(server.conn)

    async def handle_MAIL(self, server: SimSMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        shutdown = self._closing(server)
        if shutdown is not None:
            return shutdown
        assert server.conn is not None
        return self._answer(server, self.state.mail(server.conn), "mail")

    async def handle_RCPT(self, server: SimSMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        assert server.conn is not None
        return self._answer(server, self.state.rcpt(server.conn, address), "rcpt")

    async def handle_DATA(self, server: SimSMTP, session: Session, envelope: Envelope) -> str:
        assert server.conn is not None
        fault = self._data_fault(server)
        if fault is not None:
            return fault
        self.state.data(server.conn, len(envelope.rcpt_tos))
        if self.sim.closing:
            server.hang_up_after_reply()
        return replies.ACCEPTED

    def _data_fault(self, server: SimSMTP) -> str | None:
        """An injected end-of-DATA fault: the message is not accepted, the session ends.
        ``drop-data`` aborts the connection (the reply written after it goes nowhere)."""
        assert server.conn is not None
        for kind in ("drop-data", "garbage-data"):
            if self.state.take_fault(kind):
                self.state.rset(server.conn)
                log.info("%s via %s at data: fault %s", server.peer_ip, server.listener, kind)
                if kind == "drop-data":
                    server.abort()
                    return replies.ACCEPTED
                server.hang_up_after_reply()
                return GARBAGE
        return None

    def _answer(self, server: SimSMTP, reply: Reply | None, stage: str) -> Any:
        if reply is None:
            return MISSING  # aiosmtpd's own 250 and envelope bookkeeping
        self._log(server, reply, stage)
        if reply.close:
            server.hang_up_after_reply()
        return reply.text

    @staticmethod
    def _log(server: SimSMTP, reply: Reply, stage: str) -> None:
        level = logging.INFO if reply.kind in IP_KINDS else logging.DEBUG
        log.log(level, "%s via %s at %s: %s", server.peer_ip, server.listener, stage, reply.text)


class SinkHandler(_BaseHandler):
    """Plain sink for non-Yahoo mail: accepts everything, only counts."""

    def connected(self, server: SimSMTP) -> Reply | None:
        self.state.sink_connect(server.peer_ip)
        return None

    async def handle_MAIL(self, server: SimSMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        shutdown = self._closing(server)
        return MISSING if shutdown is None else shutdown

    async def handle_DATA(self, server: SimSMTP, session: Session, envelope: Envelope) -> str:
        self.state.sink_accept(server.peer_ip, len(envelope.rcpt_tos))
        if self.sim.closing:
            server.hang_up_after_reply()
        return replies.ACCEPTED


class Simulator:
    """A pool of simulated Yahoo MX listeners sharing one per-IP view, plus optional sinks.

    Use from asyncio: ``await sim.start()`` … ``await sim.stop()``; ``stats()``,
    ``reset()`` and ``command(line)`` must be called on the simulator's loop
    (:class:`governor.sim.process.SimThread` does that for you from other threads).
    """

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.state = SimState(settings or Settings(), clock)
        self.closing = False
        self.addresses: list[Endpoint] = []
        self.sink_addresses: list[Endpoint] = []
        self.control_address: str | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._control: Any = None
        self._sessions: set[SimSMTP] = set()
        self._listener_counts: dict[str, int] = {}
        self._started = False
        self._stopped = False

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.state.settings = value

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener (all or nothing), then the control interface."""
        if self._started:
            raise SimError("simulator already started")
        self._started = True
        try:
            for ep in self.settings.listen:
                self.addresses.append(await self._listen(ep, YahooHandler(self)))
            for ep in self.settings.sink:
                self.sink_addresses.append(await self._listen(ep, SinkHandler(self)))
            if self.settings.control is not None:
                from governor.sim.control import ControlServer

                self._control = ControlServer(self, self.settings.control)
                self.control_address = await self._control.start()
        except BaseException:
            await self._close_servers()
            raise

    async def _listen(self, ep: Endpoint, handler: _BaseHandler) -> Endpoint:
        loop = asyncio.get_running_loop()
        label = [str(ep)]  # becomes the bound address once the kernel chose a port
        try:
            server = await loop.create_server(
                partial(self._protocol, handler, label), host=ep.host, port=ep.port, reuse_address=True
            )
        except OSError as exc:
            raise SimError(f"cannot listen on {ep}: {exc.strerror or exc}") from None
        self._servers.append(server)
        bound = Endpoint(ep.host, server.sockets[0].getsockname()[1])
        label[0] = str(bound)
        if isinstance(handler, YahooHandler):
            self._listener_counts.setdefault(label[0], 0)
        return bound

    def _protocol(self, handler: _BaseHandler, label: list[str]) -> SimSMTP:
        s = self.settings
        return SimSMTP(
            handler, self, label[0], hostname=s.hostname, ident=GREETING_IDENT,
            data_size_limit=DATA_SIZE_LIMIT, timeout=s.idle_timeout, loop=asyncio.get_running_loop(),
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish, then close every session.

        Idle sessions are closed at once; a session inside a transaction gets its
        end-of-DATA reply and is closed after it (new MAIL gets 421 shutting down).
        Whatever is still open after ``timeout`` (default ``shutdown_timeout``) is aborted.
        """
        if self._stopped:
            return
        self._stopped = True
        self.closing = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tasks = {t for s in self._sessions if (t := s.handler_task) is not None}
        while self._sessions and loop.time() < deadline:
            for session in list(self._sessions):
                if session.idle:
                    session.hang_up()
            await asyncio.sleep(0.02)
        for session in list(self._sessions):
            session.abort()
        tasks |= {t for s in self._sessions if (t := s.handler_task) is not None}
        pending = {t for t in tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await self._close_servers()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        if self._control is not None:
            await self._control.stop()
            self._control = None

    # -- accounting and control ------------------------------------------------------------------

    def _count_listener(self, label: str) -> None:
        self._listener_counts[label] = self._listener_counts.get(label, 0) + 1

    def stats(self, include_times: bool = True) -> dict[str, Any]:
        """Accounting as JSON-ready dict: ``total``, ``ips``, ``sink``, ``listeners``, ``settings``."""
        out = self.state.stats(include_times)
        out["listeners"] = dict(self._listener_counts)
        out["listen"] = [str(a) for a in self.addresses]
        out["sink"]["listen"] = [str(a) for a in self.sink_addresses]
        out["settings"] = self.settings.as_dict()
        return out

    def reset(self) -> None:
        """Forget all counters and standings (settings, cold and blocked lists stay)."""
        self.state.reset()
        self._listener_counts = dict.fromkeys(self._listener_counts, 0)

    def command(self, line: str) -> dict[str, Any]:
        """Run one control-protocol line; the answer is what the control socket sends."""
        from governor.sim.control import execute

        return execute(self, line)

    def dump(self, path: str | os.PathLike[str]) -> Path:
        """Write the full stats atomically to ``path`` (JSON)."""
        return write_json(path, self.stats())


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON next to ``path`` and rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, target)
    return target
