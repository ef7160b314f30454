"""MTA adapters: the Exim line protocol and the Postfix socketmap, translated into store calls.

Adapters parse and validate what an MTA sends, ask the store (the only thing that
talks to Redis, through the policy for feedback), and format the answer. They
decide nothing themselves, except what to answer when the store cannot be reached
(``redis_down``: fail-open or fail-closed), which is a property of the protocol.

This module holds what both adapters share at run time (:class:`Runtime`): the
config, the store, the governed-domain test, the fail-open rotation, rate-limited
"Redis is down" logging, lost-event counting and the background tasks the daemon
waits for at shutdown. The protocols are specified in docs/protocols.md.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Coroutine
from typing import Any

from governor import metrics
from governor.config import Config, EgressIP
from governor.domains import DomainSet
from governor.logsetup import kv
from governor.store.keys import valid_ip
from governor.transports import slot_transport

READ_TIMEOUT = 5.0         # a client must send a complete request (or its next one) within this
DOWN_LOG_INTERVAL = 10.0   # at most one "Redis unavailable" warning per this many seconds
MAX_BACKGROUND = 1000      # feedback records in flight; beyond that they are counted as lost


class Governed:
    """``DomainSet.is_governed`` without blocking the event loop.

    A miss may do an MX lookup (up to ``domains.dns_timeout``), so it runs in a
    thread; answers are kept here for a minute (the DomainSet keeps its own, longer,
    MX cache behind that), so the hot path is one dict lookup. Concurrent misses for
    one name share one lookup.
    """

    TTL = 60.0
    MAX = 50_000

    def __init__(self, domains: DomainSet) -> None:
        self.domains = domains
        self._cache: dict[str, tuple[float, bool]] = {}
        self._inflight: dict[str, asyncio.Future[bool]] = {}

    async def __call__(self, domain: str) -> bool:
        hit = self._cache.get(domain)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.domains.is_governed, domain))
            self._inflight[domain] = pending
            try:
                answer = await asyncio.shield(pending)
            finally:
                self._inflight.pop(domain, None)
            if len(self._cache) >= self.MAX:
                self._cache.clear()
            self._cache[domain] = (now + self.TTL, answer)
            return answer
        return await asyncio.shield(pending)


class Runtime:
    """What the adapters share: config, store, governed domains, fail modes, counters."""

    def __init__(self, config: Config, store: Any, *, domains: DomainSet | None = None,
                 log: logging.Logger | None = None) -> None:
        self.config = config
        self.store = store
        self.log = log or logging.getLogger("governor.daemon")
        self.governed = Governed(domains if domains is not None else DomainSet.from_config(config))
        self.fail_open = config.redis_down == "fail-open"
        self.monitor = config.mode == "monitor"
        self.by_ip: dict[str, EgressIP] = {valid_ip(e.ip): e for e in config.pool}
        self.by_name: dict[str, EgressIP] = {e.name: e for e in config.pool}
        enabled = [e for e in config.pool if e.enabled]
        self.enabled_ips = frozenset(valid_ip(e.ip) for e in enabled)
        self._open_ips = itertools.cycle(enabled) if enabled else None
        self._open_slots = itertools.cycle(_all_slots(store.plans, enabled)) if enabled else None
        self.stats: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self._wake: asyncio.Future[None] | None = None
        self._down_since: float | None = None
        self._down_logged = 0.0
        self._down_quiet = 0

    # ------------------------------------------------------------------ fail modes
    def next_open_egress(self) -> EgressIP | None:
        """Fail-open: the next enabled pool IP, round robin (None: empty pool)."""
        return next(self._open_ips) if self._open_ips is not None else None

    def next_open_slot(self) -> str | None:
        """Fail-open for Postfix: the next slot transport of every enabled IP's full plan."""
        return next(self._open_slots) if self._open_slots is not None else None

    def store_failed(self, exc: BaseException, what: str) -> None:
        """The store could not answer: count it, log it (rate-limited) with the fail mode."""
        self.stats["store_errors"] += 1
        metrics.REDIS_ERRORS.inc()
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_logged < DOWN_LOG_INTERVAL:
            self._down_quiet += 1
            return
        self._down_logged = now
        self.log.warning(kv(event="redis-unavailable", op=what, error=f"{type(exc).__name__}: {exc}",
                            redis_down=self.config.redis_down, suppressed=self._down_quiet))
        self._down_quiet = 0

    def store_ok(self) -> None:
        """Called after a store answer; logs once when the store is back after failures."""
        if self._down_since is not None:
            self.log.warning(kv(event="redis-available", down_s=round(time.monotonic() - self._down_since, 1),
                                failed=self._down_quiet))
            self._down_since = None
            self._down_logged = 0.0
            self._down_quiet = 0

    def lost(self, what: str) -> None:
        """A feedback event or release that could not reach the store."""
        self.stats[f"lost_{what}"] += 1

    # ------------------------------------------------------------------ tasks and stopping
    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> bool:
        """Run ``coro`` in the background (the daemon waits for these at shutdown);
        False, and counted as lost, when too many are already running."""
        if len(self.tasks) >= MAX_BACKGROUND or self.stopping:
            coro.close()
            self.lost(what)
            return False
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error(kv(event="internal-error", where="background", error=f"{type(exc).__name__}: {exc}"))

    async def nap(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the daemon starts stopping first; True if it slept fully."""
        if self.stopping:
            return False
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._wake), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    def stop(self) -> None:
        """Stopping: wake every nap (a waiting acquire answers at once), refuse new background work."""
        self.stopping = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


def _all_slots(plans: Any, pool: list[EgressIP]) -> list[str]:
    """Every slot transport of the pool at full plan, slot-major (s1 of every IP, then s2, ...)."""
    slots = {e.name: plans.ip(valid_ip(e.ip)).slots for e in pool}
    return [slot_transport(e.name, j) for j in range(1, max(slots.values()) + 1) for e in pool if slots[e.name] >= j]
