"""Settings of the Yahoo MX simulator: defaults, validation, YAML loading.

Every limit is one field of :class:`Settings`; the same names are used in the YAML
file, in the control protocol's ``set KEY VALUE`` and (with dashes) as CLI flags,
so there is exactly one vocabulary.

The simulator only ever binds loopback addresses (127.0.0.0/8 and ::1): it plays
Yahoo toward MTAs on this host and must never be reachable from, or send anything
to, the outside world. :func:`parse_endpoint` enforces that for every listener
and for the TCP control port.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor.yamlnode import YamlError, load

STAGES = ("connect", "mail", "rcpt")

#: Greeting host name and the host named in ``dd`` replies (Yahoo's own sample).
DEFAULT_HOSTNAME = "mta1234.mail.gq1.yahoo.com"
DEFAULT_PORT = 2525
#: ``nouser@…``, ``unknown.7@…`` → 554 dd (recipient unknown).
DEFAULT_DD_PATTERN = r"^(?:nouser|unknown)(?:[-._+][^@]*)?@"
#: ``complain@…``, ``defer-3@…`` → per-recipient 451 [160] (complaint-like signal).
DEFAULT_DEFER_PATTERN = r"^(?:complain|defer)(?:[-._+][^@]*)?@"


class SettingsError(YamlError):
    """Invalid simulator setting; the message names the key (and file:line if known).

    From :meth:`Settings.from_yaml`, ``problems`` lists every error in the file.
    """


@dataclass(frozen=True)
class Endpoint:
    """A validated loopback ``host:port`` (port 0 = let the kernel choose)."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def normalize_ip(text: str) -> str:
    """Canonical text form of an IP (IPv4-mapped IPv6 becomes IPv4); raise SettingsError."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise SettingsError(f"not an IP address: {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def parse_endpoint(text: str, what: str = "listen address") -> Endpoint:
    """Parse ``127.0.0.2:2525`` or ``[::1]:2525``; refuse anything but loopback.

    Host names are refused too (even ``localhost``): the simulator must know
    exactly which address it binds, and a name could resolve elsewhere.
    """
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", text)
    if not m:
        raise SettingsError(
            f"{what} {text!r}: expected ADDR:PORT with a literal IP, e.g. 127.0.0.1:2525 or [::1]:2525"
        )
    host, port_text = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise SettingsError(f"{what} {text!r}: {host!r} is not an IP address") from None
    if not addr.is_loopback:
        raise SettingsError(
            f"refusing {what} {text}: the simulator binds loopback addresses only "
            f"(127.0.0.0/8 or ::1), never {addr}"
        )
    port = int(port_text)
    if port > 65535:
        raise SettingsError(f"{what} {text!r}: port out of range")
    return Endpoint(addr.compressed, port)


def parse_control(text: str) -> str | Endpoint:
    """A control address: a unix-socket path (contains ``/``) or a loopback ADDR:PORT."""
    if "/" in text:
        return text
    return parse_endpoint(text, "control address")


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"{key}: expected an integer, got {value!r}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise SettingsError(f"{key}: expected an integer, got {value!r}")
    if number < minimum:
        raise SettingsError(f"{key}: must be >= {minimum}, got {number}")
    return number


def _as_seconds(key: str, value: Any, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{key}: expected seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key}: expected seconds, got {value!r}") from None
    if number != number or number < minimum or (strict and number == minimum):
        op = ">" if strict else ">="
        raise SettingsError(f"{key}: must be {op} {minimum}, got {value!r}")
    return number


def _as_pattern(key: str, value: Any) -> str:
    text = "" if value is None else str(value)
    try:
        re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise SettingsError(f"{key}: invalid regular expression {text!r}: {exc}") from None
    return text


def _as_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    raise SettingsError(f"{key}: expected a list, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """All knobs of the simulator (see ``governor sim --help`` for what each does)."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", DEFAULT_PORT),)
    sink: tuple[Endpoint, ...] = ()
    control: str | Endpoint | None = None
    stats_file: str | None = None
    hostname: str = DEFAULT_HOSTNAME
    # per sending IP
    max_conn: int = 5
    max_rate: int = 100
    rate_window: float = 60.0
    max_per_conn: int = 20
    stage: str = "mail"
    # penalty memory and escalation
    penalty: float = 60.0
    ts02_after: int = 20
    ts03_after: int = 50
    violation_reset: float = 14400.0
    # cold IPs, blocks, recipients
    cold_ips: tuple[str, ...] = ()
    cold_budget: int = 500
    cold_window: float = 86400.0
    blocked_ips: tuple[str, ...] = ()
    dd_pattern: str = DEFAULT_DD_PATTERN
    defer_pattern: str = DEFAULT_DEFER_PATTERN
    # sessions
    idle_timeout: float = 300.0
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.listen and not self.sink:
            raise SettingsError("listen: at least one listener is needed")
        if self.ts03_after < self.ts02_after:
            raise SettingsError(
                f"ts03_after ({self.ts03_after}) must be >= ts02_after ({self.ts02_after})"
            )

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Settings | None = None) -> Settings:
        """Validate a flat mapping of setting names → values on top of ``base``."""
        base = base or cls()
        values: dict[str, Any] = {}
        for key, value in data.items():
            values[str(key).replace("-", "_")] = coerce(str(key), value)
        return dataclasses.replace(base, **values)

    @classmethod
    def from_yaml(cls, path: str | Path, base: Settings | None = None) -> Settings:
        """Load a flat YAML mapping; every error is ``file:line: key: message``."""
        root, problems = load(path, error=SettingsError)
        values: dict[str, Any] = {}
        for key, node in root.items():
            try:
                values[key.replace("-", "_")] = coerce(key, node.raw())
            except SettingsError as exc:
                node.fail(str(exc).removeprefix(key.replace("-", "_") + ": "))
        problems.raise_if_any()
        # Cross-field checks (ts03_after >= ts02_after) see the whole file at once.
        try:
            return dataclasses.replace(base or cls(), **values)
        except SettingsError as exc:
            root.fail(str(exc))
            problems.raise_if_any()
            raise

    def with_value(self, key: str, value: Any) -> Settings:
        """A copy with one setting changed (validated); used by ``set KEY VALUE``."""
        return self.from_mapping({key: value}, self)

    # -- views ---------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (endpoints as strings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            elif isinstance(value, Endpoint):
                value = str(value)
            out[f.name] = value
        return out


