"""governor.yaml: load, validate, and turn into frozen, typed objects.

Every error names file:line, the key path, what was expected and what was found.
Unknown keys are errors with a "did you mean". The built-in defaults follow
what the sources say Yahoo rewards (see docs/policy.md); every one of them can be
overridden, and every duration is multiplied by ``time_scale`` at load time so
tests and demos can run Yahoo's hours in seconds.

Default reply reactions live in the data file ``governor/data/reactions.yaml``,
validated by the same code as the user's ``reactions:`` section, which overrides
them field by field.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from governor.yamlnode import Node, Problems, YamlError, load, parse

DEFAULT_PATH = Path("/etc/yahoo-governor/governor.yaml")
CLASSES = ("rate", "reputation", "block", "transient", "content", "policy", "recipient")
MAX_LEVEL = 3
_CODE_KEY = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}"
_NAME_RE = r"[a-z][a-z0-9-]{0,30}"


class ConfigError(YamlError):
    """The configuration is invalid; str() lists every problem, one per line."""


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class SentinelConfig:
    """Redis Sentinel: the store follows the named master through failovers.

    ``username``/``password_file`` authenticate to the Sentinels themselves (their own
    ``requirepass``/ACL); the data nodes use ``redis.username``/``redis.password_file``.
    """

    master: str
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password_file: str | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """Redis Cluster seed nodes; every per-IP decision touches one slot."""

    nodes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards Redis (``rediss://``, or Sentinel/Cluster nodes): the CA that signed
    the server certificate, and a client certificate when Redis asks for one
    (``tls-auth-clients yes``)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "gov"
    socket_timeout: float = 0.5
    connect_timeout: float = 1.0
    username: str | None = None
    password_file: str | None = None
    audit_maxlen: int = 10000
    sentinel: SentinelConfig | None = None
    cluster: ClusterConfig | None = None
    tls: TlsConfig | None = None

    @property
    def display(self) -> str:
        """Where Redis is, for messages and logs: never a password."""
        if self.sentinel is not None:
            nodes = ",".join(f"{h}:{p}" for h, p in self.sentinel.nodes)
            return f"sentinel {self.sentinel.master} via {nodes}"
        if self.cluster is not None:
            return "cluster via " + ",".join(f"{h}:{p}" for h, p in self.cluster.nodes)
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (``redis://user:***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    auth, at, host = rest.rpartition("@")
    if not at:
        return url
    user = auth.split(":", 1)[0] if ":" in auth else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://:***@{host}"


def url_has_password(url: str) -> bool:
    rest = url.partition("://")[2]
    auth, at, _ = rest.rpartition("@")
    return bool(at) and (":" in auth or bool(auth))


def _host_port(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ValueError naming the text."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected host:port, got "{text}"')
    return host.strip("[]"), int(port)


def _url_nodes(rest: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """Split ``[auth@]h:p,h:p[/path]`` -> (path, nodes); credentials are left to the caller."""
    rest = rest.rpartition("@")[2]
    hosts, _, path = rest.partition("/")
    nodes = tuple(_host_port(h) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ValueError("expected at least one host:port")
    return path, nodes


def parse_sentinel_url(url: str) -> SentinelConfig:
    """``redis+sentinel://[user:pw@]host:port[,host:port...]/MASTER[/db]`` -> SentinelConfig.

    Credentials in the URL are for the data nodes (as with redis://), not the Sentinels."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "redis+sentinel":
        raise ValueError("expected a redis+sentinel:// URL")
    path, nodes = _url_nodes(rest)
    master, _, db = path.strip("/").partition("/")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", master):
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/MASTER[/db]: no master name")
    if db and not db.isdigit():
        raise ValueError(f'expected a database number after the master name, got "{db}"')
    return SentinelConfig(master=master, nodes=nodes, db=int(db or 0))


def parse_cluster_url(url: str) -> ClusterConfig:
    """``redis+cluster://[user:pw@]host:port[,host:port...]`` -> ClusterConfig (seed nodes)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "redis+cluster":
        raise ValueError("expected a redis+cluster:// URL")
    path, nodes = _url_nodes(rest)
    if path.strip("/") not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0")
    return ClusterConfig(nodes=nodes)


def url_credentials(url: str) -> tuple[str | None, str | None]:
    """(username, password) given in a URL, percent-decoded; (None, None) without."""
    from urllib.parse import unquote

    auth, at, _ = url.partition("://")[2].rpartition("@")
    if not at:
        return None, None
    user, colon, pw = auth.partition(":")
    if not colon:
        return None, unquote(user) or None
    return unquote(user) or None, unquote(pw) or None


@dataclass(frozen=True)
class EgressIP:
    """One sending address of the pool, with optional per-IP overrides."""

    ip: str
    name: str
    cold: bool = False
    warmup_start: dt.date | None = None
    concurrency: int | None = None
    messages_per_minute: float | None = None
    enabled: bool = True

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version


@dataclass(frozen=True)
class Limits:
    """Per-IP limits toward Yahoo (defaults from seed 002 and Yahoo's 20 msgs/connection)."""

    concurrency: int = 5
    messages_per_minute: float = 80.0
    burst: int = 0
    messages_per_connection: int = 20
    lease_ttl: float = 300.0
    postfix_headroom: float = 0.0


@dataclass(frozen=True)
class Warmup:
    """Daily cap for cold IPs: initial_per_day, doubling every double_every_days (seed 002)."""

    initial_per_day: int = 500
    double_every_days: float = 3.0


@dataclass(frozen=True)
class DomainsConfig:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    att_family: str = "auto"
    mx_suffixes: tuple[str, ...] = ("yahoodns.net",)
    mx_table: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dns: bool = True
    dns_timeout: float = 2.0
    cache_ttl: float = 3600.0


@dataclass(frozen=True)
class Reaction:
    """What the governor does when a reply of one code (or class) arrives.

    pause: stop that IP for Yahoo this long (repeats lengthen it, see Escalation);
    hold_ip: stop that IP for Yahoo until an admin releases it;
    slow_to/ramp: after the pause, restart at this fraction of the rate and ramp
    back to 100 % over ``ramp``; level: raise the IP's escalation level (never
    lowered automatically); per_connection: lower messages per connection;
    complaint/deferral: count the reply as a complaint signal / deferral;
    hold_queue: move that IP's deferred Yahoo mail to the hold queue during the
    pause; failover: send its traffic through other IPs; alert: tell the operator.
    """

    pause: float | None = None
    hold_ip: bool = False
    slow_to: float | None = None
    ramp: float | None = None
    level: int | None = None
    per_connection: int | None = None
    complaint: bool = False
    deferral: bool = False
    hold_queue: bool = False
    failover: bool = False
    alert: bool = False

    def is_noop(self) -> bool:
        return self == Reaction()


REACTION_FIELDS = tuple(f.name for f in dataclasses.fields(Reaction))


@dataclass(frozen=True)
class Escalation:
    """Repeated pauses within repeat_window multiply by repeat_factor, up to max_pause."""

    repeat_window: float = 86400.0
    repeat_factor: float = 2.0
    max_pause: float = 86400.0


@dataclass(frozen=True)
class Complaints:
    """Per-recipient deferrals are complaint signals, counted per unit time (seed 001)."""

    window: float = 3600.0
    threshold: int = 20
    slow_to: float = 0.5
    ramp: float = 3600.0


@dataclass(frozen=True)
class Holds:
    action: str = "hold"  # hold | tempfail: what the milter does when no IP may send
    queue_lifetime: float = 5 * 86400.0
    release_margin: float = 12 * 3600.0
    release_rate: float | None = None  # messages/minute; None = the per-IP budget
    scan_interval: float = 10.0


@dataclass(frozen=True)
class Sockets:
    exim: str = "/run/yahoo-governor/exim.sock"
    socketmap: str = "unix:/var/spool/postfix/yahoo-governor/socketmap.sock"
    milter: str = "unix:/var/spool/postfix/yahoo-governor/milter.sock"
    owner: str | None = None
    group: str | None = None
    mode: int = 0o660


@dataclass(frozen=True)
class PostfixConfig:
    """Where the Postfix integration acts, and the nexthop the slot transports use."""

    config_directory: str = "/etc/postfix"
    command_directory: str = "/usr/sbin"
    nexthop: str = ""  # empty: route by the recipient domain's MX; e.g. "[127.0.0.1]:2525" in a lab


@dataclass(frozen=True)
class EximConfig:
    """The Exim integration: binary, config file, and how long a router call may wait."""

    binary: str = "/usr/sbin/exim4"
    config_file: str | None = None
    wait: float = 2.0  # a router's acquire may wait this long for a rate slot
    readsocket_timeout: int = 3  # whole seconds (Exim ignores fractions)


@dataclass(frozen=True)
class Metrics:
    listen: str | None = "127.0.0.1:9425"       # governor serve
    milter_listen: str | None = None            # governor milter (off: one port per process)
    queue_agent_listen: str | None = None       # governor queue-agent


@dataclass(frozen=True)
class Logging:
    syslog: bool = True
    facility: str = "mail"
    level: str = "info"
    ident: str = "yahoo-governor"
    stderr: bool = False
    syslog_socket: str | None = None  # unix datagram socket; None = /dev/log (or /var/run/syslog)


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    mode: str = "enforce"
    redis_down: str = "fail-open"
    time_scale: float = 1.0
    redis: RedisConfig = field(default_factory=RedisConfig)
    pool: tuple[EgressIP, ...] = ()
    limits: Limits = field(default_factory=Limits)
    warmup: Warmup = field(default_factory=Warmup)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    reactions: dict[str, Reaction] = field(default_factory=dict)
    class_reactions: dict[str, Reaction] = field(default_factory=dict)
    escalation: Escalation = field(default_factory=Escalation)
    complaints: Complaints = field(default_factory=Complaints)
    holds: Holds = field(default_factory=Holds)
    sockets: Sockets = field(default_factory=Sockets)
    postfix: PostfixConfig = field(default_factory=PostfixConfig)
    exim: EximConfig = field(default_factory=EximConfig)
    metrics: Metrics = field(default_factory=Metrics)
    logging: Logging = field(default_factory=Logging)

    def limits_for(self, ip: str) -> Limits:
        """The limits of one egress IP, per-IP overrides applied."""
        for egress in self.pool:
            if egress.ip == ip:
                return dataclasses.replace(
                    self.limits,
                    concurrency=egress.concurrency or self.limits.concurrency,
                    messages_per_minute=egress.messages_per_minute or self.limits.messages_per_minute,
                )
        return self.limits

    def egress(self, ip: str) -> EgressIP | None:
        return next((e for e in self.pool if e.ip == ip), None)

    @property
    def pool_ips(self) -> tuple[str, ...]:
        return tuple(e.ip for e in self.pool if e.enabled)

    def reaction_for(self, code: str | None, cls: str | None) -> Reaction:
        """The reaction for a reply: by code first, then by class, else nothing."""
        if code is not None and code in self.reactions:
            return self.reactions[code]
        if cls is not None and cls in self.class_reactions:
            return self.class_reactions[cls]
        return Reaction()


# --------------------------------------------------------------------------- readers
def _read_redis(n: Node) -> RedisConfig:
    d = RedisConfig()
    m = n.mapping(["url", "prefix", "socket_timeout", "connect_timeout", "username",
                   "password_file", "audit_maxlen", "sentinel", "cluster", "tls"])
    url_node = _get(m, "url")
    url = url_node.string(d.url, what="a Redis URL (unix:///path, redis://host:port/db, rediss://..., "
                                      "redis+sentinel://... or redis+cluster://...)")
    sentinel = cluster = None
    if url and not re.match(r"^(unix|redis|rediss|redis\+unix|redis\+sentinel|redis\+cluster)://", url):
        url_node.fail("expected a Redis URL starting with unix://, redis://, rediss://, redis+sentinel:// or "
                      f'redis+cluster://, got "{redact_url(url)}"')
        url = d.url
    elif url and url.startswith(("redis+sentinel://", "redis+cluster://")):
        try:
            if url.startswith("redis+sentinel://"):
                sentinel = parse_sentinel_url(url)
            else:
                cluster = parse_cluster_url(url)
        except ValueError as exc:
            url_node.fail(f"{exc} (in {redact_url(url)})")
    if url and url_has_password(url) and os.path.isfile(url_node.file):  # text not read from a file: no mode
        _check_secret_file(url_node, url_node.file, what="the configuration file (redis.url holds a password)")
    if "sentinel" in m and not m["sentinel"].is_null:
        sentinel = _read_sentinel(m["sentinel"], sentinel)
    if "cluster" in m and not m["cluster"].is_null:
        c = m["cluster"].mapping(["nodes"], required=["nodes"])
        cluster = ClusterConfig(nodes=_host_ports(_get(c, "nodes")))
    if sentinel is not None and cluster is not None:
        n.fail("redis.sentinel and redis.cluster exclude each other: a deployment uses one of them")
    password_file = _read_secret_path(_get(m, "password_file"))
    return RedisConfig(
        url=url or d.url,
        prefix=_get(m, "prefix").string(d.prefix, pattern=r"[A-Za-z0-9_.-]{1,32}",
                                        what="a key prefix of letters, digits, _ . - (at most 32)") or d.prefix,
        socket_timeout=_get(m, "socket_timeout").duration(d.socket_timeout, positive=True) or d.socket_timeout,
        connect_timeout=_get(m, "connect_timeout").duration(d.connect_timeout, positive=True) or d.connect_timeout,
        username=_get(m, "username").string(None, pattern=r"[^\s:@/]{1,64}", what="an ACL user name"),
        password_file=password_file,
        audit_maxlen=_get(m, "audit_maxlen").integer(d.audit_maxlen, minimum=100) or d.audit_maxlen,
        sentinel=sentinel,
        cluster=cluster,
        tls=_read_tls(_get(m, "tls")),
    )


def _read_sentinel(n: Node, from_url: SentinelConfig | None) -> SentinelConfig:
    s = n.mapping(["master", "nodes", "db", "username", "password_file"], required=["master", "nodes"])
    return SentinelConfig(
        master=_get(s, "master").string("mymaster", pattern=r"[A-Za-z0-9_.-]+", what="a master name") or "mymaster",
        nodes=_host_ports(_get(s, "nodes")),
        db=_get(s, "db").integer(from_url.db if from_url else 0, minimum=0, maximum=15) or 0,
        username=_get(s, "username").string(None, pattern=r"[^\s:@/]{1,64}", what="an ACL user name"),
        password_file=_read_secret_path(_get(s, "password_file")),
    )


def _read_tls(n: Node) -> TlsConfig | None:
    if n.is_null:
        return None
    t = n.mapping(["ca_file", "cert_file", "key_file"])
    tls = TlsConfig(**{k: _get(t, k).string(None, what="a file path") for k in ("ca_file", "cert_file", "key_file")})
    for key in ("ca_file", "cert_file"):
        path = getattr(tls, key)
        if path and not os.access(path, os.R_OK):
            _get(t, key).fail(f"cannot read {path}")
    if tls.key_file:
        _check_secret_file(_get(t, "key_file"), tls.key_file, what=tls.key_file)
    if bool(tls.cert_file) != bool(tls.key_file):
        n.fail("cert_file and key_file go together (a client certificate needs its key)")
    return tls


def _read_secret_path(n: Node) -> str | None:
    path = n.string(None, what="a file path")
    if path:
        _check_secret_file(n, path, what=path)
    return path


def _check_secret_file(n: Node, path: str, *, what: str) -> None:
    """A file holding a Redis secret must not be readable by everyone."""
    if path.startswith("<"):  # text given in memory (tests, check-config of stdin): no file
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        n.fail(f"cannot read {path}: {exc.strerror}")
        return
    if mode & 0o004:
        n.fail(f"{what} is world-readable (mode {mode & 0o777:o}); chmod o-r {path}, it holds a secret")


def _host_ports(n: Node) -> tuple[tuple[str, int], ...]:
    out = []
    for item in n.sequence():
        v = item.string(what="host:port")
        if v is None:
            continue
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            item.fail(f'expected host:port, got "{v}"')
            continue
        out.append((host.strip("[]"), int(port)))
    if not out:
        n.fail("expected a list of host:port with at least one entry")
    return tuple(out)


def _read_pool(n: Node) -> tuple[EgressIP, ...]:
    out: list[EgressIP] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(n.sequence()):
        m = item.mapping(["ip", "name", "cold", "warmup_start", "concurrency", "messages_per_minute", "enabled"])
        ip_node = _get(m, "ip")
        raw = ip_node.string(None, what="an IPv4 or IPv6 address")
        if raw is None:
            if "ip" not in m:
                item.fail("missing key ip (the egress address)")
            continue
        try:
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            ip_node.fail(f'expected an IPv4 or IPv6 address, got "{raw}"')
            continue
        if ip in seen:
            ip_node.fail(f"{ip} is listed twice (first at line {seen[ip]})")
            continue
        seen[ip] = ip_node.line
        name = _get(m, "name").string(f"yahoo-ip{i + 1}", pattern=_NAME_RE,
                                      what="a transport name (lowercase letters, digits, -)") or f"yahoo-ip{i + 1}"
        warmup = _get(m, "warmup_start")
        start = warmup.raw() if not warmup.is_null else None
        if start is not None and not isinstance(start, dt.date):
            warmup.fail(f'expected a date (YYYY-MM-DD), got "{start}"')
            start = None
        if isinstance(start, dt.datetime):
            start = start.date()
        out.append(EgressIP(
            ip=ip,
            name=name,
            cold=_get(m, "cold").boolean(start is not None),
            warmup_start=start,
            concurrency=_get(m, "concurrency").integer(None, minimum=1, maximum=1000),
            messages_per_minute=_get(m, "messages_per_minute").number(None, positive=True),
            enabled=_get(m, "enabled").boolean(True),
        ))
    names = [e.name for e in out]
    for e in out:
        if names.count(e.name) > 1:
            n.fail(f'transport name "{e.name}" is used by more than one IP')
            break
    return tuple(out)


def _read_limits(n: Node) -> Limits:
    d = Limits()
    top = n.mapping(["per_ip"])
    m = _get(top, "per_ip").mapping(["concurrency", "messages_per_minute", "burst",
                                     "messages_per_connection", "lease_ttl", "postfix_headroom"])
    return Limits(
        concurrency=_get(m, "concurrency").integer(d.concurrency, minimum=1, maximum=1000) or d.concurrency,
        messages_per_minute=_get(m, "messages_per_minute").number(d.messages_per_minute, positive=True)
        or d.messages_per_minute,
        burst=_or(_get(m, "burst").integer(d.burst, minimum=0, maximum=10000), d.burst),
        messages_per_connection=_get(m, "messages_per_connection").integer(d.messages_per_connection, minimum=1,
                                                                           maximum=1000) or d.messages_per_connection,
        lease_ttl=_get(m, "lease_ttl").duration(d.lease_ttl, positive=True) or d.lease_ttl,
        postfix_headroom=_or(_get(m, "postfix_headroom").number(d.postfix_headroom, minimum=0, maximum=0.5),
                             d.postfix_headroom),
    )


def _read_warmup(n: Node) -> Warmup:
    d = Warmup()
    m = n.mapping(["initial_per_day", "double_every_days"])
    return Warmup(
        initial_per_day=_get(m, "initial_per_day").integer(d.initial_per_day, minimum=1) or d.initial_per_day,
        double_every_days=_get(m, "double_every_days").number(d.double_every_days, positive=True)
        or d.double_every_days,
    )


_DOMAIN_RE = r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}"


def _read_domains(n: Node) -> DomainsConfig:
    d = DomainsConfig()
    m = n.mapping(["include", "exclude", "att_family", "mx_suffixes", "mx_table", "dns", "dns_timeout", "cache_ttl"])
    what = "a lowercase domain name such as example.com"
    mx_table: dict[str, tuple[str, ...]] = {}
    for dom, hosts in _get(m, "mx_table").items():
        if not re.fullmatch(_DOMAIN_RE, dom):
            hosts.fail(f'expected {what} as key, got "{dom}"')
            continue
        mx_table[dom] = tuple(h.rstrip(".").lower() for h in hosts.string_list(pattern=_DOMAIN_RE + r"\.?",
                                                                                  what="an MX host name"))
    return DomainsConfig(
        include=_get(m, "include").string_list(pattern=_DOMAIN_RE, what=what),
        exclude=_get(m, "exclude").string_list(pattern=_DOMAIN_RE, what=what),
        att_family=_att_family(_get(m, "att_family"), d.att_family),
        mx_suffixes=_get(m, "mx_suffixes").string_list(pattern=_DOMAIN_RE, what=what) or d.mx_suffixes,
        mx_table=mx_table,
        dns=_get(m, "dns").boolean(d.dns),
        dns_timeout=_get(m, "dns_timeout").duration(d.dns_timeout, positive=True) or d.dns_timeout,
        cache_ttl=_or(_get(m, "cache_ttl").duration(d.cache_ttl), d.cache_ttl),
    )


def _att_family(n: Node, default: str) -> str:
    """auto | on | off; YAML 1.1 reads bare on/off as booleans, so accept those too."""
    raw = n.raw()
    if isinstance(raw, bool):
        return "on" if raw else "off"
    return n.choice(default, ("auto", "on", "off"))


def _read_reaction(n: Node, base: Reaction) -> Reaction:
    """One reaction; fields not given keep the value from ``base`` (field-wise override)."""
    m = n.mapping(REACTION_FIELDS)
    changes: dict[str, Any] = {}
    for key, node in m.items():
        if key in ("pause", "ramp"):
            changes[key] = node.duration(None, positive=True)
        elif key == "slow_to":
            changes[key] = node.number(None, positive=True, maximum=1.0)
        elif key == "level":
            changes[key] = node.integer(None, minimum=0, maximum=MAX_LEVEL)
        elif key == "per_connection":
            changes[key] = node.integer(None, minimum=1, maximum=1000)
        else:
            changes[key] = node.boolean(False)
    return dataclasses.replace(base, **changes)


def _read_reactions(n: Node, base: dict[str, Reaction], *, classes: bool) -> dict[str, Reaction]:
    out = dict(base)
    for key, node in n.items():
        if classes and key not in CLASSES:
            node.fail(f"unknown reply class; expected one of: {', '.join(CLASSES)}", path=node.path)
            continue
        if not classes and not re.fullmatch(_CODE_KEY, key):
            node.fail("expected a reply code such as TSS04 or a label such as DD_USER_UNKNOWN as key")
            continue
        out[key] = _read_reaction(node, out.get(key, Reaction()))
    return out


def _read_escalation(n: Node) -> Escalation:
    d = Escalation()
    m = n.mapping(["repeat_window", "repeat_factor", "max_pause"])
    return Escalation(
        repeat_window=_get(m, "repeat_window").duration(d.repeat_window, positive=True) or d.repeat_window,
        repeat_factor=_get(m, "repeat_factor").number(d.repeat_factor, minimum=1.0, maximum=100.0) or d.repeat_factor,
        max_pause=_get(m, "max_pause").duration(d.max_pause, positive=True) or d.max_pause,
    )


def _read_complaints(n: Node) -> Complaints:
    d = Complaints()
    m = n.mapping(["window", "threshold", "slow_to", "ramp"])
    return Complaints(
        window=_get(m, "window").duration(d.window, positive=True) or d.window,
        threshold=_get(m, "threshold").integer(d.threshold, minimum=1) or d.threshold,
        slow_to=_get(m, "slow_to").number(d.slow_to, positive=True, maximum=1.0) or d.slow_to,
        ramp=_get(m, "ramp").duration(d.ramp, positive=True) or d.ramp,
    )


def _read_holds(n: Node) -> Holds:
    d = Holds()
    m = n.mapping(["action", "queue_lifetime", "release_margin", "release_rate", "scan_interval"])
    holds = Holds(
        action=_get(m, "action").choice(d.action, ("hold", "tempfail")),
        queue_lifetime=_get(m, "queue_lifetime").duration(d.queue_lifetime, positive=True) or d.queue_lifetime,
        release_margin=_or(_get(m, "release_margin").duration(d.release_margin), d.release_margin),
        release_rate=_get(m, "release_rate").number(None, positive=True),
        scan_interval=_get(m, "scan_interval").duration(d.scan_interval, positive=True) or d.scan_interval,
    )
    if holds.release_margin >= holds.queue_lifetime:
        _get(m, "release_margin").fail("must be shorter than holds.queue_lifetime")
    return holds


_SOCKET_SPEC = r"(unix:)?/\S+|inet:(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost):\d{1,5}"


def _read_sockets(n: Node) -> Sockets:
    d = Sockets()
    m = n.mapping(["exim", "socketmap", "milter", "owner", "group", "mode"])
    what = "a socket: /path, unix:/path or inet:127.0.0.1:PORT"
    mode = _get(m, "mode")
    mode_value = d.mode
    if not mode.is_null:
        raw = mode.raw()
        text = str(raw) if isinstance(raw, (int, str)) and not isinstance(raw, bool) else ""
        if re.fullmatch(r"0?[0-7]{3}", text):
            mode_value = int(text, 8)
        else:
            mode.fail(f'expected an octal file mode such as "0660", got {raw!r}')
    return Sockets(
        exim=_get(m, "exim").string(d.exim, pattern=r"/\S+", what="an absolute socket path") or d.exim,
        socketmap=_get(m, "socketmap").string(d.socketmap, pattern=_SOCKET_SPEC, what=what) or d.socketmap,
        milter=_get(m, "milter").string(d.milter, pattern=_SOCKET_SPEC, what=what) or d.milter,
        owner=_get(m, "owner").string(None, pattern=r"[A-Za-z_][A-Za-z0-9_.-]*", what="a user name"),
        group=_get(m, "group").string(None, pattern=r"[A-Za-z_][A-Za-z0-9_.-]*", what="a group name"),
        mode=mode_value,
    )


_NEXTHOP = r"(\[[^\]\s]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?"


def _read_postfix(n: Node) -> PostfixConfig:
    d = PostfixConfig()
    m = n.mapping(["config_directory", "command_directory", "nexthop"])
    nexthop = _get(m, "nexthop")
    return PostfixConfig(
        config_directory=_get(m, "config_directory").string(d.config_directory, pattern=r"/\S*",
                                                            what="an absolute directory") or d.config_directory,
        command_directory=_get(m, "command_directory").string(d.command_directory, pattern=r"/\S*",
                                                              what="an absolute directory") or d.command_directory,
        nexthop="" if nexthop.is_null or nexthop.raw() == "" else (
            nexthop.string(d.nexthop, pattern=_NEXTHOP, what="a Postfix nexthop such as [127.0.0.1]:2525") or ""),
    )


def _read_exim(n: Node) -> EximConfig:
    d = EximConfig()
    m = n.mapping(["binary", "config_file", "wait", "readsocket_timeout"])
    return EximConfig(
        binary=_get(m, "binary").string(d.binary, pattern=r"/\S+", what="an absolute path") or d.binary,
        config_file=_get(m, "config_file").string(None, pattern=r"/\S+", what="an absolute path"),
        wait=_or(_get(m, "wait").duration(d.wait), d.wait),
        readsocket_timeout=_get(m, "readsocket_timeout").integer(d.readsocket_timeout, minimum=1, maximum=60)
        or d.readsocket_timeout,
    )


_LISTEN = r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost):\d{1,5}"


