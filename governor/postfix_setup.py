"""``governor postfix-config``: the main.cf and master.cf lines that wire Postfix to the governor.

Why this shape (every point measured on Postfix 3.7, see docs/postfix-levers.md and
docs/postfix.md):

* **Slot transports pace each egress IP.** Postfix cannot pace a source IP, but
  ``<transport>_transport_rate_delay`` serialises and spaces one transport. Each
  egress IP gets ``limits_plan(limits).slots`` (see governor.transports) clones of
  smtp (``maxproc`` 1, bound to the IP), each one delivery every ``delay`` seconds.
  The delay is a main.cf parameter: qmgr reads it there, never from ``-o``.
* **Queue-time assignment.** qmgr resolves a recipient when the message becomes
  active; the governor's socketmap (``transport`` map) answers with a slot of an IP
  that may send, or ``retry:`` when none may. Only qmgr may ask it: smtpd would turn
  ``retry:`` into a 450 at RCPT, and a slow map would stall cleanup. qmgr therefore
  gets its own trivial-rewrite service (``gov-rewrite``) that carries the map; every
  smtpd and cleanup keeps the map-less default resolver, untouched.
* **Feedback** comes from ``smtp_delivery_status_filter`` per slot transport: the map
  name ``status-<egress name>`` is the only way the daemon can tell which IP a reply
  belongs to (the request has no queue id and no source address).
* **Connections.** With a rate delay of 2 s or more on-demand connection caching never
  engages; ``smtp_connection_cache_destinations`` (``static:all``: these transports
  only carry governed mail) with a cache time limit longer than the delay keeps one
  connection per slot. ``smtp_connection_reuse_count_limit = N`` allows N+1
  messages, so it is set to ``messages_per_connection - 1``.
* **Services that open the governor's sockets run unchrooted** (``gov-rewrite`` and
  the slots), so socket paths are plain absolute paths. The milter socket is opened
  by smtpd, which Debian chroots: a path under the queue directory is then given
  relative to it.

Nothing here runs Postfix; :func:`apply` runs ``postconf`` against a config
directory (idempotent: re-running replaces the governor's own lines only).
"""
from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from governor.config import Config, EgressIP
from governor.transports import SlotPlan, limits_plan, slot_transport

TRANSPORT_MAP = "transport"
STATUS_MAP_PREFIX = "status-"
RESOLVER_SERVICE = "gov-rewrite"
#: Milter timeouts (per-milter settings inside ``smtpd_milters = { ... }``). The milter
#: answers from a 0.5 s cache and Redis calls time out after ``redis.socket_timeout``,
#: so a milter that needs longer is broken and ``default_action`` should apply quickly.
MILTER_TIMEOUTS = {"connect_timeout": "5s", "command_timeout": "5s", "content_timeout": "15s"}
#: Postfix time values have whole-second granularity ("500ms" would mean 500 minutes).
MIN_CACHE_SECONDS = 10


class SetupError(ValueError):
    """The configuration cannot be expressed as Postfix settings (one line, for the CLI)."""


# --------------------------------------------------------------------------- socket specs
def socket_path(spec: str) -> str | None:
    """The filesystem path of a ``unix:/path`` or ``/path`` socket spec (None for inet)."""
    if spec.startswith("inet:"):
        return None
    return spec.removeprefix("unix:")


def _inet_host_port(spec: str) -> tuple[str, str]:
    host, _, port = spec.removeprefix("inet:").rpartition(":")
    return host, port


def postfix_socket(spec: str) -> str:
    """A config socket spec as Postfix writes it: ``unix:/path`` or ``inet:host:port``."""
    path = socket_path(spec)
    return f"unix:{path}" if path is not None else spec


def socketmap_table(spec: str, name: str) -> str:
    """``socketmap:unix:/path:NAME`` (or ``socketmap:inet:host:port:NAME``)."""
    return f"socketmap:{postfix_socket(spec)}:{name}"


def pymilter_socket(spec: str) -> str:
    """A config socket spec as libmilter wants it: ``unix:/path`` or ``inet:PORT@HOST``."""
    path = socket_path(spec)
    if path is not None:
        return f"unix:{path}"
    host, port = _inet_host_port(spec)
    if host.startswith("["):
        return f"inet6:{port}@{host.strip('[]')}"
    return f"inet:{port}@{host}"