#: Settings that ``set KEY VALUE`` may change while the simulator runs.
RUNTIME_KEYS = (
    "max_conn", "max_rate", "rate_window", "max_per_conn", "stage", "penalty",
    "ts02_after", "ts03_after", "violation_reset", "cold_budget", "cold_window",
    "dd_pattern", "defer_pattern", "hostname", "idle_timeout", "shutdown_timeout",
)

_INT_MIN = {"max_conn": 1, "max_rate": 1, "max_per_conn": 1, "ts02_after": 1, "ts03_after": 1,
            "cold_budget": 0}
_SECONDS = {"rate_window": (0.0, True), "penalty": (0.0, False), "violation_reset": (0.0, True),
            "cold_window": (0.0, True), "idle_timeout": (0.0, True), "shutdown_timeout": (0.0, False)}


def coerce(key: str, value: Any) -> Any:
    """Validate and convert one setting value (strings from the CLI/control are fine)."""
    key = key.replace("-", "_")
    if key in _INT_MIN:
        return _as_int(key, value, _INT_MIN[key])
    if key in _SECONDS:
        minimum, strict = _SECONDS[key]
        return _as_seconds(key, value, minimum, strict)
    if key in ("dd_pattern", "defer_pattern"):
        return _as_pattern(key, value)
    if key == "stage":
        stage = str(value).strip().lower()
        if stage not in STAGES:
            raise SettingsError(f"stage: must be one of {', '.join(STAGES)}, got {value!r}")
        return stage
    if key == "hostname":
        name = str(value).strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
            raise SettingsError(f"hostname: not a host name: {value!r}")
        return name
    if key in ("listen", "sink"):
        return tuple(parse_endpoint(v, f"{key} address") for v in _as_list(key, value))
    if key == "control":
        return None if value in (None, "") else parse_control(str(value))
    if key == "stats_file":
        return None if value in (None, "") else str(value)
    if key in ("cold_ips", "blocked_ips"):
        return tuple(dict.fromkeys(normalize_ip(v) for v in _as_list(key, value)))
    raise SettingsError(f"unknown setting {key!r}")