def _read_listen(m: dict, key: str, default: str | None) -> str | None:
    """host:port, or null (disabled); absent = ``default``."""
    node = _get(m, key)
    if key in m and node.is_null:
        return None
    return node.string(default, pattern=_LISTEN, what="host:port such as 127.0.0.1:9425 (or null to disable)")


def _read_metrics(n: Node) -> Metrics:
    d = Metrics()
    m = n.mapping(["listen", "milter_listen", "queue_agent_listen"])
    return Metrics(listen=_read_listen(m, "listen", d.listen),
                   milter_listen=_read_listen(m, "milter_listen", d.milter_listen),
                   queue_agent_listen=_read_listen(m, "queue_agent_listen", d.queue_agent_listen))


_FACILITIES = ("mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
               "local7")


def _read_logging(n: Node) -> Logging:
    d = Logging()
    m = n.mapping(["syslog", "facility", "level", "ident", "stderr", "syslog_socket"])
    return Logging(
        syslog=_get(m, "syslog").boolean(d.syslog),
        facility=_get(m, "facility").choice(d.facility, _FACILITIES),
        level=_get(m, "level").choice(d.level, ("debug", "info", "notice", "warning", "error")),
        ident=_get(m, "ident").string(d.ident, pattern=r"[A-Za-z0-9_.-]{1,32}", what="a syslog ident") or d.ident,
        stderr=_get(m, "stderr").boolean(d.stderr),
        syslog_socket=_get(m, "syslog_socket").string(d.syslog_socket, pattern=r"/.{1,106}",
                                                      what="an absolute path to a unix socket"),
    )


