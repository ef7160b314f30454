"""Exim configuration for the governor: the snippets under ``exim/``, filled in for a pool.

The config text lives in the repository's ``exim/conf.d/`` tree, laid out like
Debian's split configuration. Most files are static and driven by macros; two
are templates with one block per item (``transport/30_yahoo-governor.in``: one
smtp transport per egress IP; ``retry/25_yahoo-governor.in``: one retry rule per
Yahoo domain). This module only supplies what depends on the governor's config:
the value macros at the top of ``main/00_yahoo-governor_macros`` and the
template blocks, so the Exim text has exactly one source.

Two layouts come out of the same pieces:

* ``split``: Debian conf.d files (``main/00_yahoo-governor_macros``,
  ``main/95_yahoo-governor_options``, ``acl/25_yahoo-governor``,
  ``router/150_yahoo-governor``, ``transport/30_yahoo-governor``,
  ``retry/25_yahoo-governor``) to copy into ``/etc/exim4/conf.d``;
* ``monolithic``: one file per section (``yahoo-governor-main.conf`` …) that a
  hand-written ``exim4.conf`` pulls in with ``.include`` (see docs/exim.md).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from governor.config import Config
from governor.domains import load_bundled
from governor.transports import exim_transport

#: Overrides where the exim/ snippets are read from (packaged installs).
ASSET_ENV = "GOVERNOR_EXIM_ASSETS"
_REPO_ASSETS = Path(__file__).resolve().parents[1] / "exim"
_SYSTEM_ASSETS = Path("/usr/share/yahoo-governor/exim")

HELD_ACTIONS = ("defer", "queue", "freeze")
LAYOUTS = ("split", "monolithic")

#: conf.d piece → the monolithic file it goes into; the order is the order in a concatenated config.
_PIECES: tuple[tuple[str, str], ...] = (
    ("main/00_yahoo-governor_macros", "yahoo-governor-main.conf"),
    ("main/95_yahoo-governor_options", "yahoo-governor-main.conf"),
    ("acl/25_yahoo-governor", "yahoo-governor-acl.conf"),
    ("router/150_yahoo-governor", "yahoo-governor-routers.conf"),
    ("transport/30_yahoo-governor", "yahoo-governor-transports.conf"),
    ("retry/25_yahoo-governor", "yahoo-governor-retry.conf"),
)

#: The conf.d files the governor owns (``governor setup exim remove`` deletes exactly these).
PIECE_NAMES = tuple(name for name, _ in _PIECES)

#: Exim config section of each conf.d directory (for concatenation and docs).
SECTIONS = {"main": "", "acl": "acl", "router": "routers", "transport": "transports", "retry": "retry"}


class EximSetupError(ValueError):
    """The governor's config cannot be turned into a sound Exim config."""


@dataclass(frozen=True)
class Egress:
    """One per-IP transport: its Exim name, source address and local concurrency cap."""

    transport: str
    ip: str
    max_parallel: int


@dataclass(frozen=True)
class EximSetup:
    """Everything the snippets need, derived from a :class:`Config` (see :func:`setup_from_config`).

    ``route_list``/``route_self`` switch the governed route from dnslookup to a
    manualroute (a smarthost, or the lab's simulator); ``rcpt_hook`` points
    Debian's MAIN_ACL_CHECK_RCPT at the governor's wrapper ACL.
    """

    socket: str
    timeout: int
    fail_closed: bool
    per_connection: int
    held_action: str
    egress: tuple[Egress, ...]
    domains: tuple[str, ...]
    retry_cutoff: float
    retry_interval: float
    hold_domains: bool = True
    rcpt_hook: bool = True
    route_list: str | None = None
    route_self: str | None = None
    extra_macros: Mapping[str, str] = field(default_factory=dict)
    source: str = "<defaults>"


