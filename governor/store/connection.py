"""Build a redis-py client (sync or asyncio) from ``config.redis``.

One retry on ConnectionError, without backoff: a pooled connection that died
with a Redis restart is replaced once, transparently; a Redis that is really
down fails fast so the adapter's fail-open/fail-closed choice applies. Timeouts
are not retried: the first attempt may have run, and acquire is not idempotent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

_RESERVED = {
    "redis+sentinel": "Redis Sentinel", "sentinel": "Redis Sentinel",
    "redis+cluster": "Redis Cluster", "cluster": "Redis Cluster",
}
_SUPPORTED = ("unix", "redis", "rediss")


def redis_url(config: Any) -> str:
    """The URL to hand redis-py; NotImplementedError for the reserved topologies."""
    rc = config.redis
    if getattr(rc, "sentinel", None) is not None:
        raise NotImplementedError("redis.sentinel is reserved: Redis Sentinel is not supported yet "
                                  "(use unix://, redis:// or rediss://)")
    if getattr(rc, "cluster", None) is not None:
        raise NotImplementedError("redis.cluster is reserved: Redis Cluster is not supported yet "
                                  "(use unix://, redis:// or rediss://; see docs/store.md)")
    url = rc.url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in _RESERVED:
        raise NotImplementedError(f"{scheme}:// is reserved: {_RESERVED[scheme]} is not supported yet "
                                  "(use unix://, redis:// or rediss://)")
    if scheme == "redis+unix":
        return "unix" + url[len("redis+unix"):]
    if scheme not in _SUPPORTED:
        raise ValueError(f"unsupported Redis URL {url!r}: expected unix://, redis:// or rediss://")
    return url


def reject_cluster(client: Any) -> None:
    """Redis Cluster is reserved: the per-IP scripts are slot-clean, but the audit stream,
    the holds index and the pool-wide pick are not yet (docs/store.md, "Redis Cluster")."""
    if type(client).__name__ == "RedisCluster":
        raise NotImplementedError("Redis Cluster clients are not supported yet (see docs/store.md)")


def client_options(config: Any, retry_cls: type) -> dict[str, Any]:
    """Keyword arguments shared by the sync and asyncio clients."""
    rc = config.redis
    opts: dict[str, Any] = {
        "socket_timeout": rc.socket_timeout,
        "socket_connect_timeout": getattr(rc, "connect_timeout", rc.socket_timeout),
        "decode_responses": True,
        "retry": retry_cls(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if getattr(rc, "username", None):
        opts["username"] = rc.username
    if getattr(rc, "password_file", None):
        opts["password"] = Path(rc.password_file).read_text(encoding="utf-8").strip()
    return opts


def sync_client(config: Any) -> Any:
    import redis
    from redis.retry import Retry

    return redis.Redis.from_url(redis_url(config), **client_options(config, Retry))


def async_client(config: Any) -> Any:
    import redis.asyncio
    from redis.asyncio.retry import Retry

    return redis.asyncio.Redis.from_url(redis_url(config), **client_options(config, Retry))