def chroot_relative(path: str, queue_directory: str) -> str | None:
    """The path a process chrooted into ``queue_directory`` sees, None if outside it."""
    root = Path(queue_directory)
    p = Path(path)
    if p == root or root not in p.parents:
        return None
    return "/" + str(p.relative_to(root))


# --------------------------------------------------------------------------- slots
@dataclass(frozen=True)
class Slot:
    """One slot transport: a clone of smtp bound to one egress IP."""

    egress: EgressIP
    index: int
    plan: SlotPlan

    @property
    def name(self) -> str:
        return slot_transport(self.egress.name, self.index)


def egress_plan(cfg: Config, egress: EgressIP) -> SlotPlan:
    return limits_plan(cfg.limits_for(egress.ip))


def slots(cfg: Config) -> list[Slot]:
    """Every slot transport of the enabled pool, in pool order."""
    out = []
    for egress in cfg.pool:
        if not egress.enabled:
            continue
        plan = egress_plan(cfg, egress)
        out += [Slot(egress, i, plan) for i in range(1, plan.slots + 1)]
    return out


def service_ips(cfg: Config) -> dict[str, str]:
    """Slot service name -> egress IP (how a log line's ``postfix/<slot>/smtp`` maps to an IP)."""
    return {s.name: s.egress.ip for s in slots(cfg)}


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MasterEntry:
    """One master.cf service entry with its ``-o`` options."""

    service: str
    type: str
    private: str
    unpriv: str
    chroot: str
    wakeup: str
    maxproc: str
    command: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.service}/{self.type}"

    def line(self) -> str:
        """The entry on one line (what ``postconf -M`` takes)."""
        fields = [self.service, self.type, self.private, self.unpriv, self.chroot, self.wakeup,
                  self.maxproc, self.command]
        return " ".join(fields + [f"-o {k}={v}" for k, v in self.options])

    def text(self) -> str:
        """The entry as master.cf text (continuation lines for the options)."""
        head = f"{self.service:<14} {self.type:<5} {self.private:<7} {self.unpriv:<7} {self.chroot:<7} " \
               f"{self.wakeup:<7} {self.maxproc:<7} {self.command}"
        return "\n".join([head] + [f"  -o {k}={v}" for k, v in self.options])


@dataclass(frozen=True)
class PostfixPlan:
    """What the governor needs in main.cf and master.cf.

    ``main``: main.cf parameters (set with ``postconf -e``); ``master``: services to
    add or replace (``postconf -M``); ``qmgr_options``: ``-o`` options added to the
    existing qmgr entry (``postconf -P``); ``milter``: our entry of ``smtpd_milters``,
    merged with whatever milters are already configured.
    """

    main: dict[str, str]
    master: tuple[MasterEntry, ...]
    qmgr_options: dict[str, str]
    milter: str
    slots: tuple[Slot, ...] = field(default=(), compare=False)
    notes: tuple[str, ...] = ()


def cache_seconds(delay: int) -> int:
    """How long an idle slot connection stays cached: longer than the gap between deliveries."""
    return max(MIN_CACHE_SECONDS, delay + 5)


def slot_entry(cfg: Config, slot: Slot) -> MasterEntry:
    """The master.cf service of one slot transport."""
    egress = slot.egress
    lim = cfg.limits_for(egress.ip)
    bind = ("smtp_bind_address6" if egress.version == 6 else "smtp_bind_address", egress.ip)
    options = (
        ("syslog_name", f"postfix/{slot.name}"),
        bind,
        ("inet_protocols", "ipv6" if egress.version == 6 else "ipv4"),
        ("smtp_delivery_status_filter",
         socketmap_table(cfg.sockets.socketmap, STATUS_MAP_PREFIX + egress.name)),
        ("smtp_connection_cache_destinations", "static:all"),
        ("smtp_connection_cache_time_limit", f"{cache_seconds(slot.plan.delay)}s"),
        ("smtp_connection_reuse_count_limit", str(max(0, lim.messages_per_connection - 1))),
    )
    return MasterEntry(slot.name, "unix", "-", "-", "n", "-", "1", "smtp", options)