# --------------------------------------------------------------------------- derive
def setup_from_config(cfg: Config, **overrides: object) -> EximSetup:
    """The snippet settings for ``cfg``; keyword arguments override single fields.

    Raises EximSetupError when the result could lose or stall mail: no egress IP,
    a readsocket timeout not longer than the daemon's wait (every acquire that
    waits would time out and fail open), or a retry cutoff shorter than the
    longest cooldown (a hold would bounce the domain's mail).
    """
    setup = EximSetup(
        socket=cfg.sockets.exim,
        timeout=cfg.exim.readsocket_timeout,
        fail_closed=cfg.redis_down == "fail-closed",
        per_connection=min(20, cfg.limits.messages_per_connection),
        held_action="freeze" if cfg.holds.action == "hold" else "defer",
        egress=tuple(Egress(exim_transport(e.name), e.ip, cfg.limits_for(e.ip).concurrency)
                     for e in cfg.pool if e.enabled),
        domains=governed_domain_names(cfg),
        retry_cutoff=cfg.holds.queue_lifetime,
        retry_interval=max(1.0, min(60.0, cfg.holds.queue_lifetime / 1000)),
        source=cfg.source,
    )
    setup = replace(setup, **overrides)  # type: ignore[arg-type]
    check_setup(setup, wait=cfg.exim.wait, max_pause=cfg.escalation.max_pause)
    return setup


def check_setup(setup: EximSetup, *, wait: float, max_pause: float) -> None:
    """Refuse settings that the measured Exim behaviour turns into lost or stalled mail."""
    if not setup.egress:
        raise EximSetupError("the pool has no enabled egress IP: nothing to generate transports for")
    if setup.timeout <= wait:
        raise EximSetupError(
            f"exim.readsocket_timeout ({setup.timeout}s) must be longer than exim.wait ({wait:g}s): "
            "an acquire that waits for a slot would time out and fail open")
    if setup.retry_cutoff <= max_pause:
        raise EximSetupError(
            f"the Yahoo retry cutoff ({exim_time(setup.retry_cutoff)}, holds.queue_lifetime) must be longer "
            f"than the longest cooldown ({exim_time(max_pause)}, escalation.max_pause): Exim bounces an "
            "address whose retry record is older than the cutoff")
    if setup.held_action not in HELD_ACTIONS:
        raise EximSetupError(f"held action must be one of {', '.join(HELD_ACTIONS)}, got {setup.held_action!r}")


def governed_domain_names(cfg: Config) -> tuple[str, ...]:
    """Domains known to be Yahoo's by name: bundled set + domains.include − exclude/never.

    A superset is harmless here (retry rules, fail-closed deferral); the daemon
    still decides per address, including domains it knows only by their MX.
    """
    bundled = load_bundled()
    names = dict.fromkeys([*bundled.entries, *cfg.domains.include])
    for dropped in (*bundled.never, *cfg.domains.exclude):
        names.pop(dropped, None)
    return tuple(names)


def exim_time(seconds: float) -> str:
    """An Exim time value (``5d``, ``90m``, ``12s``): the largest unit that is exact,
    rounded up to whole seconds (Exim has no fractions)."""
    whole = max(1, math.ceil(seconds - 1e-9))
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


# --------------------------------------------------------------------------- text
def value_macros(setup: EximSetup, layout: str) -> str:
    """The generated head of main/00: the settings of this pool, one macro each."""
    lines = [
        f"# Generated by `governor exim-config --{layout}` from {setup.source}.",
        f"# Pool: {', '.join(f'{e.transport}={e.ip}' for e in setup.egress)}.",
        "# Comment out YAHOO_GOVERNOR_ENABLE to switch the integration off.",
        "YAHOO_GOVERNOR_ENABLE = yes",
        f"YAHOO_GOVERNOR_SOCKET = {setup.socket}",
        f"YAHOO_GOVERNOR_TIMEOUT = {setup.timeout}s",
        f"YAHOO_GOVERNOR_PER_CONNECTION = {setup.per_connection}",
    ]
    flags = {
        "YAHOO_GOVERNOR_FAIL_CLOSED": setup.fail_closed,
        "YAHOO_GOVERNOR_HOLD_DOMAINS": setup.hold_domains,
        "YAHOO_GOVERNOR_RCPT_HOOK": setup.rcpt_hook and layout == "split",
        "YAHOO_GOVERNOR_WHEN_HELD_QUEUE": setup.held_action == "queue",
        "YAHOO_GOVERNOR_WHEN_HELD_FREEZE": setup.held_action == "freeze",
    }
    lines += [f"{name} = yes" for name, on in flags.items() if on]
    if setup.route_list:
        lines.append(f"YAHOO_GOVERNOR_ROUTE_LIST = {setup.route_list}")
    if setup.route_self:
        lines.append(f"YAHOO_GOVERNOR_ROUTE_SELF = {setup.route_self}")
    lines += [f"{name} = {value}" for name, value in setup.extra_macros.items()]
    lines.append("domainlist yahoo_governor_domains = " + " : ".join(setup.domains))
    return "\n".join(lines) + "\n\n"


