"""``governor serve``: the MTA-facing asyncio daemon, shared by Postfix and Exim.

One process, one event loop, two listeners:

- ``sockets.exim``: the Exim line protocol (governor.adapters.exim_socket),
- ``sockets.socketmap``: Postfix's socketmap (governor.adapters.socketmap),

both answered through one AsyncStore (never blocking the loop on Redis). Admin
operations are not on these sockets: they are the ``governor`` CLI's job.

Why it is built this way:

- **Sockets** are created with a restrictive umask, then chowned/chmodded to
  ``sockets.owner``/``group``/``mode`` *before* ``listen()``, so no process ever sees a
  socket with the wrong permissions. A stale socket file is replaced; a live one
  (another daemon) or a non-socket file is refused.
- **Redis down** never stops the daemon: the store reconnects by itself, and until
  then the adapters answer by ``redis_down`` (fail-open / fail-closed).
- **SIGTERM/SIGINT**: stop accepting, close idle connections, wake requests waiting
  for a rate slot, let in-flight requests and background feedback finish within
  5 s, then exit 0. Socket files are removed.
- **Start-up** errors (socket in use, unknown owner, path too long) are one clear
  line and exit status 1; without ``--foreground`` the starting process waits until
  the daemon listens (or failed), so init scripts see the real outcome.
"""
from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from governor import __version__, logsetup, metrics
from governor.adapters import Runtime
from governor.adapters.exim_socket import EximHandler, EximListener
from governor.adapters.socketmap import Connection, SocketmapConnection, SocketmapHandler, SocketmapListener
from governor.config import Config
from governor.logsetup import kv
from governor.store import AsyncStore, Store

SHUTDOWN_GRACE = 5.0
BACKLOG = 1024
UNIX_PATH_MAX = 107


class DaemonError(Exception):
    """The daemon cannot start; ``str()`` is one line for the operator."""


