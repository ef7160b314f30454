"""redis-py clients built from ``config.redis``: one Redis, Sentinel or Cluster.

Three topologies (docs/store.md, "Redis Cluster and Sentinel"):

- a single Redis: ``unix://``, ``redis://``, ``rediss://`` (TLS);
- Sentinel: ``redis.sentinel`` or ``redis+sentinel://h:p,h:p/MASTER[/db]``; the client
  asks the Sentinels for the master and follows it through failovers;
- Cluster: ``redis.cluster`` or ``redis+cluster://h:p,h:p``; the client routes every
  command by its key's slot (the store keeps each script inside one slot).

Single Redis and Sentinel clients retry once, immediately, on ConnectionError, without
backoff: a pooled connection that died with a Redis restart, a ``CLIENT KILL`` or a
failover is replaced once, transparently; a Redis that is really down fails fast so
the adapter's fail-open/fail-closed choice applies. Timeouts are not retried: the first
attempt may have run, and acquire is not idempotent. The Cluster client keeps
redis-py's own topology refresh and redirection handling (MOVED/ASK), bounded.

Secrets (the password, a password in the URL) never appear in an error message:
errors name :attr:`RedisConfig.display`, which is redacted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from governor.config import (
    ClusterConfig, SentinelConfig, parse_cluster_url, parse_sentinel_url, redact_url, url_credentials,
)

_SUPPORTED = ("unix", "redis", "rediss")
CLUSTER_ATTEMPTS = 3   # MOVED/ASK/topology refreshes per command; a failover needs 1-2


@dataclass(frozen=True)
class Topology:
    """What to connect to: ``kind`` is "single", "sentinel" or "cluster"."""

    kind: str
    url: str = ""
    sentinel: SentinelConfig | None = None
    cluster: ClusterConfig | None = None


def topology(config: Any) -> Topology:
    """The deployment ``config.redis`` describes (structured keys win over the URL form)."""
    rc = config.redis
    if getattr(rc, "sentinel", None) is not None:
        return Topology("sentinel", rc.url, sentinel=rc.sentinel)
    if getattr(rc, "cluster", None) is not None:
        return Topology("cluster", rc.url, cluster=rc.cluster)
    url = rc.url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "redis+sentinel":
        return Topology("sentinel", url, sentinel=parse_sentinel_url(url))
    if scheme == "redis+cluster":
        return Topology("cluster", url, cluster=parse_cluster_url(url))
    if scheme == "redis+unix":
        url = "unix" + url[len("redis+unix"):]
    elif scheme not in _SUPPORTED:
        raise ValueError(f"unsupported Redis URL {redact_url(url)!r}: expected unix://, redis://, rediss://, "
                         "redis+sentinel:// or redis+cluster://")
    return Topology("single", url)


def redis_url(config: Any) -> str:
    """The URL of a single Redis (ValueError for Sentinel/Cluster: they have no single URL)."""
    topo = topology(config)
    if topo.kind != "single":
        raise ValueError(f"redis is a {topo.kind} deployment, not a single URL")
    return topo.url


def is_cluster(client: Any) -> bool:
    """True for redis-py's sync or asyncio RedisCluster."""
    return type(client).__name__ == "RedisCluster"


def read_secret(path: str) -> str:
    """The first line of a secret file (the config loader already checked its mode)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RedisConnectionError(f"cannot read the Redis password file {path}: {exc.strerror}") from None


def credentials(config: Any) -> dict[str, str]:
    """username/password for the data nodes: config keys first, else the URL's userinfo."""
    rc = config.redis
    user, password = url_credentials(rc.url) if "@" in rc.url else (None, None)
    if getattr(rc, "username", None):
        user = rc.username
    if getattr(rc, "password_file", None):
        password = read_secret(rc.password_file)
    out = {}
    if user:
        out["username"] = user
    if password:
        out["password"] = password
    return out


