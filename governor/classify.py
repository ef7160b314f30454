"""Classify replies from Yahoo-managed MX hosts (rules as data).

The classifier turns one SMTP reply -- bare, or wrapped the way Postfix and Exim
log it -- into a :class:`Classification`: Yahoo's code, what the reply is about
(class), what it applies to (scope), whether it is permanent, the sender IP and
MX host it names and the SMTP stage it answered.

Why it looks like this:

* The knowledge lives in one YAML table (``governor/data/replies.yaml``) that a
  mail admin can read and override; this module only unwraps, pre-filters and
  applies it.  Rules are ordered and the first match wins.
* Yahoo bracket codes (``[TSS04]``) are only ever assigned when the bracket token
  is really in the reply: a rule whose ``code`` looks like a bracket code
  (letters then digits) is only eligible when ``[CODE]`` is present.  That is
  both the safety net (an Apple ``[HCM1]`` or a Gmail text can never become a
  Yahoo code, whatever an override rule's regex says) and the fast dispatch key.
* Speed without caching results: one scan for bracket tokens picks the bracket
  rules; every other rule is guarded by literal substrings derived once from its
  regex (a plain ``in`` test on the lower-cased reply), so a reply only pays for
  the few regexes that can possibly match.

Pure: no I/O except loading the rule table once, lazily.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from governor.yamlnode import Node, YamlError, load, parse

__all__ = [
    "CLASSES",
    "SCOPES",
    "Classification",
    "Classifier",
    "Rule",
    "RuleError",
    "classify",
    "is_bracket_code",
    "load_rules",
    "required_literals",
]

CLASSES = ("rate", "reputation", "block", "transient", "content", "policy", "recipient")
SCOPES = ("ip", "connection", "provider", "recipient", "message")
RULE_KEYS = ("code", "class", "scope", "permanent", "match", "meaning")

#: Rule regexes are case-insensitive for ASCII only; this keeps the literal
#: pre-filter (``str.lower`` + ``in``) exact: it can never hide a real match.
RULE_FLAGS = re.IGNORECASE | re.ASCII

#: Longest reply we look at.  SMTP lines are at most 512 octets; a few KB covers
#: any honest multi-line reply and bounds the work done on garbage.
MAX_REPLY_CHARS = 16384

_DEFAULT_TABLE = "data/replies.yaml"

# Yahoo's bracket codes: TSS04, TS01, IPTS05, BL21, GL01, PH01 ...  A rule code of
# this shape is treated as a bracket code; anything else (DD_USER_UNKNOWN,
# VS1-IP, DEFER_160, ...) is one of our labels.
_BRACKET_CODE = re.compile(r"[A-Z]{1,8}[0-9]{1,4}")
_BRACKET_TOKEN = re.compile(r"\[([A-Za-z]{1,8}[0-9]{1,4})\]")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

# --- MTA wrappers -------------------------------------------------------------
# Exim: "SMTP error from remote mail server after pipelined MAIL FROM:<a@b> SIZE=9: "
_EXIM = re.compile(
    r"SMTP error from remote (?:mail server|mailer) after\s+(?:pipelined\s+)?"
    r"(?P<what>(?:MAIL FROM|RCPT TO):\s*<[^>\n]{0,512}>[^:\n]{0,200}|[^:\n]{0,200}?)\s*:\s*",
    re.IGNORECASE,
)
# Postfix "host X[ip] said:" / "host X[ip] refused to talk to me:", Exim "host X [ip]:"
# (or "host X [ip]" on the line before "SMTP error from remote ...") and Exim's log
# form "H=X [ip]:".  The colon is required so "Client host x[ip] blocked" inside a
# reply is not taken for a wrapper.
_HOST = re.compile(
    r"(?:\bhost\s+|\bH=)(?P<host>[^\s\[\]():]{1,255})\s?\[(?P<hip>[^\]\s]{1,64})\](?::[0-9]{1,5})?"
    r"(?:\s+(?P<verb>said|refused to talk to me)\s*:|\s*:|(?=\s*SMTP error from remote))\s*",
    re.IGNORECASE,
)
# Postfix: "... (in reply to MAIL FROM command)" (plus ")" when cut from a log line).
_TRAILER = re.compile(r"\(in reply to (?P<cmd>[A-Za-z ]{1,40}?) command\)\)?[\s.]*$", re.IGNORECASE)

# --- the reply itself ---------------------------------------------------------
_LINE_SPLIT = re.compile(r"\s*(?:[\r\n]+|\s\|\s)\s*")
_CONT_PREFIX = re.compile(r"[2-5][0-9][0-9](?:[ \t-]+|$)(?:#?[245]\.[0-9]{1,3}\.[0-9]{1,3}(?:\s+|$))?")
_HEAD = re.compile(
    r"(?P<code>[2-5][0-9][0-9])(?:[ \t-]+|$)(?:#?(?P<enh>[245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9.]))?"
)
_ENH_AT_START = re.compile(r"#?(?P<enh>[245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9.])")
_ENH_HASH = re.compile(r"#(?P<enh>[245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9.])")
_ENH_BEFORE_TOKEN = re.compile(r"(?<![\w.])(?P<enh>[245]\.[0-9]{1,3}\.[0-9]{1,3})\s+\[[A-Za-z]")
_IP_FROM = re.compile(r"from\s*[(\[]?\s*(?P<ip>[0-9A-Fa-f:.]{3,45})", re.IGNORECASE)
_IP_OTHER = re.compile(r"(?:<\s*|relay=\[)(?P<ip>[0-9A-Fa-f:.]{3,45})", re.IGNORECASE)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros, like ipaddress
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_YAHOO_HOST = r"(?P<h>(?:[A-Za-z0-9-]{1,63}\.){1,10}(?:yahoo\.com|yahoodns\.net|yahoo\.net|aol\.com))"
_HOST_LEAD = re.compile(r"[2-5][0-9][0-9][ -]" + _YAHOO_HOST + r"(?![\w.-])", re.IGNORECASE)
_HOST_TAIL = re.compile(r"\s(?:-\s+|(?=(?:mta|atlas)[0-9a-z-]*\.))" + _YAHOO_HOST + r"\.?\s*$", re.IGNORECASE)
_MAX_IP_CANDIDATES = 8
_HOST_SUFFIXES = ("yahoo.com", "yahoodns.net", "yahoo.net", "aol.com")


class RuleError(YamlError):
    """A rule table is invalid; the message starts with ``file:line:``.

    ``problems`` lists every error in the table; a :class:`Rule` built in code
    with a bad field raises it with a plain message (and no problems).
    """


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the rule table; ``regex`` is compiled (and checked) on creation."""

    code: str
    cls: str
    scope: str
    permanent: bool | None
    match: str
    meaning: str
    line: int | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, value in (("code", self.code), ("class", self.cls), ("scope", self.scope),
                           ("permanent", self.permanent), ("meaning", self.meaning)):
            problem = _field_problem(key, value)
            if problem:
                raise RuleError(f"{self.code!r}: {key}: {problem}")
        regex, problem = _compile_match(self.match)
        if regex is None:
            raise RuleError(f"{self.code!r}: match: {problem}")
        object.__setattr__(self, "regex", regex)

    @property
    def bracket(self) -> str | None:
        """The bracket token this rule needs (``TSS04`` for code TSS04), None for labels."""
        return self.code if is_bracket_code(self.code) else None


