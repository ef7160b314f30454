"""Lane: one lean, auto-pipelined asyncio connection to Redis (the daemon's hot path).

Why not redis.asyncio: it spends about 100 µs of CPU per command (pool checkout under
a lock, connection health checks, a parser object per call), which alone would cap the
socket daemon below its target of 5,000 MTA requests a second on two cores. A Lane
encodes RESP itself and parses replies with hiredis. A command on an idle connection
is written at once; while replies are outstanding, every command issued in one
event-loop iteration goes out with one write: concurrent MTA requests are pipelined
for free, and Redis sees few, full packets.

Behaviour kept from redis-py, so the store and the daemon see the same errors:

- redis.exceptions classes: ConnectionError (incl. BusyLoadingError), TimeoutError,
  ResponseError (NoScriptError for NOSCRIPT);
- one immediate retry on ConnectionError (a connection that died with a Redis
  restart is replaced transparently; a Redis that is really down fails fast);
- a timed-out command fails with TimeoutError and drops the connection (its reply
  could still arrive and would be taken for the next command's), never retried;
- AUTH / SELECT from the URL and config on every (re)connect.

The connection opens lazily inside the running loop and reopens by itself after
Redis comes back; nobody ever needs to restart the daemon.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from typing import Any

import hiredis
from redis.connection import parse_url
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from governor.store.connection import client_options, redis_url, tls_options

_ERRORS = (("NOSCRIPT", NoScriptError), ("LOADING", BusyLoadingError))


_BULK: dict[Any, bytes] = {}
_BULK_MAX = 8192


def _bulk(a: Any) -> bytes:
    """One argument as a RESP bulk string; floats as repr, like redis-py; no bools."""
    if isinstance(a, str):
        raw = a.encode()
    elif isinstance(a, bytes):
        raw = a
    elif isinstance(a, bool) or not isinstance(a, (int, float)):
        raise TypeError(f"cannot send {type(a).__name__} to Redis")
    else:
        raw = (str(a) if isinstance(a, int) else repr(a)).encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def _encode(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (an array of bulk strings).

    The hot path sends the same key names and limit arguments with every acquire, so
    str and int arguments are memoised (a str never equals an int, so they cannot mix
    up; floats and bools bypass the memo). The memo is simply emptied when full: the
    random lease tokens fill it, the constants come back on the next call.
    """
    memo = _BULK
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        t = type(a)
        if t is str or t is int:
            b = memo.get(a)
            if b is None:
                if len(memo) >= _BULK_MAX:
                    memo.clear()
                b = memo[a] = _bulk(a)
        else:
            b = _bulk(a)
        out.append(b)
    return b"".join(out)


def _error(reply: ResponseError) -> Exception:
    text = str(reply)
    for prefix, cls in _ERRORS:
        if text.startswith(prefix):
            return cls(text)
    return reply


class _Conn(asyncio.Protocol):
    """One socket: a FIFO of futures answered in order; writes batched per loop turn."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=ResponseError)
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            if not pending:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            fut, _ = pending.popleft()
            if fut.done():
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost{f': {exc}' if exc else ''}"))

    # -- sending
    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.closed:
            raise RedisConnectionError("connection to Redis closed")
        fut = self.loop.create_future()
        if self.pending:  # replies outstanding: batch with what else this loop turn sends
            if not self.out:
                self.loop.call_soon(self._flush)
            self.out.append(_encode(args))
        else:  # idle connection: nothing to batch with, don't wait a loop turn
            self.transport.write(_encode(args))  # type: ignore[union-attr]
        self.pending.append((fut, self.loop.time() + self.timeout))
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout, self._check_timeout)
        return fut

    def _flush(self) -> None:
        if self.out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.pending or self.closed:
            return
        overdue = self.pending[0][1] - self.loop.time()
        if overdue <= 0:
            self.fail(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self._timer = self.loop.call_later(overdue, self._check_timeout)

    def fail(self, exc: Exception) -> None:
        """Fail everything in flight and drop the socket (it is out of step now)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a caller that gave up must not log "never retrieved"
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()


class Lane:
    """See the module docstring. Use from one event loop; ``aclose()`` when done."""

    def __init__(self, url: str, *, timeout: float = 0.5, connect_timeout: float = 1.0,
                 username: str | None = None, password: str | None = None,
                 ssl_ca_certs: str | None = None, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None) -> None:
        target = parse_url(url)
        self.path: str | None = target.get("path")
        self.host: str | None = target.get("host")
        self.port: int = int(target.get("port") or 6379)
        self.tls = target.get("connection_class") is not None and self.path is None
        self.db = int(target.get("db") or 0)
        self.username = target.get("username") or username
        self.password = target.get("password") or password
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._tls_files = (ssl_ca_certs, ssl_certfile, ssl_keyfile)
        self._conn: _Conn | None = None
        self._connecting: asyncio.Future[_Conn] | None = None
        self._shas: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: Any) -> Lane:
        opts = client_options(config, _NoRetry)
        return cls(redis_url(config), timeout=opts["socket_timeout"], connect_timeout=opts["socket_connect_timeout"],
                   username=opts.get("username"), password=opts.get("password"), **tls_options(config))

    @property
    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ commands
    async def execute(self, *args: Any) -> Any:
        """One command; retried once when an open connection broke (not when connecting
        failed: Redis is down then, and the caller's fail mode should apply at once)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        try:
            return await conn.send(args)
        except RedisConnectionError:
            return await (await self._connection()).send(args)

    async def script(self, text: str, keys: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        """EVALSHA, falling back to EVAL (which caches the script again) after a SCRIPT
        FLUSH or a Redis restart."""
        sha = self._shas.get(text)
        if sha is None:
            sha = self._shas[text] = hashlib.sha1(text.encode()).hexdigest()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", text, len(keys), *keys, *args)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()

    # ------------------------------------------------------------------ connection
    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        connecting = self._connecting
        if connecting is None:  # one attempt shared by every waiting request
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(self._connected)
        return await asyncio.shield(connecting)

    def _connected(self, attempt: asyncio.Future[_Conn]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved: the waiters got it

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        timeout = self.timeout

        def factory() -> _Conn:
            return _Conn(timeout)

        try:
            if self.path is not None:
                opening = loop.create_unix_connection(factory, self.path)
            else:
                ctx = self._ssl_context() if self.tls else None
                opening = loop.create_connection(factory, self.host, self.port, ssl=ctx)
            _, conn = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise _ConnectFailed(f"Error connecting to Redis at {self.where}: {exc or 'timeout'}") from None
        try:
            hello = []
            if self.password:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                hello.append(conn.send(auth))
            if self.db:
                hello.append(conn.send(("SELECT", self.db)))
            for fut in hello:
                await fut
        except BaseException:
            conn.fail(RedisConnectionError("Redis refused the connection setup"))
            raise
        self._conn = conn
        return conn


    def _ssl_context(self) -> ssl.SSLContext:
        """Verify the server against ``redis.tls.ca_file`` (else the system CAs); present
        the client certificate when one is configured."""
        ca, cert, key = self._tls_files
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx


class _ConnectFailed(RedisConnectionError):
    """Redis could not be reached at all (as opposed to a connection that broke)."""


class _NoRetry:
    """client_options() wants a Retry class; the Lane does its own single retry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass
