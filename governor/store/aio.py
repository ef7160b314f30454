"""AsyncStore: the asyncio twin of Store, for the socket daemon.

Same surface, same scripts, same plans (governor.store.plans); only the way a
round trip is awaited differs. ``AsyncStore.connect()`` runs every round trip on a
:class:`~governor.store.lane.Lane` (one auto-pipelined connection; see lane.py for
why); ``AsyncStore(client, config)`` runs them on the given redis.asyncio client.
"""
from __future__ import annotations

import asyncio
from typing import Any

from governor.store import scripts
from governor.store.connection import aclose_client, async_client, is_cluster, topology
from governor.store.lane import Lane
from governor.store.model import Assignment, AuditEntry, Decision, Hold, IpStatus
from governor.store.plans import Call, Plan, Planner, T, redis_time


class AsyncStore:
    """See Store; every method is a coroutine."""

    def __init__(self, client: Any, config: Any, *, pick: str = "script", lane: Lane | None = None) -> None:
        self.client = client
        self.config = config
        self.cluster = is_cluster(client)
        self.plans = Planner(config, pick=pick, cluster=self.cluster)
        self._scripts = scripts.register(client)
        self.lane = lane

    @classmethod
    def connect(cls, config: Any, *, pipelined: bool = True, **kwargs: Any) -> AsyncStore:
        """An AsyncStore on ``config.redis``; connections open lazily inside the event loop.

        ``pipelined`` (default): round trips go through one auto-pipelined Lane;
        False: through redis.asyncio's connection pool. A Lane talks to one server, so
        Sentinel and Cluster deployments always use redis.asyncio's client (it follows
        failovers and routes slots).
        """
        lane = Lane.from_config(config) if pipelined and topology(config).kind == "single" else None
        return cls(async_client(config), config, lane=lane, **kwargs)

    async def aclose(self) -> None:
        if self.lane is not None:
            await self.lane.aclose()
        await aclose_client(self.client)

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ plumbing
    async def _call(self, call: Call) -> Any:
        lane = self.lane
        if lane is not None:
            if call.script is None:
                return await lane.execute(*call.command)
            return await lane.script(scripts.script_text(call.script), call.keys, call.args)
        if call.script is None:
            return await self.client.execute_command(*call.command)
        return await self._scripts[call.script](keys=call.keys, args=call.args)

    async def _execute(self, calls: list[Call]) -> list[Any]:
        if len(calls) == 1:
            return [await self._call(calls[0])]
        if self.lane is not None or self.cluster:  # Lane: one loop turn, pipelined; Cluster: per node
            return list(await asyncio.gather(*(self._call(c) for c in calls)))
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            if call.script is None:
                pipe.execute_command(*call.command)
            else:
                await self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)
        return await pipe.execute()

    async def _run(self, plan: Plan[T]) -> T:
        try:
            calls = next(plan)
            while True:
                calls = plan.send(await self._execute(calls))
        except StopIteration as done:
            return done.value

    # ------------------------------------------------------------------ hot path
    async def now(self) -> float:
        return redis_time(await self._call(Call(None, command=("TIME",))))

    async def acquire(self, ip: str | None = None, provider: str = "yahoo", *, holder: str = "") -> Decision:
        if ip is None and self.plans.sequential:
            return await self._run(self.plans.pick_sequential(holder))
        call, ctx = self.plans.acquire_call(ip, provider, holder)
        if call is None:
            return self.plans.parse_acquire(ctx, None)
        return self.plans.parse_acquire(ctx, await self._call(call))

    async def release_at(self, lease: str) -> float | None:
        return self.plans.parse_release(await self._call(self.plans.release_call(lease)))

    async def release(self, lease: str) -> bool:
        return await self.release_at(lease) is not None

    # ------------------------------------------------------------------ Postfix routing
    async def assign(self, recipient: str | None = None, *, probe: bool = False) -> Assignment:
        return await self._run(self.plans.assign(recipient, probe))

    async def assignments(self, ip: str) -> dict[str, float]:
        return await self._run(self.plans.assignments(ip))

    async def assigned_ip(self, recipients: list[str]) -> dict[str, str]:
        return await self._run(self.plans.assigned_ip(recipients))

    # ------------------------------------------------------------------ feedback
    async def record(self, ip: str, event: Any, recipient: str | None = None, domain: str | None = None, *,
                     queue_id: str | None = None, mta: str | None = None) -> list[Any]:
        return await self._run(self.plans.record(ip, event, recipient, domain, queue_id=queue_id, mta=mta))

    async def ip_state(self, ip: str) -> Any:
        return await self._run(self.plans.ip_state(ip))

    # ------------------------------------------------------------------ holds
    async def add_hold(self, hold: Hold) -> None:
        await self._run(self.plans.add_hold(hold))

    async def remove_hold(self, queue_id: str, mta: str) -> bool:
        return await self._run(self.plans.remove_hold(queue_id, mta))

    async def holds(self, ip: str | None = None) -> list[Hold]:
        return await self._run(self.plans.holds(ip))

    async def holds_due(self, limit: int | None = None) -> list[Hold]:
        return await self._run(self.plans.holds_due(limit))

    # ------------------------------------------------------------------ admin
    async def pause(self, target: str, seconds: float, reason: str, who: str) -> None:
        await self._run(self.plans.pause(target, seconds, reason, who))

    async def resume(self, target: str, who: str) -> None:
        await self._run(self.plans.resume(target, who))

    async def release_ip(self, ip: str, who: str) -> bool:
        return await self._run(self.plans.ip_admin("release-ip", ip, who))

    async def reset_level(self, ip: str, who: str) -> bool:
        return await self._run(self.plans.ip_admin("reset-level", ip, who))

    async def status(self) -> list[IpStatus]:
        return await self._run(self.plans.status())

    async def audit(self, since: float | None = None, count: int = 100) -> list[AuditEntry]:
        return await self._run(self.plans.audit(since, count))

    async def note(self, action: str, *, ip: str = "", reason: str = "", who: str = "", queue_id: str = "",
                   extra: dict[str, Any] | None = None) -> str:
        return await self._run(self.plans.note(action, ip=ip, reason=reason, who=who, queue_id=queue_id,
                                               extra=extra))
