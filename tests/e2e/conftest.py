"""Shared fixtures of the end-to-end tests: a governed Postfix lab (private redis-server,
the Yahoo simulator, ``governor serve`` / ``milter`` / ``queue-agent`` subprocesses,
Postfix finished by ``governor postfix-config --apply``), built by
:class:`governor.demo.PostfixLab`.

Fixtures other MTAs' e2e tests may reuse: ``lab_workdir`` (a /tmp directory user
postfix/Debian-exim can traverse), ``private_redis`` (a RedisProc of its own, for
tests that stop and restart Redis), ``yahoo_sim`` (SimProcess: one Yahoo listener and
one plain sink on 127.0.0.1), ``lab_factory`` (PostfixLab with options, cleaned up).

Until ``governor serve`` exists (governor/cli/serve_cmd.py) the Postfix tests skip;
with GOVERNOR_E2E_STANDIN=1 they run against a small in-process stand-in of its two
socketmaps (scaffolding for developing the other parts, not what the tests are for).
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from governor.demo import LabOptions, PostfixLab, have_serve
from governor.redisproc import RedisProc
from governor.sim import SimProcess, ephemeral_settings
from governor.sim.settings import Endpoint

USE_STANDIN = os.environ.get("GOVERNOR_E2E_STANDIN") == "1"


@pytest.fixture
def lab_workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gpl-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_redis(lab_workdir: Path) -> Iterator[RedisProc]:
    with RedisProc(workdir=lab_workdir / "redis") as proc:
        yield proc


@pytest.fixture
def yahoo_sim() -> Iterator[SimProcess]:
    with SimProcess(ephemeral_settings(sink=(Endpoint("127.0.0.1", 0),))) as sim:
        yield sim


class StandinLab(PostfixLab):
    """PostfixLab with an in-process stand-in for ``governor serve``'s socketmaps."""

    def start_serve(self) -> Any:
        self.standin = Standin(self)
        self.standin.start()
        return self.standin


class Standin:
    """transport: round-robin over the slots of IPs that may send, else ``retry:``;
    status-<name>: classify and ``store.record``. Nothing else of the real daemon."""

    def __init__(self, lab: PostfixLab) -> None:
        from governor.domains import DomainSet
        from governor.lab.sink import SocketmapSink
        from governor.postfix_setup import slots

        assert lab.cfg is not None
        self.cfg = lab.cfg
        self.store = lab.store()
        self.domains = DomainSet.from_config(lab.cfg)
        self.slots = slots(lab.cfg)
        self.names = {e.name: e.ip for e in lab.cfg.pool}
        self.rr = itertools.count()
        self.lock = threading.Lock()
        self.cached: tuple[float, list[Any]] = (0.0, [])
        self.sink = SocketmapSink(lab.cfg.sockets.socketmap.removeprefix("unix:"), self.answer)

    def start(self) -> None:
        self.sink.start()

    def stop(self) -> None:
        self.sink.stop()
        self.store.close()

    def _status(self) -> list[Any]:
        with self.lock:
            at, rows = self.cached
            if time.monotonic() - at > 0.2:
                rows = self.store.status()
                self.cached = (time.monotonic(), rows)
            return rows

    def answer(self, name: str, key: str) -> str:
        from governor.classify import classify
        from governor.domains import domain_of
        from governor.transports import active_slots

        if name == "transport":
            domain = domain_of(key) if "@" in key else None
            if domain is None or not self.domains.is_governed(domain):
                return "NOTFOUND "
            ok = {s.ip: s for s in self._status() if s.enabled and not s.held and not s.cooling}
            choices = [sl for sl in self.slots if sl.egress.ip in ok
                       and sl.index <= active_slots(sl.plan, ok[sl.egress.ip].rate_factor)]
            if not choices:
                return "OK retry:4.7.0 governor: no IP may send to Yahoo"
            slot = choices[next(self.rr) % len(choices)]
            return f"OK {slot.name}:{self.cfg.postfix.nexthop}"
        if name.startswith("status-"):
            _, _, text = key.partition(" ")
            c = classify(text)
            if not c.success:
                self.store.record(self.names[name.removeprefix("status-")], c)
            return "NOTFOUND "
        return "NOTFOUND "


@pytest.fixture
def lab_factory(lab_workdir: Path) -> Iterator[Callable[..., PostfixLab]]:
    """``lab_factory(**LabOptions fields)`` -> a started PostfixLab, stopped after the test."""
    labs: list[PostfixLab] = []

    def make(**options: Any) -> PostfixLab:
        cls = StandinLab if (USE_STANDIN and not have_serve()) else PostfixLab
        lab = cls(lab_workdir / f"lab{len(labs)}", LabOptions(**options))
        lab.workdir.mkdir()
        labs.append(lab)
        return lab.start()

    yield make
    for lab in labs:
        standin = getattr(lab, "standin", None)
        lab.stop()
        if standin is not None:
            standin.stop()
