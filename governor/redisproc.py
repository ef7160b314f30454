"""Start and stop a private, throwaway redis-server.

The demo, the test suite and the benchmarks never touch a system Redis: they run
their own ``redis-server`` on a unix socket (and a loopback TCP port) inside a
scratch directory, and shut it down afterwards.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class RedisProcError(RuntimeError):
    """redis-server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


@dataclass
class RedisProc:
    """One private redis-server; use as a context manager or call start()/stop()."""

    workdir: Path | None = None
    port: int | None = None
    persist: bool = False
    extra_args: list[str] = field(default_factory=list)
    executable: str = "redis-server"
    proc: subprocess.Popen | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def unixsocket(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "redis.sock"

    @property
    def url(self) -> str:
        """Unix-socket URL (the fastest transport; what the product defaults to)."""
        return f"unix://{self.unixsocket}"

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisProc":
        exe = shutil.which(self.executable)
        if exe is None:
            raise RedisProcError(
                f"{self.executable} not found on PATH; run scripts/setup.sh (installs redis-server)"
            )
        if self.workdir is None:
            # Short path: unix socket paths are limited to ~107 bytes.
            self._tmp = tempfile.TemporaryDirectory(prefix="gov-redis-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        args = [
            exe, "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", str(self.unixsocket), "--unixsocketperm", "770",
            "--dir", str(self.workdir), "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
            "--save", "", "--appendonly", "yes" if self.persist else "no",
            *self.extra_args,
        ]
        if self.persist:
            args += ["--appendfsync", "everysec"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisProcError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RedisProcError(f"redis-server did not answer PING within {timeout}s")

    def ping(self) -> bool:
        """True when the server answers PING on its unix socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.unixsocket))
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                # a server with requirepass/ACLs answers NOAUTH: it is up all the same
                return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (fault injection); start() brings it back on the same socket/port."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RedisProc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def environ_url() -> str | None:
    """A Redis URL given by the environment (GOVERNOR_REDIS_URL), if any."""
    return os.environ.get("GOVERNOR_REDIS_URL") or None
