"""Key naming and input validation: nothing reaches a Redis key unchecked.

Every per-IP key carries the IP as a Redis Cluster hash tag, so the keys of one
IP live in one slot and a per-IP script never crosses slots. The scheme is
documented in ``governor/store/__init__.py`` and ``docs/store.md``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
_MTA_RE = re.compile(r"[a-z][a-z0-9_-]{0,15}")
_HOLDER_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,48}")
_TOKEN_RE = re.compile(r"[0-9a-f]{16}")
_DOMAIN_RE = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}\.?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# a recipient as MTAs hand it over (Postfix keeps case and +extension): a local part
# without whitespace, control characters or braces (the Cluster hash-tag syntax), "@",
# and a host name (checked with _DOMAIN_RE, case-insensitively)
_RECIPIENT_RE = re.compile(r"([^\s\x00-\x1f\x7f{}]{1,200})@([^@]{1,253})")
RECIPIENT_MAX = 254
PROVIDERS = ("yahoo",)
REPLY_MAX_BYTES = 512
TEXT_MAX_CHARS = 200


def _shown(value: object) -> str:
    """A value for an error message: repr, cut so a 10 kB attack doesn't flood logs."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@lru_cache(maxsize=4096)
def _normalise_ip(value: str) -> str:
    return str(ipaddress.ip_address(value))


def valid_ip(value: object) -> str:
    """The normalised IP literal, or ValueError. Scoped IPv6 (``fe80::1%eth0``) is refused:
    the scope would carry arbitrary text into key names."""
    if not isinstance(value, str) or not 2 <= len(value) <= 45 or "%" in value:
        raise ValueError(f"not an IP address: {_shown(value)}")
    try:
        return _normalise_ip(value)
    except ValueError:
        raise ValueError(f"not an IP address: {_shown(value)}") from None


def valid_queue_id(value: object) -> str:
    if not isinstance(value, str) or not _QUEUE_ID_RE.fullmatch(value):
        raise ValueError(f"not a queue id ([A-Za-z0-9-]{{1,32}}): {_shown(value)}")
    return value


def valid_mta(value: object) -> str:
    if not isinstance(value, str) or not _MTA_RE.fullmatch(value):
        raise ValueError(f"not an MTA name ([a-z][a-z0-9_-]{{0,15}}): {_shown(value)}")
    return value


def valid_provider(value: object) -> str:
    if value not in PROVIDERS:
        raise ValueError(f"unknown provider {_shown(value)}; known: {', '.join(PROVIDERS)}")
    return str(value)


def valid_holder(value: object) -> str:
    """A lease holder label ("" for none); it becomes part of the lease id."""
    if value == "":
        return ""
    if not isinstance(value, str) or not _HOLDER_RE.fullmatch(value):
        raise ValueError(f"not a lease holder ([A-Za-z0-9_.:@-]{{1,48}}): {_shown(value)}")
    return value


def valid_domain(value: object) -> str:
    if not isinstance(value, str) or not _DOMAIN_RE.fullmatch(value.lower()):
        raise ValueError(f"not a domain name: {_shown(value)}")
    return value.lower().rstrip(".")


def valid_recipient(value: object) -> str:
    """A recipient address ``local@domain``: at most 254 characters (RFC 5321's path
    limit), a local part without whitespace, control characters or braces, a host name
    after the last "@". Kept as given (case, extension): it is a ZSET member that an
    MTA's queue listing is matched against, never a key."""
    match = _RECIPIENT_RE.fullmatch(value) if isinstance(value, str) and len(value) <= RECIPIENT_MAX else None
    if match is None or not _DOMAIN_RE.fullmatch(match[2].lower()):
        raise ValueError(f"not a recipient (local@domain, at most {RECIPIENT_MAX} characters, no spaces, "
                         f"control characters or braces): {_shown(value)}")
    return value


def valid_text(value: object, what: str = "reason", limit: int = TEXT_MAX_CHARS) -> str:
    """Operator free text (reason, who): printable, one line, bounded."""
    if not isinstance(value, str) or len(value) > limit or _CONTROL_RE.search(value):
        raise ValueError(f"not a valid {what} (one line, at most {limit} characters): {_shown(value)}")
    return value