def tls_options(config: Any, *, force: bool = False) -> dict[str, Any]:
    """redis-py ``ssl_*`` keyword arguments from ``redis.tls`` (``ssl=True`` when ``force``)."""
    tls = getattr(config.redis, "tls", None)
    opts: dict[str, Any] = {"ssl": True} if force else {}
    if tls is None:
        return opts
    if tls.ca_file:
        opts["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        opts["ssl_certfile"] = tls.cert_file
        opts["ssl_keyfile"] = tls.key_file
    return opts


def client_options(config: Any, retry_cls: type) -> dict[str, Any]:
    """Keyword arguments shared by the sync and asyncio clients (single Redis, Sentinel)."""
    rc = config.redis
    opts: dict[str, Any] = {
        "socket_timeout": rc.socket_timeout,
        "socket_connect_timeout": getattr(rc, "connect_timeout", rc.socket_timeout),
        "decode_responses": True,
        "retry": retry_cls(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    opts.update(credentials(config))
    return opts


def _tls_for_nodes(config: Any, topo: Topology) -> dict[str, Any]:
    """Sentinel/Cluster nodes speak TLS when ``redis.tls`` is set (or the URL says rediss)."""
    return tls_options(config, force=True) if getattr(config.redis, "tls", None) is not None else {}


def _sentinel_kwargs(config: Any, topo: Topology) -> dict[str, Any]:
    s = topo.sentinel
    assert s is not None
    rc = config.redis
    kw: dict[str, Any] = {"socket_timeout": rc.socket_timeout, "socket_connect_timeout": rc.connect_timeout,
                          **_tls_for_nodes(config, topo)}
    if s.username:
        kw["username"] = s.username
    if s.password_file:
        kw["password"] = read_secret(s.password_file)
    return kw


def _cluster_options(config: Any, topo: Topology) -> dict[str, Any]:
    rc = config.redis
    return {
        "socket_timeout": rc.socket_timeout,
        "socket_connect_timeout": rc.connect_timeout,
        "decode_responses": True,
        "cluster_error_retry_attempts": CLUSTER_ATTEMPTS,
        **credentials(config),
        **_tls_for_nodes(config, topo),
    }


def _client(config: Any, redis_cls: type, cluster_mod: Any, sentinel_cls: type, retry_cls: type) -> Any:
    """One builder for both flavours: redis-py's sync and asyncio APIs have the same shape."""
    topo = topology(config)
    if topo.kind == "cluster":
        assert topo.cluster is not None
        nodes = [cluster_mod.ClusterNode(h, p) for h, p in topo.cluster.nodes]
        return cluster_mod.RedisCluster(startup_nodes=nodes, **_cluster_options(config, topo))
    opts = client_options(config, retry_cls)
    if topo.kind == "sentinel":
        assert topo.sentinel is not None
        sentinel = sentinel_cls(list(topo.sentinel.nodes), sentinel_kwargs=_sentinel_kwargs(config, topo))
        return sentinel.master_for(topo.sentinel.master, db=topo.sentinel.db, **opts, **_tls_for_nodes(config, topo))
    if topo.url.startswith("rediss://"):
        opts.update(tls_options(config))
    return redis_cls.from_url(topo.url, **opts)


def sync_client(config: Any) -> Any:
    """A redis.Redis (single or Sentinel-managed master) or a redis.cluster.RedisCluster."""
    import redis
    import redis.cluster
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    return _client(config, redis.Redis, redis.cluster, Sentinel, Retry)


def async_client(config: Any) -> Any:
    """The redis.asyncio twin of :func:`sync_client`."""
    import redis.asyncio
    import redis.asyncio.cluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel

    return _client(config, redis.asyncio.Redis, redis.asyncio.cluster, Sentinel, Retry)


def _sentinels(client: Any) -> list[Any]:
    """The Sentinel clients behind a master_for() client (they hold sockets too)."""
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    return list(getattr(manager, "sentinels", ()) or ())


def close_client(client: Any) -> None:
    """Close a sync client and everything it opened (pool, Sentinel connections)."""
    for s in _sentinels(client):
        s.close()
    client.close()
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()


async def aclose_client(client: Any) -> None:
    """Close an asyncio client and everything it opened (pool, Sentinel connections)."""
    for s in _sentinels(client):
        await s.aclose()
    if is_cluster(client):
        await client.aclose()
        return
    await client.aclose(close_connection_pool=True)
