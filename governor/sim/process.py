"""Synchronous handles on a running simulator, for tests, benchmarks and the e2e harness.

* :class:`SimProcess` starts ``governor sim`` as a child process (real MTAs talk to
  it like to any MX), waits until it listens and talks to its control socket.
* :class:`SimThread` runs a :class:`~governor.sim.server.Simulator` on its own event
  loop in a background thread — same interface, starts in milliseconds.

Both default to one listener on 127.0.0.1 with a kernel-chosen port; read the bound
ports from ``addresses``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

from governor.sim.control import request
from governor.sim.server import SimError, Simulator
from governor.sim.settings import Endpoint, Settings, parse_endpoint

#: ``governor sim`` without going through the ``governor`` console script: the same
#: options and code, and it does not depend on every other command module importing.
DEFAULT_COMMAND = (sys.executable, "-m", "governor.sim")


def ephemeral_settings(**overrides: Any) -> Settings:
    """Settings with one listener on 127.0.0.1 and a kernel-chosen port."""
    base = Settings(listen=(Endpoint("127.0.0.1", 0),))
    return dataclasses.replace(base, **overrides)


def _endpoint_pair(text: str) -> tuple[str, int]:
    ep = parse_endpoint(text)
    return ep.host, ep.port


class _Controlled:
    """Typed helpers over the line protocol; subclasses provide ``command()``."""

    def command(self, line: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ok(self, line: str) -> dict[str, Any]:
        answer = self.command(line)
        if not answer.get("ok"):
            raise SimError(f"control command {line!r} failed: {answer.get('error')}")
        return answer

    def stats(self, include_times: bool = True) -> dict[str, Any]:
        return self._ok("stats" if include_times else "summary")["stats"]

    def reset(self) -> None:
        self._ok("reset")

    def reset_ip(self, ip: str) -> None:
        self._ok(f"reset-ip {ip}")

    def set(self, key: str, value: Any) -> dict[str, Any]:
        return self._ok(f"set {key} {value}")["settings"]

    def cold(self, ip: str) -> None:
        self._ok(f"cold {ip}")

    def warm(self, ip: str) -> None:
        self._ok(f"warm {ip}")

    def block(self, ip: str) -> None:
        self._ok(f"block {ip}")

    def unblock(self, ip: str) -> None:
        self._ok(f"unblock {ip}")

    def limit(self, ip: str, key: str, value: int) -> None:
        """Give one sending IP its own max_conn / max_rate / max_per_conn."""
        self._ok(f"limit {ip} {key} {value}")

    def unlimit(self, ip: str) -> None:
        self._ok(f"unlimit {ip}")

    def fault(self, kind: str | None, every: int = 1) -> None:
        """Misbehave on every ``every``-th event (``drop-data``, ``garbage-data``,
        ``garbage-greeting``); None: behave again."""
        self._ok("fault none" if kind is None else f"fault {kind} {every}")

    def dump(self, path: str | os.PathLike[str]) -> Path:
        return Path(self._ok(f"dump {os.fspath(path)}")["path"])


class SimThread(_Controlled):
    """A :class:`Simulator` on a private event loop in a daemon thread."""

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or ephemeral_settings()
        self.clock = clock
        self.sim: Simulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> SimThread:
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="governor-sim", daemon=True)
        self._thread.start()
        started.result(timeout)
        return self

    def _run(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.sim = Simulator(self.settings, clock=self.clock)
            loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # report to start(), then end the thread
            loop.close()
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the simulator's loop and return its result."""
        if self._loop is None or self.sim is None:
            raise SimError("simulator thread not started")

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def command(self, line: str) -> dict[str, Any]:
        assert self.sim is not None
        return self.call(self.sim.command, line)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self.sim is not None
        return [(a.host, a.port) for a in self.sim.addresses]

    @property
    def sink_addresses(self) -> list[tuple[str, int]]:
        assert self.sim is not None
        return [(a.host, a.port) for a in self.sim.sink_addresses]

    def stop(self, timeout: float | None = None) -> None:
        if self._loop is None or self.sim is None or self._thread is None:
            return
        wait = (timeout if timeout is not None else self.settings.shutdown_timeout) + 5
        asyncio.run_coroutine_threadsafe(self.sim.stop(timeout), self._loop).result(wait)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(wait)
        self._thread = None

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimProcess(_Controlled):
    """``governor sim`` as a child process, driven through its control socket.

    ``settings`` are passed as a YAML file (``--config``); ``args`` are extra CLI
    flags, which override the file. The control socket and the process log live in
    a private temporary directory (see ``workdir`` and ``log_text()``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        args: Sequence[str] = (),
        command: Sequence[str] = DEFAULT_COMMAND,
        env: dict[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.settings = settings or ephemeral_settings()
        self.args = list(args)
        self.argv0 = list(command)
        self.env = env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.control_path: Path | None = None
        self.addresses: list[tuple[str, int]] = []
        self.sink_addresses: list[tuple[str, int]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def argv(self) -> list[str]:
        assert self.workdir is not None and self.control_path is not None
        return [*self.argv0, "--config", str(self.workdir / "sim.yaml"),
                "--control", str(self.control_path), *self.args]

    def start(self) -> SimProcess:
        # Short path: unix socket paths are limited to ~107 bytes.
        self._tmp = tempfile.TemporaryDirectory(prefix="gov-sim-")
        self.workdir = Path(self._tmp.name)
        self.control_path = self.workdir / "control.sock"
        config = self.settings.as_dict()
        config.pop("control", None)
        (self.workdir / "sim.yaml").write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        with open(self.workdir / "sim.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.control_path is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SimError(f"governor sim exited with {self.proc.returncode} before it was ready:\n"
                               f"{self.log_text()}")
            try:
                answer = request(str(self.control_path), "ping", timeout=2.0)
            except (OSError, ValueError):
                answer = None
            if answer and answer.get("ok"):
                self.addresses = [_endpoint_pair(a) for a in answer["listen"]]
                self.sink_addresses = [_endpoint_pair(a) for a in answer["sink"]]
                return
            if time.monotonic() > deadline:
                self.kill()
                raise SimError(f"governor sim not ready after {self.start_timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def command(self, line: str) -> dict[str, Any]:
        if self.control_path is None:
            raise SimError("simulator process not started")
        return request(str(self.control_path), line, timeout=30.0)

    def log_text(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "sim.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (kills and raises after ``timeout``)."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SimError(f"governor sim ignored SIGTERM for {timeout}s:\n{self.log_text()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop the process if needed and remove the temporary directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