_TOP_KEYS = ("redis", "mode", "redis_down", "time_scale", "pool", "limits", "warmup", "domains", "reactions",
             "class_reactions", "escalation", "complaints", "holds", "sockets", "postfix", "exim", "metrics",
             "logging")


def _get(m: dict[str, Node], key: str) -> Node:
    """The child node, or an empty node standing for "not given" (defaults apply)."""
    if key in m:
        return m[key]
    any_node = next(iter(m.values()), None)
    problems = any_node.problems if any_node else Problems()
    file = any_node.file if any_node else "<config>"
    return Node(None, file, key, problems)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# --------------------------------------------------------------------------- defaults
@functools.lru_cache(maxsize=1)
def _bundled_reactions() -> tuple[dict[str, Reaction], dict[str, Reaction]]:
    """Default reactions from governor/data/reactions.yaml (validated like user config).

    Read once per process: the file is part of the package, and callers only copy the
    dicts (``_read_reactions``) of frozen Reactions."""
    text = resources.files("governor").joinpath("data/reactions.yaml").read_text()
    root, problems = parse(text, "reactions.yaml", error=ConfigError)
    m = root.mapping(["reactions", "class_reactions"])
    codes = _read_reactions(_get(m, "reactions"), {}, classes=False)
    classes = _read_reactions(_get(m, "class_reactions"), {}, classes=True)
    problems.raise_if_any()
    return codes, classes


