"""Store: the blocking store (redis.Redis), for milter threads and the CLI."""
from __future__ import annotations

import os
import threading
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from governor.store import scripts
from governor.store.connection import close_client, is_cluster, sync_client
from governor.store.model import Assignment, AuditEntry, Decision, Hold, IpStatus
from governor.store.plans import Call, Plan, Planner, T, redis_time

_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store:
    """Atomic per-IP admission, feedback and admin over one Redis (see docs/store.md).

    Thread-safe. acquire/release run on a connection each thread keeps from the shared
    pool (redis-py's per-command pool checkout costs about as much CPU as the round
    trip itself); everything else uses the pool. ``pick="sequential"`` tries the
    pool's IPs one by one for acquire(ip=None) instead of one multi-slot script; a
    RedisCluster client implies it (and per-slot audit streams, see KeyScheme).
    """

    def __init__(self, client: Any, config: Any, *, pick: str = "script") -> None:
        self.client = client
        self.config = config
        self.cluster = is_cluster(client)
        self.plans = Planner(config, pick=pick, cluster=self.cluster)
        self._scripts = scripts.register(client)
        self._local = threading.local()

    @classmethod
    def connect(cls, config: Any, **kwargs: Any) -> Store:
        """A Store on ``config.redis``: one Redis, a Sentinel-managed master or a Cluster."""
        return cls(sync_client(config), config, **kwargs)

    def close(self) -> None:
        self._drop_hot()
        close_client(self.client)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _hot(self) -> Any:
        """This thread's own connection (a single-connection client on the shared pool).

        Returned to the pool when the thread ends (the client is garbage-collected);
        rebuilt after fork so parent and child never share a socket.
        """
        if self.cluster:  # RedisCluster routes per slot; it keeps a connection per node itself
            return self.client
        local = self._local
        if getattr(local, "generation", -1) != _fork_generation or local.client is None:
            local.client = self.client.client()
            local.generation = _fork_generation
        return local.client

    def _hot_script(self, name: str, call: Call) -> Any:
        """A hot-path script on this thread's connection. A connection that failed twice
        (the client's own retry included) is dropped: the next call takes a fresh one from
        the pool, which asks Sentinel where the master is now (a kept connection would
        keep dialling the address it first resolved)."""
        try:
            return self._scripts[name](call.keys, call.args, self._hot())
        except RedisConnectionError:
            self._drop_hot()
            raise

    def _drop_hot(self) -> None:
        hot = getattr(self._local, "client", None)
        if hot is not None and hot is not self.client:
            self._local.client = None
            hot.close()

    def _call(self, call: Call) -> Any:
        if call.script is None:
            return self.client.execute_command(*call.command)
        return self._scripts[call.script](keys=call.keys, args=call.args)

    def _execute(self, calls: list[Call]) -> list[Any]:
        """One round trip: a single call, or a non-transactional pipeline."""
        if len(calls) == 1:
            return [self._call(calls[0])]
        if self.cluster:  # calls of one step may live on different nodes: one by one (admin paths)
            return [self._call(c) for c in calls]
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            if call.script is None:
                pipe.execute_command(*call.command)
            else:
                self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)
        return pipe.execute()

    def _run(self, plan: Plan[T]) -> T:
        try:
            calls = next(plan)
            while True:
                calls = plan.send(self._execute(calls))
        except StopIteration as done:
            return done.value

    # ------------------------------------------------------------------ hot path
    def now(self) -> float:
        """Redis time (never the client clock: hosts disagree)."""
        return redis_time(self.client.time())

    def acquire(self, ip: str | None = None, provider: str = "yahoo", *, holder: str = "") -> Decision:
        """One atomic decision: a lease on ``ip`` (or on the best IP of the pool), or a denial."""
        if ip is None and self.plans.sequential:
            return self._run(self.plans.pick_sequential(holder))
        call, ctx = self.plans.acquire_call(ip, provider, holder)
        if call is None:
            return self.plans.parse_acquire(ctx, None)
        return self.plans.parse_acquire(ctx, self._hot_script("acquire", call))

    def release_at(self, lease: str) -> float | None:
        """Release a lease; the Redis time it was released, None if already released/expired."""
        call = self.plans.release_call(lease)
        return self.plans.parse_release(self._hot_script("release", call))

    def release(self, lease: str) -> bool:
        """Idempotent; False if the lease was already released or had expired."""
        return self.release_at(lease) is not None

    # ------------------------------------------------------------------ Postfix routing
    def assign(self, recipient: str | None = None, *, probe: bool = False) -> Assignment:
        """The slot transport for one Postfix recipient: the next of the slots the pool
        offers now (held, cooling and paused IPs offer none, ramping IPs fewer), recorded
        under the chosen IP; a denial when no IP may send. ``recipient=None`` records
        nothing; ``probe=True`` only answers whether (and why not) any IP may send."""
        return self._run(self.plans.assign(recipient, probe))

    def assignments(self, ip: str) -> dict[str, float]:
        """recipient -> Redis time it was assigned to ``ip`` (within holds.queue_lifetime)."""
        return self._run(self.plans.assignments(ip))

    def assigned_ip(self, recipients: list[str]) -> dict[str, str]:
        """recipient -> the IP it was last assigned to; unknown recipients are left out."""
        return self._run(self.plans.assigned_ip(recipients))

    # ------------------------------------------------------------------ feedback
    def record(self, ip: str, event: Any, recipient: str | None = None, domain: str | None = None, *,
               queue_id: str | None = None, mta: str | None = None) -> list[Any]:
        """Let the policy react to one classified reply; returns the actions it decided
        (in monitor mode only the counters are applied, the rest audited as would:...)."""
        return self._run(self.plans.record(ip, event, recipient, domain, queue_id=queue_id, mta=mta))

    def ip_state(self, ip: str) -> Any:
        return self._run(self.plans.ip_state(ip))

    # ------------------------------------------------------------------ holds
    def add_hold(self, hold: Hold) -> None:
        self._run(self.plans.add_hold(hold))

    def remove_hold(self, queue_id: str, mta: str) -> bool:
        return self._run(self.plans.remove_hold(queue_id, mta))

    def holds(self, ip: str | None = None) -> list[Hold]:
        return self._run(self.plans.holds(ip))

    def holds_due(self, limit: int | None = None) -> list[Hold]:
        return self._run(self.plans.holds_due(limit))

    # ------------------------------------------------------------------ admin
    def pause(self, target: str, seconds: float, reason: str, who: str) -> None:
        """Pause an IP (or "provider": every IP) for Yahoo; never shortens a running pause."""
        self._run(self.plans.pause(target, seconds, reason, who))

    def resume(self, target: str, who: str) -> None:
        """End an IP's cooldown (or the provider pause); holds and levels stay."""
        self._run(self.plans.resume(target, who))

    def release_ip(self, ip: str, who: str) -> bool:
        """Clear a hold_ip (TS03-style block); True if the IP was held."""
        return self._run(self.plans.ip_admin("release-ip", ip, who))

    def reset_level(self, ip: str, who: str) -> bool:
        """Lower the escalation level to 0 and forget the pause history (admin only)."""
        return self._run(self.plans.ip_admin("reset-level", ip, who))

    def status(self) -> list[IpStatus]:
        return self._run(self.plans.status())

    def audit(self, since: float | None = None, count: int = 100) -> list[AuditEntry]:
        """Audit entries, oldest first: from ``since`` (Redis time), or the latest ``count``."""
        return self._run(self.plans.audit(since, count))

    def note(self, action: str, *, ip: str = "", reason: str = "", who: str = "", queue_id: str = "",
             extra: dict[str, Any] | None = None) -> str:
        """Audit an operator action that no store script records (``governor release``)."""
        return self._run(self.plans.note(action, ip=ip, reason=reason, who=who, queue_id=queue_id, extra=extra))