@dataclass(frozen=True, slots=True)
class Classification:
    """What one reply means for the sender; see the module docstring."""

    code: str | None
    cls: str | None
    scope: str | None
    permanent: bool
    smtp_code: int | None
    enhanced: str | None
    ip: str | None
    host: str | None
    stage: str | None
    meaning: str
    text: str

    @property
    def is_yahoo(self) -> bool:
        """True when a rule recognised the reply (a Yahoo code or one of our labels)."""
        return self.code is not None

    @property
    def success(self) -> bool:
        """True for a 2xx reply: nothing to govern."""
        return self.smtp_code is not None and 200 <= self.smtp_code < 300


def is_bracket_code(code: str | None) -> bool:
    """True when ``code`` has the shape of a Yahoo bracket code (TSS04, TS01, BL21, ...)."""
    return code is not None and _BRACKET_CODE.fullmatch(code) is not None


# --- rule table loading ---------------------------------------------------------


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with one rule field (all but ``match``), or None."""
    if key == "permanent":
        return None if value is None or isinstance(value, bool) else "must be true, false or null"
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if key == "code" and not _LABEL.fullmatch(value):
        return f"{value!r} is not a code (letters, digits, '_', '.', '-'; at most 64)"
    if key == "class" and value not in CLASSES:
        return f"unknown class {value!r} (expected one of: {', '.join(CLASSES)})"
    if key == "scope" and value not in SCOPES:
        return f"unknown scope {value!r} (expected one of: {', '.join(SCOPES)})"
    if key == "meaning" and ("\n" in value or "\r" in value):
        return "must be one line"
    return None


def _compile_match(pattern: Any) -> tuple[re.Pattern[str] | None, str]:
    """Compile a rule regex; a pattern that matches the empty string would match every reply."""
    if not isinstance(pattern, str) or not pattern:
        return None, "must be a non-empty string (a regular expression)"
    try:
        regex = re.compile(pattern, RULE_FLAGS)
    except re.error as exc:
        return None, f"bad regex: {exc}"
    if regex.search("") is not None:
        return None, "regex matches the empty string (it would match every reply)"
    return regex, ""


def _parse_source(source: str | os.PathLike[str], name: str | None) -> Node:
    """The root node of a rule table given as a path or as YAML text.

    A str containing a newline is YAML text; a str naming an existing file or
    ending in .yaml/.yml is a path; any other str is (one-line) YAML text.
    """
    if isinstance(source, str):
        looks_like_path = source.strip().endswith((".yaml", ".yml")) or _is_file(source)
        if "\n" in source or not looks_like_path:
            return parse(source, name or "replies.yaml", error=RuleError)[0]
    return load(source, name, error=RuleError)[0]


def _is_file(source: str) -> bool:
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...
        return False


def _rule_nodes(root: Node) -> list[Node]:
    """The rules: the document itself when it is a list, else its ``rules:`` key."""
    if isinstance(root.node, yaml.SequenceNode):
        return root.sequence()
    top = root.mapping(["rules"])
    if "rules" not in top:
        root.fail("missing (expected a 'rules:' list)", path="rules")
        return []
    if top["rules"].is_null:
        top["rules"].fail("expected a list of rules, got nothing (null)")
    return top["rules"].sequence()


def _rule_from_node(node: Node) -> Rule | None:
    """Validate one rule mapping; every problem names the line of the offending value."""
    values: dict[str, Any] = {}
    for key, field_node in node.mapping(RULE_KEYS, required=RULE_KEYS).items():
        value = field_node.raw()
        problem = _compile_match(value)[1] if key == "match" else _field_problem(key, value)
        if problem:
            field_node.fail(problem)
        else:
            values[key] = value
    if len(values) < len(RULE_KEYS):
        return None
    return Rule(code=values["code"], cls=values["class"], scope=values["scope"], permanent=values["permanent"],
                match=values["match"], meaning=values["meaning"].strip(), line=node.line)


def load_rules(path_or_text: str | os.PathLike[str], *, name: str | None = None) -> list[Rule]:
    """Load and validate a rule table (a path, or YAML text containing a newline).

    Raises :class:`RuleError` listing every problem, each starting with
    ``file:line:`` so an admin editing an override can go straight to the mistake.
    """
    root = _parse_source(path_or_text, name)
    rules = [_rule_from_node(node) for node in _rule_nodes(root)]
    root.problems.raise_if_any()
    return [rule for rule in rules if rule is not None]


# --- literal pre-filter derived from each regex ---------------------------------


def _literal_candidates(items: Iterable[tuple[Any, Any]], c: Any) -> list[tuple[str, ...]]:
    """Sets of lower-case literals of which every match must contain at least one.

    Walks the parsed regex: runs of plain ASCII literals in a mandatory position
    (top level, groups, repeats with min >= 1, every branch of an alternation)
    are requirements; zero-width items do not break a run.
    """
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)}
    for op, av in items:
        if op is c.LITERAL and av < 128:
            run.append(chr(av).lower())
            continue
        if op in (c.AT, c.ASSERT, c.ASSERT_NOT):
            continue
        if run:
            out.append(("".join(run),))
            run = []
        if op is c.SUBPATTERN:
            out.extend(_literal_candidates(av[3], c))
        elif op in repeats and av[0] >= 1:
            out.extend(_literal_candidates(av[2], c))
        elif op is getattr(c, "ATOMIC_GROUP", None):
            out.extend(_literal_candidates(av, c))
        elif op is c.BRANCH:
            alternatives: list[str] = []
            for branch in av[1]:
                best = _best_candidate(_literal_candidates(branch, c))
                if best is None:
                    alternatives = []
                    break
                alternatives.extend(best)
            if alternatives:
                out.append(tuple(dict.fromkeys(alternatives)))
    if run:
        out.append(("".join(run),))
    return out


def _best_candidate(candidates: Sequence[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The most selective candidate (longest shortest member); None if all are too short."""
    best: tuple[str, ...] | None = None
    best_score = 2  # a 1-2 character literal filters nothing
    for cand in candidates:
        score = min(len(s) for s in cand)
        if score > best_score or (best is not None and score == best_score and len(cand) < len(best)):
            best, best_score = cand, score
    return best