def milter_entry(cfg: Config, *, smtpd_chrooted: bool, queue_directory: str) -> str:
    """Our ``smtpd_milters`` element: socket, failure action per ``redis_down``, timeouts.

    ``default_action`` applies when the milter cannot be reached or times out; it
    mirrors ``redis_down`` so a dead milter behaves like a dead Redis.
    """
    spec = postfix_socket(cfg.sockets.milter)
    path = socket_path(cfg.sockets.milter)
    if smtpd_chrooted and path is not None:
        inside = chroot_relative(path, queue_directory)
        if inside is None:
            raise SetupError(
                f"smtpd is chrooted to {queue_directory}, so it cannot reach the milter socket {path}; "
                f"put sockets.milter under {queue_directory} or use inet:127.0.0.1:PORT")
        spec = f"unix:{inside}"
    action = "accept" if cfg.redis_down == "fail-open" else "tempfail"
    settings = ", ".join(f"{k}={v}" for k, v in MILTER_TIMEOUTS.items())
    return f"{{ {spec}, default_action={action}, {settings} }}"


def merge_list(existing: str, ours: str, mine: Callable[[str], bool]) -> str:
    """``existing`` (a Postfix list, items possibly in ``{ }``) without our old item, plus ``ours``."""
    items = [i for i in split_postfix_list(existing) if not mine(i)]
    return ", ".join(items + [ours])


def split_postfix_list(value: str) -> list[str]:
    """Split a Postfix list on commas/whitespace, keeping ``{ ... }`` groups whole."""
    items, depth, cur = [], 0, ""
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur.strip():
                items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def headroom_note(cfg: Config, egress: EgressIP) -> str:
    """A warning when an IP's plan leaves Postfix's whole-second timer jitter no room."""
    plan, rate = egress_plan(cfg, egress), cfg.limits_for(egress.ip).messages_per_minute
    if plan.worst_minute <= rate:
        return ""
    return (f"{egress.name}: {plan.slots} slots x {plan.delay}s = {plan.per_minute:g}/min of {rate:g}/min; "
            f"whole-second timers can let one minute see {plan.worst_minute} when delivery is fast. "
            "limits.per_ip.postfix_headroom (e.g. 0.05) keeps a margin")