def apply_time_scale(cfg: Config) -> Config:
    """Multiply every duration by time_scale (tests run Yahoo's hours in seconds)."""
    s = cfg.time_scale
    if s == 1.0:
        return cfg

    def sc(obj: Any, names: tuple[str, ...]) -> Any:
        return dataclasses.replace(obj, **{k: getattr(obj, k) * s for k in names if getattr(obj, k) is not None})

    return dataclasses.replace(
        cfg,
        limits=sc(cfg.limits, ("lease_ttl",)),
        reactions={k: sc(r, ("pause", "ramp")) for k, r in cfg.reactions.items()},
        class_reactions={k: sc(r, ("pause", "ramp")) for k, r in cfg.class_reactions.items()},
        escalation=sc(cfg.escalation, ("repeat_window", "max_pause")),
        complaints=sc(cfg.complaints, ("window", "ramp")),
        holds=sc(cfg.holds, ("queue_lifetime", "release_margin", "scan_interval")),
    )


# --------------------------------------------------------------------------- entry points
def load_config_text(text: str, name: str = "<string>") -> Config:
    """Validate YAML text into a Config; raises ConfigError listing every problem."""
    return _read_config(*parse(text, name, error=ConfigError))


def _read_config(root: Node, problems: Problems) -> Config:
    name = root.file
    m = root.mapping(_TOP_KEYS)
    codes, classes = _bundled_reactions()
    cfg = Config(
        source=name,
        mode=_get(m, "mode").choice("enforce", ("enforce", "monitor")),
        redis_down=_get(m, "redis_down").choice("fail-open", ("fail-open", "fail-closed")),
        time_scale=_get(m, "time_scale").number(1.0, positive=True, maximum=1000.0) or 1.0,
        redis=_read_redis(_get(m, "redis")),
        pool=_read_pool(_get(m, "pool")),
        limits=_read_limits(_get(m, "limits")),
        warmup=_read_warmup(_get(m, "warmup")),
        domains=_read_domains(_get(m, "domains")),
        reactions=_read_reactions(_get(m, "reactions"), codes, classes=False),
        class_reactions=_read_reactions(_get(m, "class_reactions"), classes, classes=True),
        escalation=_read_escalation(_get(m, "escalation")),
        complaints=_read_complaints(_get(m, "complaints")),
        holds=_read_holds(_get(m, "holds")),
        sockets=_read_sockets(_get(m, "sockets")),
        postfix=_read_postfix(_get(m, "postfix")),
        exim=_read_exim(_get(m, "exim")),
        metrics=_read_metrics(_get(m, "metrics")),
        logging=_read_logging(_get(m, "logging")),
    )
    problems.raise_if_any()
    return apply_time_scale(cfg)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``; with None, the default file if it exists, else built-in defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return default_config()
        path = DEFAULT_PATH
    return _read_config(*load(path, error=ConfigError))


def default_config() -> Config:
    """Built-in defaults (bundled reactions, no pool)."""
    return load_config_text("", "<defaults>")
