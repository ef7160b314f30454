"""Which recipient domains are Yahoo's: the bundled domain set plus the MX roll-up.

Yahoo throttles per sending IP across *every* domain it hosts, so the governor
must count yahoo.com, aol.com, verizon.net and (since 2025) the AT&T family
against one budget. This module answers, for one recipient domain, "is mail to
it governed, and why?".

Decision order (the first rule that applies wins):

1. ``domains.exclude`` in the config: never governed.
2. the bundled ``never:`` list (yahoo.co.jp is LY Corporation's, not Yahoo's):
   never governed, not even through ``domains.include``.
3. ``domains.include`` in the config: governed.
4. the bundled list (``governor/data/domains.yaml``): governed. Two kinds of
   entries are decided by their MX instead of by name: the AT&T family when
   ``att_family`` is ``auto`` (``on`` governs it, ``off`` never does), and
   entries marked ``confirmed: false``.
5. the MX roll-up: governed when any MX host ends in one of ``mx_suffixes`` on a
   label boundary (``mx.evilyahoodns.net`` does not match ``yahoodns.net``).
6. otherwise not governed.

Names match exactly: ``mail.yahoo.com`` is not ``yahoo.com`` (each name in an
address is its own mail domain with its own MX), so a subdomain is only governed
through the MX roll-up or ``domains.include``.

:meth:`DomainSet.is_governed` is the per-recipient hot path: listed, included,
excluded and never-listed names are one dict lookup and never touch DNS; other
names cost one MX lookup per ``cache_ttl``. DNS is dnspython with a timeout, or
any injected ``resolver`` callable (tests never contact DNS).
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from governor.yamlnode import Node, Problems, YamlError, load, parse

GROUPS = ("yahoo", "aol", "att", "verizon", "other")
ATT_FAMILY_MODES = ("auto", "on", "off")
DATA_FILE = "domains.yaml"

# A failed DNS lookup (timeout, SERVFAIL) is retried sooner than a real answer is
# refreshed: otherwise one slow resolver would leave a Yahoo domain ungoverned
# for a whole cache_ttl.
ERROR_TTL = 60.0
# Bound on cached MX answers: the hot path sees arbitrary recipient domains.
MAX_CACHE_ENTRIES = 50_000

Resolver = Callable[[str], Sequence[str]]


# --------------------------------------------------------------------------- names
class InvalidDomain(ValueError):
    """A name that cannot be a mail domain; ``str()`` is one line for the operator."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why
        super().__init__(f'invalid domain name "{name}": {why}')


def _check_label(label: str, original: str) -> None:
    if not label:
        raise InvalidDomain(original, "empty label")
    if len(label) > 63:
        raise InvalidDomain(original, f'label "{label[:20]}..." is longer than 63 characters')
    if label[0] == "-" or label[-1] == "-":
        raise InvalidDomain(original, f'label "{label}" starts or ends with a hyphen')
    for ch in label:
        if not (ch.isascii() and (ch.isalnum() or ch == "-")):
            raise InvalidDomain(original, f'label "{label}" has the character {ch!r}')


def _to_ascii(label: str, original: str) -> str:
    """IDNA (2003, Python's built-in codec) form of one label; ASCII labels pass through."""
    if label.isascii():
        return label.lower()
    try:
        return label.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise InvalidDomain(original, f"not a valid internationalised name ({exc})") from None


def normalise_domain(name: str) -> str:
    """Canonical form: stripped, lowercase, IDNA (punycode), no trailing dot.

    Raises :class:`InvalidDomain` naming the problem, e.g. ``empty label`` for
    ``a..b``. Only letters, digits and hyphens are accepted in labels, as in
    host names: mail domains are host names.
    """
    if not isinstance(name, str):
        raise InvalidDomain(repr(name), "not a string")
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise InvalidDomain(name, "empty name")
    labels = text.split(".")
    out = []
    for label in labels:
        if not label:
            raise InvalidDomain(name, "empty label")
        ascii_label = _to_ascii(label, name)
        _check_label(ascii_label, name)
        out.append(ascii_label)
    result = ".".join(out)
    if len(result) > 253:
        raise InvalidDomain(name, "longer than 253 characters")
    return result


def domain_of(address: str) -> str | None:
    """The normalised domain of an address: ``"<User@Yahoo.COM>"`` gives ``"yahoo.com"``.

    Accepts a bare address, ``<address>`` or ``Name <address>``. Returns None when
    there is no ``@`` or what follows it is not a valid domain name, so callers on
    the hot path never need a try block.
    """
    text = address.strip()
    if "<" in text:
        text = text[text.rfind("<") + 1:]
        text = text.split(">", 1)[0]
    text = text.strip().strip("<>").strip()
    _, at, domain = text.rpartition("@")
    if not at or not domain:
        return None
    try:
        return normalise_domain(domain)
    except InvalidDomain:
        return None


def _normalise_suffix(suffix: str) -> str:
    """``".YahooDNS.net."`` and ``"yahoodns.net"`` are the same suffix."""
    return normalise_domain(suffix.strip().lstrip("."))


def mx_matches(host: str, suffix: str) -> bool:
    """True when ``host`` is ``suffix`` or ends in ``.suffix`` (label boundary).

    Both arguments are already normalised. ``mx.evilyahoodns.net`` does not match
    ``yahoodns.net``: a plain ``endswith`` would let anyone's MX join Yahoo's budget.
    """
    return host == suffix or host.endswith("." + suffix)


# --------------------------------------------------------------------------- bundled data
@dataclass(frozen=True)
class BundledEntry:
    """One domain of ``domains.yaml``."""

    domain: str
    group: str
    source: tuple[str, ...]
    confirmed: bool = True
    note: str | None = None
    line: int = 0


@dataclass(frozen=True)
class NeverEntry:
    """A look-alike domain Yahoo does not operate, with the reason shown to operators."""

    domain: str
    reason: str
    source: tuple[str, ...]
    line: int = 0


@dataclass(frozen=True)
class BundledDomains:
    """The validated contents of ``domains.yaml``."""

    entries: Mapping[str, BundledEntry]
    never: Mapping[str, NeverEntry]
    file: str = DATA_FILE

    @property
    def sources(self) -> tuple[str, ...]:
        """Every distinct source cited, in first-seen order."""
        seen: dict[str, None] = {}
        for item in (*self.entries.values(), *self.never.values()):
            for src in item.source:
                seen.setdefault(src, None)
        return tuple(seen)


class DomainDataError(YamlError):
    """``domains.yaml`` is invalid; every problem names ``domains.yaml:LINE``."""


def _read_domain_name(node: Node) -> str | None:
    """A domain key of the data file: must already be in canonical form."""
    raw = node.string(None, what="a domain name such as yahoo.com")
    if raw is None:
        return None
    try:
        canonical = normalise_domain(raw)
    except InvalidDomain as exc:
        node.fail(exc.why + f' in "{raw}"')
        return None
    if canonical != raw:
        node.fail(f'expected the canonical form "{canonical}", got "{raw}"')
        return None
    return raw


def _read_entry(node: Node, seen: dict[str, int]) -> BundledEntry | None:
    m = node.mapping(["domain", "group", "source", "confirmed", "note"], required=("domain", "group", "source"))
    domain = _read_domain_name(m["domain"]) if "domain" in m else None
    group = m["group"].choice("", GROUPS) if "group" in m else ""
    source = m["source"].string_list(what="a source (repo:path or URL)") if "source" in m else ()
    confirmed = m["confirmed"].boolean(True) if "confirmed" in m else True
    note = m["note"].string(None) if "note" in m else None
    if domain is None or not group or not source:
        return None
    if domain in seen:
        m["domain"].fail(f"duplicate domain {domain} (first listed at line {seen[domain]})")
        return None
    seen[domain] = node.line
    return BundledEntry(domain, group, source, confirmed, note, node.line)


def _read_never(node: Node, seen: dict[str, int]) -> NeverEntry | None:
    m = node.mapping(["domain", "reason", "source"], required=("domain", "reason", "source"))
    domain = _read_domain_name(m["domain"]) if "domain" in m else None
    reason = m["reason"].string(None, what="a sentence saying why") if "reason" in m else None
    source = m["source"].string_list(what="a source (repo:path or URL)") if "source" in m else ()
    if domain is None or reason is None or not source:
        return None
    if domain in seen:
        m["domain"].fail(f"{domain} is listed both as a Yahoo domain (line {seen[domain]}) and under never")
        return None
    seen[domain] = node.line
    return NeverEntry(domain, reason, source, node.line)


def parse_bundled(text: str, file: str = DATA_FILE) -> BundledDomains:
    """Validate the text of a domains file; raises :class:`DomainDataError` listing every problem."""
    return _read_bundled(*parse(text, file, error=DomainDataError))


def _read_bundled(root: Node, problems: Problems) -> BundledDomains:
    top = root.mapping(["domains", "never"])
    if "domains" not in top:
        root.fail("missing key domains (the list of Yahoo-operated domains)")
    seen: dict[str, int] = {}
    entries: dict[str, BundledEntry] = {}
    for item in top["domains"].sequence() if "domains" in top else ():
        entry = _read_entry(item, seen)
        if entry is not None:
            entries[entry.domain] = entry
    never: dict[str, NeverEntry] = {}
    for item in top["never"].sequence() if "never" in top else ():
        nev = _read_never(item, seen)
        if nev is not None:
            never[nev.domain] = nev
    problems.raise_if_any()
    return BundledDomains(entries=entries, never=never, file=root.file)


@functools.lru_cache(maxsize=1)
def _bundled_default() -> BundledDomains:
    text = resources.files("governor").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    return parse_bundled(text, DATA_FILE)


def load_bundled(path: str | Path | None = None) -> BundledDomains:
    """The validated bundled domain set (``governor/data/domains.yaml``, or ``path``).

    The packaged file is read once per process; errors name ``domains.yaml:LINE``.
    """
    if path is None:
        return _bundled_default()
    return _read_bundled(*load(path, Path(path).name, error=DomainDataError))


# --------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class DomainVerdict:
    """Whether mail to one domain is governed, and the sentence that says why."""

    domain: str  # normalised (lowercase, IDNA, no trailing dot)
    governed: bool
    reason: str
    source: str  # bundled | config-include | config-exclude | mx-table | dns | never | none
    group: str | None
    mx: tuple[str, ...]  # MX hosts consulted, if any

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the keys of ``governor domain --json``)."""
        return {"domain": self.domain, "governed": self.governed, "reason": self.reason,
                "source": self.source, "group": self.group, "mx": list(self.mx)}


@dataclass(frozen=True)
class _MXAnswer:
    """The MX hosts of a domain and where they came from."""

    hosts: tuple[str, ...]
    origin: str  # "mx-table" | "dns" | "off"
    error: str | None = None


def _dnspython_resolver(timeout: float) -> Resolver:
    """An MX resolver on dnspython; NXDOMAIN/NoAnswer give (), other failures raise.

    Raising (instead of returning ()) lets the cache keep failures only briefly.
    """
    import dns.exception
    import dns.resolver

    state: dict[str, dns.resolver.Resolver] = {}

    def resolve(domain: str) -> Sequence[str]:
        if "r" not in state:
            state["r"] = dns.resolver.Resolver()
        try:
            answer = state["r"].resolve(domain, "MX", lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return ()
        except dns.exception.Timeout:
            raise TimeoutError(f"no answer within {timeout:g}s") from None
        records = sorted(answer, key=lambda r: (r.preference, str(r.exchange)))
        return [str(r.exchange) for r in records]

    return resolve


class DomainSet:
    """The Yahoo-managed domains as configured: bundled list, config, MX roll-up.

    Build it once per process (``DomainSet.from_config(cfg.domains)``) and call
    :meth:`is_governed` per recipient, from any thread (the milter runs one per
    connection). Concurrent misses for the same name may each resolve it once,
    which is harmless; cache writes are serialised.
    """

    def __init__(
        self,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        att_family: str = "auto",
        mx_suffixes: Sequence[str] = ("yahoodns.net",),
        mx_table: Mapping[str, Sequence[str]] | None = None,
        dns: bool = True,
        dns_timeout: float = 2.0,
        cache_ttl: float = 3600.0,
        resolver: Resolver | None = None,
        bundled: BundledDomains | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``bundled`` and ``clock`` exist for tests; production uses the defaults."""
        if att_family not in ATT_FAMILY_MODES:
            raise ValueError(f"att_family must be one of {', '.join(ATT_FAMILY_MODES)}, got {att_family!r}")
        self.att_family = att_family
        self.mx_suffixes = tuple(dict.fromkeys(_normalise_suffix(s) for s in mx_suffixes))
        self.mx_table = {normalise_domain(d): _clean_hosts(h) for d, h in (mx_table or {}).items()}
        self.dns = dns
        self.dns_timeout = dns_timeout
        self.cache_ttl = cache_ttl
        self.bundled = bundled if bundled is not None else load_bundled()
        self._resolver = resolver
        self._clock = clock
        self._cache: dict[str, tuple[float, _MXAnswer]] = {}
        self._cache_lock = threading.Lock()  # writers only (misses); readers use plain dict.get
        self._include = frozenset(normalise_domain(d) for d in include)
        self._exclude = frozenset(normalise_domain(d) for d in exclude)
        self._static = self._static_verdicts()

    @classmethod
    def from_config(cls, cfg: Any) -> DomainSet:
        """Build from ``governor.config.DomainsConfig`` (or a whole ``Config``), duck-typed."""
        dc = cfg if hasattr(cfg, "include") else cfg.domains
        return cls(include=dc.include, exclude=dc.exclude, att_family=dc.att_family,
                   mx_suffixes=dc.mx_suffixes, mx_table=dc.mx_table, dns=dc.dns,
                   dns_timeout=dc.dns_timeout, cache_ttl=dc.cache_ttl)

    # ---- static part: decided by name alone, computed once ---------------------------
    def _static_verdicts(self) -> dict[str, DomainVerdict]:
        """Verdicts that need no MX: the whole hot path for listed names is one dict lookup."""
        out: dict[str, DomainVerdict] = {}
        for entry in self.bundled.entries.values():
            verdict = self._bundled_static(entry)
            if verdict is not None:
                out[entry.domain] = verdict
        for domain in self._include:
            group = self._group_of(domain)
            out[domain] = DomainVerdict(domain, True, "included by domains.include in config",
                                        "config-include", group, ())
        for nev in self.bundled.never.values():
            out[nev.domain] = DomainVerdict(nev.domain, False, nev.reason, "never", None, ())
        for domain in self._exclude:
            out[domain] = DomainVerdict(domain, False, "excluded by domains.exclude in config",
                                        "config-exclude", self._group_of(domain), ())
        return out

    def _bundled_static(self, entry: BundledEntry) -> DomainVerdict | None:
        """The verdict of a bundled entry when its name alone decides, else None (MX decides)."""
        if entry.group == "att":
            if self.att_family == "on":
                return DomainVerdict(entry.domain, True,
                                     "listed in the bundled Yahoo domain set (group att; att_family=on)",
                                     "bundled", "att", ())
            if self.att_family == "off":
                return DomainVerdict(entry.domain, False,
                                     "AT&T family: att_family=off, so it is not governed",
                                     "bundled", "att", ())
            return None
        if not entry.confirmed:
            return None
        return DomainVerdict(entry.domain, True,
                             f"listed in the bundled Yahoo domain set (group {entry.group})",
                             "bundled", entry.group, ())

    def _group_of(self, domain: str) -> str | None:
        entry = self.bundled.entries.get(domain)
        return entry.group if entry is not None else None

    # ---- public API ---------------------------------------------------------------
    def is_governed(self, domain: str) -> bool:
        """Hot path, once per recipient: O(1) for listed names, cached MX otherwise.

        Never raises: a name that is not a valid domain is simply not governed.
        """
        hit = self._static.get(domain)
        if hit is not None:
            return hit.governed
        try:
            name = normalise_domain(domain)
        except InvalidDomain:
            return False
        hit = self._static.get(name)
        if hit is not None:
            return hit.governed
        return self._dynamic(name).governed

    def verdict(self, domain: str) -> DomainVerdict:
        """The full decision for one domain; raises :class:`InvalidDomain` for a bad name."""
        name = normalise_domain(domain)
        hit = self._static.get(name)
        return hit if hit is not None else self._dynamic(name)

    domain_of = staticmethod(domain_of)

    def mx_hosts(self, domain: str) -> tuple[str, ...]:
        """MX hosts of ``domain``: ``mx_table`` first, then DNS (cached), else ``()``."""
        return self._mx(normalise_domain(domain)).hosts

    # ---- MX-decided part -------------------------------------------------------------
    def _dynamic(self, domain: str) -> DomainVerdict:
        """AT&T family in auto mode, unconfirmed entries, and unlisted names: MX decides."""
        entry = self.bundled.entries.get(domain)
        answer = self._mx(domain)
        match = self._yahoo_mx(answer.hosts)
        source = answer.origin if answer.origin != "off" else ("bundled" if entry else "none")
        group = entry.group if entry is not None else None
        if entry is not None and entry.group == "att":
            reason = self._att_reason(domain, answer, match)
        elif entry is not None:
            reason = self._unconfirmed_reason(entry, answer, match)
        elif match is not None:
            reason = f"MX {match[0]} ends in {match[1]}"
        else:
            reason = "not listed and no Yahoo MX" + self._why_no_mx(domain, answer)
        return DomainVerdict(domain, match is not None, reason, source, group, answer.hosts)

    def _att_reason(self, domain: str, answer: _MXAnswer, match: tuple[str, str] | None) -> str:
        head = "AT&T family: att_family=auto and"
        if match is not None:
            return f"{head} its MX ({match[0]}) is under {match[1]}"
        if answer.origin == "off":
            return (f"AT&T family: att_family=auto, but DNS is off and mx_table has no entry for "
                    f"{domain}, so its MX cannot be checked (set att_family: on to govern it)")
        if answer.error:
            return f"{head} its MX lookup failed ({answer.error})"
        if not answer.hosts:
            return f"{head} it has no MX hosts"
        return f"{head} its MX ({answer.hosts[0]}) is not under {self._suffix_text()}"

    def _unconfirmed_reason(self, entry: BundledEntry, answer: _MXAnswer,
                            match: tuple[str, str] | None) -> str:
        head = f"listed in the bundled set as unconfirmed (group {entry.group}), so its MX decides:"
        if match is not None:
            return f"{head} MX {match[0]} ends in {match[1]}"
        return f"{head} no Yahoo MX" + self._why_no_mx(entry.domain, answer)

    def _why_no_mx(self, domain: str, answer: _MXAnswer) -> str:
        if answer.origin == "off":
            return f" (DNS is off and mx_table has no entry for {domain})"
        if answer.error:
            return f" (MX lookup failed: {answer.error})"
        if not answer.hosts:
            return " (no MX hosts)"
        return f" (MX {', '.join(answer.hosts)})"

    def _suffix_text(self) -> str:
        return " or ".join(self.mx_suffixes) if self.mx_suffixes else "any configured suffix"

    def _yahoo_mx(self, hosts: Sequence[str]) -> tuple[str, str] | None:
        """The first (host, suffix) pair on a label boundary, or None.

        Any one Yahoo MX is enough: some of that domain's mail then lands at Yahoo
        and counts against the sending IP there.
        """
        for host in hosts:
            for suffix in self.mx_suffixes:
                if mx_matches(host, suffix):
                    return host, suffix
        return None

    def _mx(self, domain: str) -> _MXAnswer:
        if domain in self.mx_table:
            return _MXAnswer(self.mx_table[domain], "mx-table")
        if not self.dns:
            return _MXAnswer((), "off")
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        answer, ttl = self._resolve(domain)
        self._remember(domain, now + ttl, answer)
        return answer

    def _resolve(self, domain: str) -> tuple[_MXAnswer, float]:
        """One lookup; an error is an empty answer kept for at most ERROR_TTL."""
        if self._resolver is None:
            self._resolver = _dnspython_resolver(self.dns_timeout)
        try:
            hosts = _clean_hosts(self._resolver(domain))
        except Exception as exc:  # any resolver failure means "unknown now", never a crash
            why = str(exc) or type(exc).__name__
            return _MXAnswer((), "dns", why), min(self.cache_ttl, ERROR_TTL)
        return _MXAnswer(hosts, "dns"), self.cache_ttl

    def _remember(self, domain: str, expires: float, answer: _MXAnswer) -> None:
        if self.cache_ttl <= 0:
            return
        with self._cache_lock:
            self._cache.pop(domain, None)  # re-insert at the end: eviction below is oldest-first
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[domain] = (expires, answer)


def _clean_hosts(hosts: Sequence[str] | str) -> tuple[str, ...]:
    """Lowercase, drop trailing dots and null-MX ``.`` targets; keep the given order."""
    if isinstance(hosts, str):
        hosts = (hosts,)
    out = []
    for host in hosts:
        h = str(host).strip().rstrip(".").lower()
        if h:
            out.append(h)
    return tuple(out)