def build_plan(cfg: Config, *, existing_transport_maps: str = "", existing_milters: str = "",
               smtpd_chrooted: bool = False, queue_directory: str = "/var/spool/postfix") -> PostfixPlan:
    """Everything Postfix needs for ``cfg``'s pool; raises SetupError when it cannot be done."""
    all_slots = slots(cfg)
    if not all_slots:
        raise SetupError("the pool has no enabled egress IP: nothing to configure (see pool: in the config)")
    transport = socketmap_table(cfg.sockets.socketmap, TRANSPORT_MAP)
    maps = merge_list(existing_transport_maps, transport, lambda item: item == transport)
    main: dict[str, str] = {f"{s.name}_transport_rate_delay": f"{s.plan.delay}s" for s in all_slots}
    longest = max(cache_seconds(s.plan.delay) for s in all_slots)
    main["connection_cache_ttl_limit"] = f"{longest}s"
    milter = milter_entry(cfg, smtpd_chrooted=smtpd_chrooted, queue_directory=queue_directory)
    milter_socket = milter.split(",", 1)[0].lstrip("{ ").strip()
    main["smtpd_milters"] = merge_list(existing_milters, milter, lambda item: milter_socket in item)
    resolver = MasterEntry(RESOLVER_SERVICE, "unix", "-", "-", "n", "-", "-", "trivial-rewrite",
                           (("syslog_name", f"postfix/{RESOLVER_SERVICE}"),
                            ("transport_maps", maps.replace(" ", ""))))
    notes = [note for egress in cfg.pool if egress.enabled and (note := headroom_note(cfg, egress))]
    if cfg.postfix.nexthop == "":
        notes.append("nexthop is empty: slot transports deliver to the recipient domain's MX")
    return PostfixPlan(
        main=main,
        master=(resolver, *(slot_entry(cfg, s) for s in all_slots)),
        qmgr_options={"rewrite_service_name": RESOLVER_SERVICE},
        milter=milter,
        slots=tuple(all_slots),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- output
_MAIN_HEADER = """\
# ---------------------------------------------------------------- main.cf (yahoo-governor)
# Pacing: each slot transport delivers one message, then waits this long (qmgr reads
# <transport>_transport_rate_delay from main.cf only; whole seconds, "500ms" = 500 minutes).
"""
_MILTER_COMMENT = """\
# The milter: consulted at RCPT (Yahoo recipients only) and at end of message (hold).
#   default_action  what smtpd does when the milter is down or times out: accept when
#                   redis_down is fail-open, tempfail (451 4.7.1) when fail-closed.
#                   It overrides milter_default_action (default tempfail) for this milter.
#   connect_timeout / command_timeout / content_timeout  (Postfix defaults 30s/30s/300s):
#                   short, because the milter answers from a 0.5 s cache and its Redis
#                   calls time out after redis.socket_timeout; past them default_action applies.
"""
_CACHE_COMMENT = """\
# Idle slot connections stay cached across the rate delay (scache caps the time).
"""
_QMGR_COMMENT = """\
# ---------------------------------------------------------------- master.cf (yahoo-governor)
# Add the -o line(s) below, uncommented, under your EXISTING qmgr entry: qmgr alone
# resolves through gov-rewrite, the only resolver that asks the governor's transport
# map (smtpd would answer 450 to retry:). With --apply this is done for you.
#   qmgr      unix  n       -       n       300     1       qmgr
"""
_SERVICES_COMMENT = """\
# gov-rewrite: qmgr's resolver with the governor's transport map. Slot transports:
# one smtp client each (maxproc 1), bound to its egress IP, feeding every delivery
# status back to the governor (status-<egress name>). All unchrooted: they open the
# governor's sockets by absolute path.
"""


def render(plan: PostfixPlan) -> str:
    """The plan as commented lines to paste into main.cf and master.cf."""
    out = [_MAIN_HEADER.rstrip("\n")]
    out += [f"{k} = {v}" for k, v in plan.main.items() if k.endswith("_transport_rate_delay")]
    out += [_CACHE_COMMENT.rstrip("\n"), f"connection_cache_ttl_limit = {plan.main['connection_cache_ttl_limit']}"]
    out += [_MILTER_COMMENT.rstrip("\n"), f"smtpd_milters = {plan.main['smtpd_milters']}"]
    out += ["", _QMGR_COMMENT.rstrip("\n")]
    out += [f"#     -o {k}={v}" for k, v in plan.qmgr_options.items()]
    out += ["", _SERVICES_COMMENT.rstrip("\n")]
    out += [e.text() for e in plan.master]
    out += [f"# note: {n}" for n in plan.notes]
    return "\n".join(out) + "\n"


def as_json(plan: PostfixPlan) -> dict[str, object]:
    return {
        "main": plan.main,
        "master": [{"service": e.service, "type": e.type, "line": e.line(), "options": dict(e.options)}
                   for e in plan.master],
        "qmgr_options": plan.qmgr_options,
        "milter": plan.milter,
        "slots": [{"name": s.name, "ip": s.egress.ip, "egress": s.egress.name, "delay": s.plan.delay}
                  for s in plan.slots],
        "notes": list(plan.notes),
    }


# --------------------------------------------------------------------------- apply
Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str]) -> str:
    """Run one Postfix command; a failure raises SetupError with its stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{shlex.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise SetupError(f"{shlex.join(argv)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


@dataclass
class PostfixDir:
    """A Postfix config directory, read and changed only through ``postconf``."""

    config_directory: str
    command_directory: str = "/usr/sbin"
    runner: Runner = run_command

    def _postconf(self, *args: str) -> str:
        return self.runner([f"{self.command_directory}/postconf", "-c", self.config_directory, *args])

    def get(self, name: str) -> str:
        return self._postconf("-h", name).strip()

    def master_fields(self) -> dict[str, dict[str, str]]:
        """``service/type`` -> field name -> value, from ``postconf -F``."""
        out: dict[str, dict[str, str]] = {}
        for line in self._postconf("-F").splitlines():
            key, _, value = line.partition(" = ")
            service, type_, fname = key.strip().rsplit("/", 2) if key.count("/") >= 2 else ("", "", "")
            if fname:
                out.setdefault(f"{service}/{type_}", {})[fname] = value.strip()
        return out

    def master_params(self) -> dict[str, dict[str, str]]:
        """``service/type`` -> ``-o`` options, from ``postconf -P``."""
        out: dict[str, dict[str, str]] = {}
        for line in self._postconf("-P").splitlines():
            key, _, value = line.partition(" = ")
            parts = key.strip().split("/", 2)
            if len(parts) == 3:
                out.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value.strip()
        return out

    def smtpd_chrooted(self) -> bool:
        """True when any smtpd service runs chrooted (Debian's default master.cf)."""
        return any(f.get("command", "").split()[:1] == ["smtpd"] and f.get("chroot") == "y"
                   for f in self.master_fields().values())


def plan_for(cfg: Config, pdir: PostfixDir | None, chroot: str = "auto") -> PostfixPlan:
    """Build the plan, reading what is already configured in ``pdir`` (when given)."""
    existing_maps = existing_milters = ""
    queue_directory = "/var/spool/postfix"
    chrooted = chroot == "yes"
    if pdir is not None:
        existing_maps = _without_ours(pdir.master_params().get(f"{RESOLVER_SERVICE}/unix", {})
                                      .get("transport_maps") or pdir.get("transport_maps"), cfg)
        existing_milters = pdir.get("smtpd_milters")
        queue_directory = pdir.get("queue_directory") or queue_directory
        if chroot == "auto":
            chrooted = pdir.smtpd_chrooted()
    return build_plan(cfg, existing_transport_maps=existing_maps, existing_milters=existing_milters,
                      smtpd_chrooted=chrooted, queue_directory=queue_directory)


def _without_ours(maps: str, cfg: Config) -> str:
    ours = socketmap_table(cfg.sockets.socketmap, TRANSPORT_MAP)
    return ", ".join(i for i in split_postfix_list(maps) if i != ours)


def stale_services(pdir: PostfixDir, cfg: Config, plan: PostfixPlan) -> list[str]:
    """Slot services of an earlier run that the plan no longer has (the pool shrank).

    Recognised by their status filter pointing at our socket, never by name alone.
    """
    prefix = socketmap_table(cfg.sockets.socketmap, STATUS_MAP_PREFIX)
    wanted = {e.key for e in plan.master}
    return sorted(key for key, opts in pdir.master_params().items()
                  if key not in wanted and opts.get("smtp_delivery_status_filter", "").startswith(prefix))


def apply_commands(plan: PostfixPlan, pdir: PostfixDir, stale: Sequence[str] = ()) -> list[list[str]]:
    """The postconf commands that make ``pdir`` match ``plan`` (in order)."""
    pc = [f"{pdir.command_directory}/postconf", "-c", pdir.config_directory]
    cmds = [pc + ["-MX", key] for key in stale]
    stale_names = {k.split("/")[0] for k in stale}
    old_params = [n for n in _rate_delay_params(pdir) if n.removesuffix("_transport_rate_delay") in stale_names]
    if old_params:
        cmds.append(pc + ["-X", *old_params])
    cmds += [pc + ["-M", f"{e.key}={e.line()}"] for e in plan.master]
    cmds += [pc + ["-P", f"qmgr/unix/{k}={v}"] for k, v in plan.qmgr_options.items()]
    cmds.append(pc + ["-e", *(f"{k}={v}" for k, v in plan.main.items())])
    return cmds


def _rate_delay_params(pdir: PostfixDir) -> list[str]:
    out = pdir._postconf("-n")
    return [m.group(1) for m in re.finditer(r"^(\S+_transport_rate_delay)\s*=", out, re.MULTILINE)]


def apply(plan: PostfixPlan, pdir: PostfixDir, cfg: Config, *, dry_run: bool = False) -> list[list[str]]:
    """Run (or with ``dry_run`` only return) the postconf commands; returns them."""
    cmds = apply_commands(plan, pdir, stale_services(pdir, cfg, plan))
    if not dry_run:
        for argv in cmds:
            pdir.runner(argv)
    return cmds