def valid_seconds(value: object, what: str = "seconds") -> float:
    """A positive, finite duration."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10 * 365 * 86400:
        raise ValueError(f"not a valid {what} (positive, finite): {_shown(value)}")
    return float(value)


def reply_text(value: object) -> str:
    """Yahoo's reply for the audit: control characters become spaces (multi-line replies
    join into one line), cut to 512 bytes without splitting a UTF-8 sequence."""
    if value is None:
        return ""
    text = _CONTROL_RE.sub(" ", str(value)).strip()
    raw = text.encode("utf-8", "replace")
    if len(raw) <= REPLY_MAX_BYTES:
        return text
    return raw[:REPLY_MAX_BYTES].decode("utf-8", "ignore")


def parse_lease(lease: object) -> tuple[str, str]:
    """``"<ip>|<token>[|<holder>]"`` -> (ip, ZSET member); ValueError naming a bad value.

    The IP is part of the id so release finds the IP's key without a lookup.
    """
    if not isinstance(lease, str) or len(lease) > 120:
        raise ValueError(f"not a lease id: {_shown(lease)}")
    ip, sep, member = lease.partition("|")
    token, _, holder = member.partition("|")
    if not sep or not _TOKEN_RE.fullmatch(token) or (member != token and not _HOLDER_RE.fullmatch(holder)):
        raise ValueError(f"not a lease id: {_shown(lease)}")
    try:
        norm = valid_ip(ip)
    except ValueError:
        raise ValueError(f"not a lease id: {_shown(lease)}") from None
    if norm != ip:
        raise ValueError(f"not a lease id (IP not in normal form): {_shown(lease)}")
    return ip, member


@dataclass(frozen=True)
class IpKeys:
    """The keys of one IP; all share the hash tag ``{<ip>}``."""

    leases: str
    state: str
    pauses: str
    defer: str
    compl: str
    holds: str
    assigned: str
    audit: str        # this IP's audit stream: used on Redis Cluster only (one slot per script)

    @property
    def acquire(self) -> tuple[str, str]:
        return (self.leases, self.state)

    @property
    def record(self) -> tuple[str, str, str, str]:
        return (self.state, self.pauses, self.defer, self.compl)

    @property
    def status(self) -> tuple[str, ...]:
        return (self.leases, self.state, self.pauses, self.defer, self.compl, self.holds)


class KeyScheme:
    """``<prefix>:{<ip>}:<name>`` per IP; ``<prefix>:<name>`` for the few global keys.

    ``cluster=True`` (Redis Cluster): the keys a script touches together must share a
    slot, so the audit is written to each IP's own stream ``<p>:{<ip>}:audit`` and the
    provider record's keys share the tag ``{provider}``. A single Redis (or Sentinel)
    keeps one stream ``<p>:audit``: one XRANGE reads it in order.
    """

    def __init__(self, prefix: str = "gov", *, cluster: bool = False) -> None:
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"not a key prefix ([A-Za-z0-9_.-]{{1,32}}): {_shown(prefix)}")
        self.prefix = prefix
        self.cluster = cluster
        self.hold_index = f"{prefix}:holdidx"
        self.assign_rr = f"{prefix}:assign:rr"
        if cluster:
            self.provider = f"{prefix}:{{provider}}"
            self.provider_pauses = f"{prefix}:{{provider}}:pauses"
            self.audit = f"{prefix}:{{provider}}:audit"
        else:
            self.provider = f"{prefix}:provider"
            self.provider_pauses = f"{prefix}:provider:pauses"
            self.audit = f"{prefix}:audit"

    @lru_cache(maxsize=4096)  # noqa: B019 - one scheme per store, bounded
    def ip(self, ip: str) -> IpKeys:
        """Keys of an IP that valid_ip() already normalised."""
        base = f"{self.prefix}:{{{ip}}}:"
        return IpKeys(*(base + n for n in ("leases", "state", "pauses", "defer", "compl", "holds",
                                           "assigned", "audit")))

    def audit_for(self, keys: IpKeys | None) -> str:
        """The stream an action on ``keys`` (None: the provider record) is audited to."""
        if not self.cluster:
            return self.audit
        return keys.audit if keys is not None else self.audit