@dataclass(frozen=True)
class SocketSpec:
    """``unix:/path`` (or ``/path``) or ``inet:host:port``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> SocketSpec:
        if spec.startswith("inet:"):
            host, _, port = spec[5:].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise DaemonError(f"bad socket {spec!r}: expected inet:HOST:PORT")
            return cls("inet", host=host.strip("[]"), port=int(port))
        path = spec[5:] if spec.startswith("unix:") else spec
        if not path.startswith("/"):
            raise DaemonError(f"bad socket {spec!r}: expected unix:/absolute/path or inet:HOST:PORT")
        return cls("unix", path=path)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"inet:{self.host}:{self.port}"


def owner_ids(owner: str | None, group: str | None) -> tuple[int, int]:
    """(uid, gid) for sockets.owner/group; -1 = leave as is. Unknown names are an error."""
    uid = gid = -1
    if owner:
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise DaemonError(f"sockets.owner: no such user {owner!r}") from None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"sockets.group: no such group {group!r}") from None
    return uid, gid


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: left behind by a process that died
        return
    finally:
        probe.close()
    raise DaemonError(f"{path} is in use by another process (is governor serve already running?)")


def bind_unix(path: str, mode: int, uid: int = -1, gid: int = -1) -> socket.socket:
    """A listening unix socket with its final owner and mode before anyone can connect."""
    if len(path.encode()) > UNIX_PATH_MAX:
        raise DaemonError(f"socket path longer than {UNIX_PATH_MAX} bytes: {path}")
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


class Daemon:
    """The daemon's life cycle; ``await run()`` serves until SIGTERM/SIGINT or :meth:`request_stop`."""

    def __init__(self, config: Config, *, log: logging.Logger | None = None, store: Any = None,
                 domains: Any = None) -> None:
        self.config = config
        self.log = log or logging.getLogger("governor.daemon")
        self.store = store
        self.domains = domains
        self.rt: Runtime | None = None
        self.listeners: list[EximListener | SocketmapListener] = []
        self.paths: dict[str, tuple[int, int]] = {}
        self._stop: asyncio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        cfg = self.config
        exim = SocketSpec.parse(cfg.sockets.exim)
        smap = SocketSpec.parse(cfg.sockets.socketmap)
        uid, gid = owner_ids(cfg.sockets.owner, cfg.sockets.group)
        self._stop = asyncio.Event()
        if self.store is None:
            self.store = AsyncStore.connect(cfg)
        self.rt = Runtime(cfg, self.store, domains=self.domains, log=self.log)
        _warm_up()
        try:
            if exim.kind != "unix":
                raise DaemonError(f"sockets.exim must be a unix socket path, got {exim}")
            sock = self._bind(exim.path, uid, gid)
            listener = EximListener(sock, EximHandler(self.rt))
            listener.start()
            self.listeners.append(listener)
            await self._listen_socketmap(smap, SocketmapHandler(self.rt), uid, gid)
        except BaseException:
            self._stop_listeners()
            self._remove_socket_files()
            raise
        self._serve_metrics()
        self.log.log(logsetup.NOTICE, kv(
            event="start", version=__version__, exim=exim, socketmap=smap, mode=cfg.mode,
            redis_down=cfg.redis_down, pool=len(self.rt.enabled_ips), config=cfg.source))
        await self._probe_redis()

    def _bind(self, path: str, uid: int, gid: int) -> socket.socket:
        sock = bind_unix(path, self.config.sockets.mode, uid, gid)
        st = os.stat(path)
        self.paths[path] = (st.st_dev, st.st_ino)
        return sock

    async def _listen_socketmap(self, spec: SocketSpec, handler: SocketmapHandler, uid: int, gid: int) -> None:
        loop = asyncio.get_running_loop()
        live: set[Connection] = set()

        def factory() -> SocketmapConnection:
            return SocketmapConnection(live, handler)

        if spec.kind == "inet":
            try:
                server = await loop.create_server(factory, spec.host, spec.port, backlog=BACKLOG, reuse_address=True)
            except OSError as exc:
                raise DaemonError(f"cannot listen on {spec}: {exc.strerror or exc}") from None
        else:
            server = await loop.create_unix_server(factory, sock=self._bind(spec.path, uid, gid), backlog=BACKLOG)
        self.listeners.append(SocketmapListener(server, live))

    def _serve_metrics(self) -> None:
        """Prometheus /metrics on metrics.listen; per-IP gauges come from a blocking Store
        (scrapes run in the exporter's own thread, never on the event loop)."""
        listen = self.config.metrics.listen
        if listen is None:
            return
        try:
            port = metrics.serve(listen, Store.connect(self.config).status)
        except OSError as exc:
            self.log.warning(kv(event="metrics-unavailable", listen=listen, error=exc.strerror or str(exc)))
            return
        if port is not None:
            self.log.info(kv(event="metrics", listen=f"{listen.rpartition(':')[0]}:{port}"))

    async def _probe_redis(self) -> None:
        """Tell the operator at once when Redis is not there (the daemon serves anyway)."""
        try:
            await self.store.now()
        except Exception as exc:  # noqa: BLE001
            self.log.warning(kv(event="redis-unavailable", op="start", error=f"{type(exc).__name__}: {exc}",
                                redis_down=self.config.redis_down))

    # ------------------------------------------------------------------ run / stop
    async def run(self, ready: Callable[[], None] | None = None, *, signals: bool = True) -> None:
        """Start, serve until asked to stop, shut down within SHUTDOWN_GRACE.

        ``signals=False`` (a daemon in a non-main thread, as in the tests): stop with
        :meth:`request_stop` (``loop.call_soon_threadsafe``)."""
        await self.start()
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if signals else ()
        for sig in handled:
            loop.add_signal_handler(sig, self._hup if sig == signal.SIGHUP else self.request_stop)
        try:
            if ready is not None:
                ready()
            assert self._stop is not None
            await self._stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _hup(self) -> None:
        self.log.log(logsetup.NOTICE, kv(event="sighup", note="configuration is read at start; restart to apply"))

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests within SHUTDOWN_GRACE, release everything."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE
        self._stop_listeners()
        rt = self.rt
        if rt is not None:
            rt.stop()
        while loop.time() < deadline:
            for listener in self.listeners:
                listener.close_idle()
            if not any(listener.busy for listener in self.listeners) and not (rt and rt.tasks):
                break
            await asyncio.sleep(0.01)
        unfinished = sum(listener.busy for listener in self.listeners) + (len(rt.tasks) if rt else 0)
        for listener in self.listeners:
            listener.abort()
        if rt is not None:
            for task in list(rt.tasks):
                task.cancel()
            await asyncio.sleep(0)
        if self.store is not None:
            await self.store.aclose()
        self._remove_socket_files()
        stats = dict(rt.stats) if rt is not None else {}
        self.log.log(logsetup.NOTICE, kv(event="stop", unfinished=unfinished, **stats))

    def _stop_listeners(self) -> None:
        for listener in self.listeners:
            listener.stop()

    def _remove_socket_files(self) -> None:
        """Remove our socket files (not a newer daemon's that replaced them)."""
        for path, ident in self.paths.items():
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == ident:
                    os.unlink(path)
            except OSError:
                pass
        self.paths.clear()


