"""The Exim line protocol: one request line in, one reply line out, then close.

Exim calls ``${readsocket{/run/yahoo-governor/exim.sock}{<request>\\n}{3s}{}{FAIL}}``:
it connects, writes the request, half-closes and reads to EOF. So a reply is one line
*without* a trailing newline (Exim keeps newlines in the expansion), and the server
closes after it. The full specification, with Exim configuration, is in
docs/protocols.md; in short::

    acquire <domain> <ip|auto> <msgid|-> <rcpt|->
        OK governed=no
        OK governed=yes ip=<ip> transport=<exim transport> lease=<lease> per_connection=<n>
        DEFER retry=<seconds> reason=<token>
    release <lease>                                         OK released=yes|no
    report <ip|lease|-> <domain|-> <event> <msgid|-> <rcpt|-> [<reply text>|-]
                                                            OK code=<code|-> actions=<list|->
    held <domain>                                           OK held=yes|no
    anything else                                           ERR <what is wrong>

Fields are positional and separated by exactly one space; every field is validated
(domain syntax, IP literal, Exim message id, recipient, lease id) before anything
reaches the store, and a bad one is answered ``ERR`` with nothing changed in Redis.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from governor import metrics
from governor.adapters import READ_TIMEOUT, Runtime, feedback
from governor.domains import InvalidDomain, normalise_domain
from governor.logsetup import kv
from governor.store.keys import parse_lease, valid_domain, valid_ip, valid_recipient
from governor.transports import exim_transport

MAX_LINE = 2048
_MSGID = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}")
_EVENT = re.compile(r"[a-z:]{1,40}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
WAITABLE = frozenset({"rate", "concurrency"})
# Exim raises these once for a whole batch (the first recipient's $local_part): they end
# every lease of that message on that IP, not just the one named.
BATCH_EVENTS = frozenset({"msg:defer", "msg:host:defer"})
UNAVAILABLE_RETRY = 60
LEASE_BOOK_MAX = 100_000
LEASE_BOOK_MIN_TTL = 600.0


class Refused(ValueError):
    """A request answered with ``ERR <message>``; the message never echoes raw input."""


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Acquire:
    domain: str
    ip: str | None          # None = auto (the store picks)
    msgid: str | None
    rcpt: str | None


@dataclass(frozen=True, slots=True)
class Release:
    lease: str


@dataclass(frozen=True, slots=True)
class Report:
    ip: str | None
    lease: str | None
    domain: str | None
    event: str
    msgid: str | None
    rcpt: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Held:
    domain: str


Request = Acquire | Release | Report | Held


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


@functools.lru_cache(maxsize=4096)
def _normal_domain(raw: str) -> str | None:
    """Normalised domain, None if invalid; cached: the same few names come every time."""
    try:
        return valid_domain(normalise_domain(raw))
    except (InvalidDomain, ValueError):
        return None


def _domain(raw: str) -> str:
    domain = _normal_domain(raw)
    if domain is None:
        raise Refused(f"bad domain {_shown(raw)}")
    return domain


def _ip(raw: str) -> str:
    try:
        return valid_ip(raw)
    except ValueError:
        raise Refused(f"bad ip {_shown(raw)}") from None


def _msgid(raw: str) -> str | None:
    if raw == "-":
        return None
    if not _MSGID.fullmatch(raw):
        raise Refused(f"bad message id {_shown(raw)}")
    return raw


def _rcpt(raw: str) -> str | None:
    if raw == "-":
        return None
    try:
        return valid_recipient(raw)
    except ValueError:
        raise Refused(f"bad recipient {_shown(raw)}") from None


def _lease(raw: str) -> str:
    try:
        parse_lease(raw)
    except ValueError:
        raise Refused(f"bad lease {_shown(raw)}") from None
    return raw


def _fields(text: str, n: int, usage: str) -> list[str]:
    parts = text.split(" ")
    if len(parts) != n:
        raise Refused(f"usage: {usage}")
    if "" in parts:
        raise Refused("empty field (fields are separated by exactly one space)")
    return parts


def parse(line: bytes) -> Request:
    """One request line (without its newline) -> a request; Refused names the problem."""
    if len(line) > MAX_LINE:
        raise Refused(f"line too long (at most {MAX_LINE} bytes)")
    if _CONTROL.search(line):
        raise Refused("control character in request")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("request is not UTF-8") from None
    verb, _, rest = text.partition(" ")
    if verb == "acquire":
        domain, ip, msgid, rcpt = _fields(rest, 4, "acquire <domain> <ip|auto> <msgid|-> <rcpt|->")
        return Acquire(_domain(domain), None if ip == "auto" else _ip(ip), _msgid(msgid), _rcpt(rcpt))
    if verb == "release":
        (lease,) = _fields(rest, 1, "release <lease>")
        return Release(_lease(lease))
    if verb == "report":
        return _report(rest)
    if verb == "held":
        (domain,) = _fields(rest, 1, "held <domain>")
        return Held(_domain(domain))
    if not verb:
        raise Refused("empty request")
    raise Refused(f"unknown request {_shown(verb)} (acquire, release, report, held)")


def _report(rest: str) -> Report:
    usage = "report <ip|lease|-> <domain|-> <event> <msgid|-> <rcpt|-> [<reply text>]"
    parts = rest.split(" ", 5)
    if len(parts) < 5:
        raise Refused(f"usage: {usage}")
    if "" in parts[:5]:
        raise Refused("empty field (fields are separated by exactly one space)")
    who, domain, event, msgid, rcpt = parts[:5]
    if not _EVENT.fullmatch(event):
        raise Refused(f"bad event {_shown(event)}")
    lease = ip = None
    if "|" in who:
        lease = _lease(who)
    elif who != "-":
        ip = _ip(who)
    text = parts[5].strip() if len(parts) > 5 else ""
    return Report(ip, lease, None if domain == "-" else _domain(domain), event, _msgid(msgid), _rcpt(rcpt),
                  "" if text == "-" else text)


# --------------------------------------------------------------------------- lease book
class LeaseBook:
    """(message id, recipient) -> lease, so ``report`` can release a lease even when Exim's
    ``$address_data`` is stale (docs/exim-levers.md fact 7).

    Bounded in size; entries are kept at least LEASE_BOOK_MIN_TTL even when the lease
    itself expires sooner: releasing an expired lease still removes its member from the
    store (it would otherwise stay until the IP looks full)."""

    def __init__(self, ttl: float, limit: int = LEASE_BOOK_MAX) -> None:
        self.ttl = max(ttl, LEASE_BOOK_MIN_TTL)
        self.limit = limit
        self._leases: collections.OrderedDict[tuple[str, str | None], tuple[float, str]] = collections.OrderedDict()

    def put(self, msgid: str, rcpt: str | None, lease: str) -> str | None:
        """Remember a lease; returns the lease it replaces (a finished earlier attempt)."""
        now = time.monotonic()
        leases = self._leases
        while leases:
            key, (expires, _) = next(iter(leases.items()))
            if expires > now and len(leases) < self.limit:
                break
            del leases[key]
        old = leases.pop((msgid, rcpt), None)
        leases[(msgid, rcpt)] = (now + self.ttl, lease)
        return old[1] if old is not None else None

    def pop(self, msgid: str, rcpt: str | None) -> str | None:
        entry = self._leases.pop((msgid, rcpt), None)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def pop_message(self, msgid: str, ip: str) -> list[str]:
        """Every remembered lease of ``msgid`` on ``ip`` (a batch-wide Exim event)."""
        prefix = ip + "|"
        keys = [k for k, (_, lease) in self._leases.items() if k[0] == msgid and lease.startswith(prefix)]
        return [lease for k in keys if (lease := self.pop(*k)) is not None]

    def __len__(self) -> int:
        return len(self._leases)


# --------------------------------------------------------------------------- answering
class EximHandler:
    """Answers one parsed request; never raises (unexpected errors become fail-mode answers)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = rt.config
        self.transports = {ip: exim_transport(e.name) for ip, e in rt.by_ip.items()}
        self.wait = max(0.0, min(cfg.exim.wait, cfg.exim.readsocket_timeout - 0.5))
        self.per_connection = cfg.limits.messages_per_connection
        self.book = LeaseBook(cfg.limits.lease_ttl)
        self.debug = rt.log.isEnabledFor(logging.DEBUG)

    async def answer(self, line: bytes) -> str:
        try:
            req = parse(line)
            if type(req) is Acquire:
                return await self.acquire(req)
            if type(req) is Report:
                return await self.report(req)
            if type(req) is Release:
                return await self.release(req)
            return await self.held(req)  # type: ignore[arg-type]
        except Refused as exc:
            self.rt.stats["exim_err"] += 1
            if self.debug:
                self.rt.log.debug(kv(event="exim-refused", why=str(exc)))
            return f"ERR {exc}"

    # ------------------------------------------------------------------ acquire
    async def acquire(self, req: Acquire) -> str:
        if req.ip is not None and req.ip not in self.rt.enabled_ips:
            raise Refused(f"ip {req.ip} is not an enabled pool IP")
        if not await self.rt.governed(req.domain):
            return "OK governed=no"
        started = time.monotonic()
        try:
            d = await self._acquire_or_wait(req.ip, started)
        except ValueError as exc:  # the store refused something parse() let through
            raise Refused(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - Redis down or broken: the fail mode answers
            self.rt.store_failed(exc, "acquire")
            return self._acquire_unavailable(req)
        self.rt.store_ok()
        metrics.DECISIONS.labels("granted" if d.granted else "denied", metrics.reason_label(d.reason)).inc()
        if self.debug:
            self.rt.log.debug(kv(event="acquire", domain=req.domain, msg=req.msgid, rcpt=req.rcpt, ip=d.ip,
                                 result="ok" if d.granted else "defer", reason=d.reason,
                                 retry=round(d.retry_after, 3), waited_ms=round((time.monotonic() - started) * 1e3)))
        if not d.granted:
            return f"DEFER retry={max(1, math.ceil(d.retry_after))} reason={d.reason}"
        if req.msgid is not None:
            old = self.book.put(req.msgid, req.rcpt, d.lease)
            if old is not None:  # a new attempt for the same address: the old one is over
                self.rt.spawn(self._release_quietly(old), "release")
        reply = (f"OK governed=yes ip={d.ip} transport={self.transports[d.ip]} lease={d.lease} "
                 f"per_connection={d.per_connection}")
        return reply + f" monitor={d.reason}" if d.monitor else reply

    async def _acquire_or_wait(self, ip: str | None, started: float) -> Any:
        """Acquire; when only rate (or concurrency) stands in the way and its end is within
        the wait budget, sleep until then and try again: Exim's queue runners are then
        paced exactly instead of deferring and coming back at their own interval."""
        deadline = started + self.wait
        while True:
            d = await self.rt.store.acquire(ip)
            if d.granted or d.reason not in WAITABLE:
                return d
            wake = time.monotonic() + d.retry_after + 0.0005
            if wake > deadline or not await self.rt.nap(wake - time.monotonic()):
                return d

    def _acquire_unavailable(self, req: Acquire) -> str:
        if self.rt.fail_open:
            egress = self.rt.by_ip[req.ip] if req.ip is not None else self.rt.next_open_egress()
            if egress is not None:
                self.rt.stats["failopen"] += 1
                metrics.DECISIONS.labels("failopen", "redis-down").inc()
                return (f"OK governed=yes ip={valid_ip(egress.ip)} transport={exim_transport(egress.name)} lease=- "
                        f"per_connection={self.per_connection} failopen=yes")
        metrics.DECISIONS.labels("denied", "redis-down").inc()
        return f"DEFER retry={UNAVAILABLE_RETRY} reason=governor-unavailable"

    async def _release_quietly(self, lease: str) -> None:
        try:
            await self.rt.store.release(lease)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            self.rt.store_failed(exc, "release")
            self.rt.lost("release")

    # ------------------------------------------------------------------ release
    async def release(self, req: Release) -> str:
        try:
            done = await self.rt.store.release(req.lease)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        except Exception as exc:  # noqa: BLE001
            self.rt.store_failed(exc, "release")
            self.rt.lost("release")
            return "OK released=no lost=yes"
        self.rt.store_ok()
        return "OK released=yes" if done else "OK released=no"

    # ------------------------------------------------------------------ report
    async def report(self, req: Report) -> str:
        leases = self._leases_to_release(req)
        ip = req.ip
        if req.lease is not None or (ip is None and leases):
            ip = parse_lease(req.lease or leases[0])[0]
        c = feedback.classify(req.text) if req.text else None
        fb = feedback.Feedback((c.code or c.cls) if c is not None else None)
        try:
            if leases:
                await asyncio.gather(*(self.rt.store.release(lease) for lease in leases))
            if ip is not None and ip in self.rt.by_ip and feedback.worth_recording(c) and (
                    req.domain is None or await self.rt.governed(req.domain)):
                fb = await feedback.record(self.rt.store, ip, c, self.rt.log, mta="exim", domain=req.domain,
                                           recipient=req.rcpt, queue_id=req.msgid, event=req.event)
            elif self.debug:
                feedback.log_event(self.rt.log, ip, c, fb, mta="exim", domain=req.domain, recipient=req.rcpt,
                                   queue_id=req.msgid, event=req.event, level=logging.DEBUG)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        except Exception as exc:  # noqa: BLE001
            self.rt.store_failed(exc, "report")
            self.rt.lost("report")
            return f"OK code={fb.code or '-'} actions=- lost=yes"
        self.rt.store_ok()
        return f"OK code={fb.code or '-'} actions={fb.actions_text}"

    def _leases_to_release(self, req: Report) -> list[str]:
        """A msg:* event ends the delivery attempt: its lease (by id, else by message id and
        recipient), plus, for batch-wide events, every lease of the message on that IP."""
        if not req.event.startswith("msg:"):
            return []
        leases = []
        remembered = self.book.pop(req.msgid, req.rcpt) if req.msgid is not None else None
        if req.lease is not None:
            leases.append(req.lease)
        elif remembered is not None:
            leases.append(remembered)
        if req.event in BATCH_EVENTS and req.msgid is not None:
            ip = parse_lease(leases[0])[0] if leases else req.ip
            if ip is not None:
                leases += [lease for lease in self.book.pop_message(req.msgid, ip) if lease not in leases]
        return leases

    # ------------------------------------------------------------------ held
    async def held(self, req: Held) -> str:
        """For Exim's hold_domains: held=yes when the domain is governed and no pool IP may
        send now (every one cooling, held or paused). Monitor mode never holds.

        Without Redis the answer is "no" in both fail modes: nothing is known to be held,
        and the fail mode is applied once, by ``acquire`` (fail-closed defers there)."""
        if not await self.rt.governed(req.domain):
            return "OK held=no"
        try:
            probe = await self.rt.store.assign(probe=True)
        except Exception as exc:  # noqa: BLE001
            self.rt.store_failed(exc, "held")
            return "OK held=no"
        self.rt.store_ok()
        if probe.granted or self.rt.monitor:
            return "OK held=no"
        return "OK held=yes"


# --------------------------------------------------------------------------- the listener
DRAIN_MAX = 1 << 20


def _drain(sock: socket.socket) -> None:
    """Read what the client sent beyond its line before closing: Linux resets a unix
    socket closed with unread data, and the client would lose the reply (ECONNRESET)."""
    total = 0
    try:
        while total < DRAIN_MAX:
            chunk = sock.recv(65536)
            if not chunk:
                return
            total += len(chunk)
    except OSError:  # EAGAIN: nothing more now; or the client is gone
        return

class _Client:
    """One readsocket call in progress."""

    __slots__ = ("sock", "buf", "deadline", "out", "drain")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = deadline
        self.out = b""
        self.drain = True  # unread input may be left: read it before closing


class EximListener:
    """Serves the Exim socket with plain non-blocking sockets and loop callbacks.

    Why not asyncio transports: every ``${readsocket}`` is a new connection, and an
    asyncio transport (a Task for the accept, protocol objects, selector juggling)
    costs about 85 µs of CPU per connection on this hardware, more than the whole
    rest of the request. Here a request costs accept, one recv (Exim has usually
    sent its line by the time we accept), one send and close; only a client that is
    slow to send is registered with the selector, and one timer sweeps those.
    """

    ACCEPT_BATCH = 64

    def __init__(self, sock: socket.socket, handler: EximHandler, timeout: float | None = None) -> None:
        self.sock = sock
        self.handler = handler
        self.timeout = READ_TIMEOUT if timeout is None else timeout
        self.loop = asyncio.get_running_loop()
        self.waiting: dict[int, _Client] = {}     # fd -> client still sending its line
        self.active: set[_Client] = set()         # being answered
        self.accepting = False
        self._sweeper: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self.accepting = True

    def stop(self) -> None:
        """Stop accepting (the daemon removes the socket file)."""
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    @property
    def busy(self) -> int:
        return len(self.active)

    def close_idle(self) -> None:
        """Drop clients that have not finished sending (Exim then applies its fail string)."""
        for client in list(self.waiting.values()):
            self._forget(client)
            client.sock.close()

    def abort(self) -> None:
        self.close_idle()
        for client in list(self.active):
            self.active.discard(client)
            client.sock.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # ------------------------------------------------------------------ reading
    def _accept(self) -> None:
        deadline = self.loop.time() + self.timeout
        for _ in range(self.ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                self._accept_failed(exc)
                return
            conn.setblocking(False)
            self._read(_Client(conn, deadline))

    def _accept_failed(self, exc: OSError) -> None:
        """Out of file descriptors (or similar): back off 100 ms instead of spinning."""
        rt = self.handler.rt
        rt.stats["accept_errors"] += 1
        if rt.stats["accept_errors"] % 1000 == 1:
            rt.log.error(kv(event="accept-failed", socket="exim", error=str(exc), count=rt.stats["accept_errors"]))
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        if self.accepting:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _read(self, client: _Client) -> None:
        while True:
            try:
                data = client.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                self._wait(client)
                return
            except OSError:
                self._forget(client)
                client.sock.close()
                return
            if not data:  # EOF: the line is whatever came (Exim half-closes after writing)
                client.drain = False
                self._start(client, client.buf)
                return
            buf = client.buf + data
            end = buf.find(b"\n")
            if end >= 0:
                # the usual case, one write ending in the newline: nothing is left unread
                client.drain = end != len(buf) - 1 or len(data) == 4096
                self._start(client, buf[:end])
                return
            if len(buf) > MAX_LINE:
                self._start(client, buf)  # parse() refuses it; no need to read the rest
                return
            client.buf = buf

    def _wait(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd not in self.waiting:
            self.waiting[fd] = client
            self.loop.add_reader(fd, self._read, client)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(0.5, self._sweep)

    def _forget(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self.waiting.pop(fd, None) is not None:
            self.loop.remove_reader(fd)

    def _sweep(self) -> None:
        """Answer clients that did not send a line within the read timeout."""
        self._sweeper = None
        now = self.loop.time()
        for client in [c for c in self.waiting.values() if c.deadline <= now]:
            self._forget(client)
            self.active.add(client)
            self._send(client, "ERR read timeout (send one line ending in a newline)")
        if self.waiting:
            self._sweeper = self.loop.call_later(0.5, self._sweep)

    # ------------------------------------------------------------------ answering
    def _start(self, client: _Client, line: bytes) -> None:
        self._forget(client)
        client.buf = b""
        self.active.add(client)
        self.loop.create_task(self._respond(client, line))

    async def _respond(self, client: _Client, line: bytes) -> None:
        try:
            reply = await self.handler.answer(line)
        except Exception as exc:  # noqa: BLE001 - never a traceback to Exim
            self.handler.rt.log.error(kv(event="internal-error", where="exim", error=f"{type(exc).__name__}: {exc}"))
            reply = "ERR internal error"
        self._send(client, reply)

    def _send(self, client: _Client, reply: str | bytes) -> None:
        """Write the reply (no newline) and close; a full socket buffer is waited out."""
        if client not in self.active:
            return  # aborted meanwhile
        data = reply.encode() if isinstance(reply, str) else reply
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = len(data)  # the caller went away; nothing to deliver
        if sent < len(data):
            client.out = data[sent:]
            self.loop.add_writer(client.sock.fileno(), self._flush, client)
            return
        self.active.discard(client)
        if client.drain:
            _drain(client.sock)
        client.sock.close()

    def _flush(self, client: _Client) -> None:
        self.loop.remove_writer(client.sock.fileno())
        self._send(client, client.out)