def required_literals(pattern: str) -> tuple[str, ...] | None:
    """Lower-case strings one of which every match of ``pattern`` contains (None: unknown).

    Uses the regex parser of the standard library (``re._parser``); if that is
    unavailable or fails, the rule simply goes unfiltered, which is slower but
    still correct.
    """
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser  # type: ignore[attr-defined]

        tree = _parser.parse(pattern, RULE_FLAGS)
        return _best_candidate(_literal_candidates(tree.data, c))
    except Exception:  # private API: any surprise means "no pre-filter"
        return None


# --- unwrapping ------------------------------------------------------------------


def _stage_of(words: str) -> str | None:
    """Map an MTA's command/phase words to connect|mail|rcpt|data.

    HELO/EHLO/STARTTLS answers count as ``connect``: they come before any
    transaction, like the greeting.
    """
    w = words.strip().upper()
    if w.startswith("MAIL"):
        return "mail"
    if w.startswith("RCPT"):
        return "rcpt"
    if "DATA" in w or w.startswith("BDAT"):
        return "data"
    if w.startswith(("INITIAL", "EHLO", "HELO", "LHLO", "STARTTLS", "CONNECT", "GREETING")):
        return "connect"
    return None


def _unwrap(s: str) -> tuple[str, str | None, str | None]:
    """Strip Postfix/Exim wrappers: (bare reply, MX host, stage)."""
    host = stage = None
    start = 0
    if "SMTP error from remote" in s:
        m = _EXIM.search(s)
        if m:
            start, stage = m.end(), _stage_of(m["what"])
    if "host" in s or "H=" in s:
        m = _HOST.search(s)
        if m:
            host = m["host"]
            if m["verb"] and m["verb"][0] in "rR":
                stage = "connect"
            start = max(start, m.end())
    end = len(s)
    i = s.rfind("(in reply to ")
    if i >= start:
        m = _TRAILER.match(s, i)
        if m:
            end = i
            stage = stage or _stage_of(m["cmd"])
    return s[start:end].strip(), host, stage


def _flatten(t: str) -> tuple[str, str]:
    """(text, flat): text keeps lines joined by `` | ``; flat drops continuation prefixes.

    Rules and phrase matching run on ``flat`` so a phrase split across the lines of
    a multi-line reply still matches.
    """
    if "\n" in t or "\r" in t or " | " in t:
        parts = [p for p in _LINE_SPLIT.split(t) if p]
        if not parts:
            return "", ""
        text = " | ".join(parts)
        flat = " ".join([parts[0], *(_CONT_PREFIX.sub("", p, count=1) for p in parts[1:])]).strip()
    else:
        text = flat = t
    if len(flat) > 4 and flat[3] == "-" and flat[:3].isascii() and flat[:3].isdigit():
        # Postfix joins the lines of a multi-line reply with spaces, keeping "NNN-".
        flat = re.sub(r"\s" + flat[:3] + r"[ -](?:[245]\.[0-9]{1,3}\.[0-9]{1,3}\s+)?", " ", flat)
    return text, flat


def _head(flat: str, has_token: bool) -> tuple[int | None, str | None]:
    """SMTP code and RFC 3463 enhanced status (legacy ``#4.16.1`` forms normalised)."""
    code = enh = None
    m = _HEAD.match(flat)
    if m:
        code, enh = int(m["code"]), m["enh"]
    else:
        m = _ENH_AT_START.match(flat)
        if m:
            enh = m["enh"]
    if enh is None:
        if "#" in flat:
            m = _ENH_HASH.search(flat)
            enh = m["enh"] if m else None
        if enh is None and has_token:
            m = _ENH_BEFORE_TOKEN.search(flat)
            enh = m["enh"] if m else None
    return code, enh


def _normal_ip(candidate: str) -> str | None:
    """Normalise a literal IP as :mod:`ipaddress` would; None for masked/invalid/0.0.0.0.

    IPv4 takes a strict regex fast path (same acceptance as ipaddress, which is
    slow); IPv4-mapped IPv6 is reported as IPv4 because budgets are per IPv4.
    Sentence punctuation ("from 192.0.2.1." / "from 192.0.2.1:") is dropped.
    """
    candidate = candidate.rstrip(".")
    if ":" not in candidate:
        if _IPV4.fullmatch(candidate) and candidate != "0.0.0.0":
            return candidate
        return None
    try:
        addr = ipaddress.IPv6Address(candidate)
    except ValueError:
        stripped = candidate.rstrip(":")
        return _normal_ip(stripped) if stripped and stripped != candidate else None
    if addr.ipv4_mapped is not None:
        v4 = str(addr.ipv4_mapped)
        return None if v4 == "0.0.0.0" else v4
    return None if addr.is_unspecified else str(addr)


def _find_ip(flat: str) -> str | None:
    """The sender IP Yahoo names ("Messages from IP", "< IP >", "relay=[IP]").

    Only the first few candidates are tried: a real reply names the IP early,
    and garbage must not cost thousands of address parses.
    """
    for regex in (_IP_FROM, _IP_OTHER):
        if regex is _IP_OTHER and "<" not in flat and "relay=" not in flat:
            break
        for n, m in enumerate(regex.finditer(flat)):
            ip = _normal_ip(m["ip"])
            if ip or n >= _MAX_IP_CANDIDATES:
                return ip
    return None


def _find_host(flat: str) -> str | None:
    """A Yahoo/AOL MTA named in the reply itself (dd tail, greeting, 'NNN host ...')."""
    tail = flat.rstrip(". \t").lower()
    if tail.endswith(_HOST_SUFFIXES):
        m = _HOST_TAIL.search(flat)
        if m:
            return m["h"].lower()
    m = _HOST_LEAD.match(flat)
    return m["h"].lower() if m else None


def _generic_meaning(smtp_code: int | None, enhanced: str | None) -> str:
    first = str(smtp_code)[0] if smtp_code else (enhanced[0] if enhanced else "")
    if first == "2":
        return "Success reply; nothing to govern."
    if first == "4":
        return "Not a recognised Yahoo reply; temporary failure, retry on the MTA's normal schedule."
    if first == "5":
        return "Not a recognised Yahoo reply; permanent failure."
    return "Not a recognised SMTP reply."


# --- the classifier ----------------------------------------------------------------

# (index, the one literal guard, several alternative guards, regex, rule); no guard = always try
_Entry = tuple[int, "str | None", "tuple[str, ...] | None", "re.Pattern[str]", Rule]


class Classifier:
    """Applies one rule table; build once, call :meth:`classify` from any thread."""

    __slots__ = ("rules", "_labels", "_by_token")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        labels: list[_Entry] = []
        brackets: dict[str, list[_Entry]] = {}
        for index, rule in enumerate(self.rules):
            if rule.bracket is not None:
                brackets.setdefault(rule.bracket, []).append((index, None, None, rule.regex, rule))
            else:
                guards = required_literals(rule.match)
                if guards is not None and len(guards) == 1:
                    labels.append((index, guards[0], None, rule.regex, rule))
                else:
                    labels.append((index, None, guards, rule.regex, rule))
        self._labels: tuple[_Entry, ...] = tuple(labels)
        # per bracket token: its rules merged with the label rules, in table order
        self._by_token: dict[str, tuple[_Entry, ...]] = {
            token: tuple(sorted([*entries, *labels], key=lambda e: e[0])) for token, entries in brackets.items()
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Classifier:
        """A classifier for an admin's own table (validated, errors with file:line)."""
        return cls(load_rules(Path(path)))

    @classmethod
    def default(cls) -> Classifier:
        """The shipped table, loaded once on first use (not at import)."""
        global _default
        if _default is None:
            with _default_lock:
                if _default is None:
                    ref = resources.files("governor").joinpath(_DEFAULT_TABLE)
                    _default = cls(load_rules(ref.read_text(encoding="utf-8"), name=f"governor/{_DEFAULT_TABLE}"))
        return _default

    def _plan(self, tokens: list[str]) -> Sequence[_Entry]:
        """Rules worth trying for these bracket tokens, in table order."""
        if not tokens:
            return self._labels
        if len(tokens) == 1:
            return self._by_token.get(tokens[0].upper(), self._labels)
        merged: dict[int, _Entry] = {e[0]: e for e in self._labels}
        for token in tokens:
            for e in self._by_token.get(token.upper(), ()):
                merged[e[0]] = e
        return [merged[i] for i in sorted(merged)]

    def match(self, flat: str, low: str | None = None) -> Rule | None:
        """First rule (table order) that matches the flattened bare reply.

        ``low`` is ``flat.lower()`` when the caller already has it.
        """
        tokens = _BRACKET_TOKEN.findall(flat) if "[" in flat else []
        if low is None:
            low = flat.lower()
        for _, guard, guards, regex, rule in self._plan(tokens):
            if guard is not None:
                if guard not in low:
                    continue
            elif guards is not None and not any(g in low for g in guards):
                continue
            if regex.search(flat) is not None:
                return rule
        return None

    def classify(self, reply: str) -> Classification:
        """Classify one reply (bare or MTA-wrapped); never raises on any str."""
        if not isinstance(reply, str):
            reply = _to_str(reply)
        s = reply[:MAX_REPLY_CHARS].strip()
        bare, host, stage = _unwrap(s)
        text, flat = _flatten(bare)
        low = flat.lower()
        rule = self.match(flat, low)
        smtp_code, enhanced = _head(flat, "[" in flat)
        if host is None:
            host = _find_host(flat)
        ip = _find_ip(flat) if "from" in low or "<" in flat or "relay=" in low else None
        if rule is not None and rule.permanent is not None:
            permanent = rule.permanent
        elif smtp_code is not None:
            permanent = smtp_code >= 500
        else:
            permanent = enhanced is not None and enhanced[0] == "5"
        if rule is None:
            return Classification(None, None, None, permanent, smtp_code, enhanced, ip, host, stage,
                                  _generic_meaning(smtp_code, enhanced), text)
        return Classification(rule.code, rule.cls, rule.scope, permanent, smtp_code, enhanced, ip, host, stage,
                              rule.meaning, text)


def _to_str(reply: Any) -> str:
    """Bytes from a socket or log are decoded leniently; anything else via str()."""
    if isinstance(reply, (bytes, bytearray, memoryview)):
        return bytes(reply).decode("utf-8", "replace")
    return "" if reply is None else str(reply)


_default: Classifier | None = None
_default_lock = threading.Lock()


def classify(reply: str) -> Classification:
    """Classify one reply with the shipped rule table (see :meth:`Classifier.classify`)."""
    return (_default or Classifier.default()).classify(reply)