class ThreadedDaemon:
    """A Daemon on its own event loop in a background thread, for tests, labs and demos.

    ``with ThreadedDaemon(config) as d:`` returns once both sockets listen (start-up
    errors are raised in the caller); leaving the block shuts it down like SIGTERM.
    """

    def __init__(self, config: Config, **kwargs: Any) -> None:
        import threading

        self.daemon = Daemon(config, **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="governor-serve", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.daemon.run(self._ready.set, signals=False)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> ThreadedDaemon:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = SHUTDOWN_GRACE + 5) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(timeout)


def _warm_up() -> None:
    """Load the reply rules and the policy now, not on the first Yahoo reply."""
    import importlib

    from governor.classify import classify

    importlib.import_module("governor.policy")
    classify("421 4.7.0 [TSS04] warm-up")


# --------------------------------------------------------------------------- process level
def _daemonize() -> int:
    """Detach (double fork, new session, cwd /, stdio on /dev/null). The original process
    waits on a pipe and exits 0 once the daemon listens, or 1 with its error message."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        if message == "ok":
            os._exit(0)
        print(f"governor: {message or 'serve exited during start-up (see the log)'}", file=sys.stderr)
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return write_end


def _tell(fd: int | None, message: str) -> None:
    if fd is not None:
        try:
            os.write(fd, message.encode())
            os.close(fd)
        except OSError:
            pass


def serve(config: Config, *, foreground: bool = False, pidfile: str | None = None, stderr: bool | None = None,
          log_level: str | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status (0, or 1 when it could not start)."""
    if not foreground and stderr is None and config.logging.syslog and not any(
            os.path.exists(p) for p in logsetup.SYSLOG_SOCKETS):
        print("governor: no syslog socket; logs would be lost when detached (use --foreground)", file=sys.stderr)
    notify = None if foreground else _daemonize()
    log = logsetup.setup(config.logging, stderr=stderr, level=log_level)
    wrote_pid = False

    def ready() -> None:
        nonlocal wrote_pid, notify
        if pidfile:
            with open(pidfile, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
            wrote_pid = True
        _tell(notify, "ok")
        notify = None

    try:
        asyncio.run(Daemon(config, log=log).run(ready))
    except DaemonError as exc:
        log.error(kv(event="start-failed", error=str(exc)))
        if notify is not None:
            _tell(notify, str(exc))
        elif not logsetup.to_stderr():
            print(f"governor: {exc}", file=sys.stderr)
        return 1
    finally:
        if wrote_pid and pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        logsetup.shutdown()
    return 0