def expand_blocks(template: str, items: Iterable[Mapping[str, str]]) -> str:
    """Repeat the lines between ``@BLOCK_START@`` and ``@BLOCK_END@`` once per item,
    replacing ``@KEY@`` placeholders; placeholders outside the block are filled from
    the first item (they only appear in comments)."""
    head, _, rest = template.partition("@BLOCK_START@\n")
    block, _, tail = rest.partition("@BLOCK_END@\n")
    items = list(items)
    body = "".join(_fill(block, item) for item in items)
    first = items[0] if items else {}
    return _fill(head, first) + body + _fill(tail, first)


def _fill(text: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _template_items(name: str, setup: EximSetup) -> list[dict[str, str]]:
    if name.startswith("transport/"):
        return [{"TRANSPORT": e.transport, "IP": e.ip, "MAX_PARALLEL": str(e.max_parallel)}
                for e in setup.egress]
    cutoff, interval = exim_time(setup.retry_cutoff), exim_time(setup.retry_interval)
    return [{"DOMAIN": d, "CUTOFF": cutoff, "INTERVAL": interval} for d in setup.domains]


def assets_dir() -> Path:
    """Where ``exim/conf.d`` lives: $GOVERNOR_EXIM_ASSETS, the source tree, or the
    system copy a package installs."""
    for candidate in (os.environ.get(ASSET_ENV), _REPO_ASSETS, _SYSTEM_ASSETS):
        if candidate and (Path(candidate) / "conf.d").is_dir():
            return Path(candidate)
    raise EximSetupError(f"Exim snippets not found (looked at ${ASSET_ENV}, {_REPO_ASSETS}, {_SYSTEM_ASSETS})")


def conf_d_files(setup: EximSetup, layout: str = "split", assets: Path | None = None) -> dict[str, str]:
    """conf.d path → text, in concatenation order, for this pool."""
    base = (assets or assets_dir()) / "conf.d"
    out: dict[str, str] = {}
    for name, _ in _PIECES:
        plain = base / name
        if plain.exists():
            text = plain.read_text()
        else:
            text = expand_blocks((base / f"{name}.in").read_text(), _template_items(name, setup))
        if name == "main/00_yahoo-governor_macros":
            text = value_macros(setup, layout) + text
        out[name] = text
    return out


def render(setup: EximSetup, layout: str = "split", assets: Path | None = None) -> dict[str, str]:
    """The files of one layout: conf.d paths (split) or one file per section (monolithic)."""
    if layout not in LAYOUTS:
        raise EximSetupError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    pieces = conf_d_files(setup, layout, assets)
    if layout == "split":
        return pieces
    out: dict[str, str] = {}
    mono = dict(_PIECES)
    for name, text in pieces.items():
        target = mono[name]
        out[target] = out.get(target, "") + text
    return out


def section_of(name: str) -> str:
    """The Exim config section of a conf.d path or monolithic file name ('' = main)."""
    for prefix, section in SECTIONS.items():
        if name.startswith(f"{prefix}/") or name == f"yahoo-governor-{section or 'main'}.conf":
            return section
    raise EximSetupError(f"unknown piece {name!r}")


def assemble(files: Mapping[str, str], sections: Mapping[str, str] | None = None) -> str:
    """One config from generated pieces plus the admin's own text per section.

    ``sections`` maps a section ('' main, 'acl', 'routers', 'transports',
    'retry') to text that goes after the governor's piece of that section: the
    governor's router must come before the admin's dnslookup router, its retry
    rules before the catch-all ``*`` rule.
    """
    sections = dict(sections or {})
    out: list[str] = []
    for section in ("", "acl", "routers", "transports", "retry"):
        if section:
            out.append(f"begin {section}\n")
        out += [text for name, text in files.items() if section_of(name) == section]
        out.append(sections.pop(section, ""))
    if sections:
        raise EximSetupError(f"unknown sections: {', '.join(sections)}")
    return "\n".join(out)


def write_files(files: Mapping[str, str], outdir: str | os.PathLike[str]) -> list[Path]:
    """Write the pieces under ``outdir`` (conf.d subdirectories are created), mode 0644."""
    written = []
    for name, text in files.items():
        path = Path(outdir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
        written.append(path)
    return written


def include_lines(paths: Sequence[Path]) -> dict[str, str]:
    """Section → the ``.include`` line a monolithic exim4.conf needs for each file."""
    return {section_of(p.name): f".include {p}" for p in paths}
