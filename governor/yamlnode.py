"""YAML values that remember where they came from.

Every data file the product reads (governor.yaml, the reply rule table, the
bundled reactions and domain set, the simulator's settings) is read with
:func:`parse` or :func:`load` and validated through :class:`Node`, so every error
a mail admin sees names the file, the line and the key path, says what was
expected and what was found, e.g. ``governor.yaml:14:
limits.per_ip.messages_per_minute: expected a positive number, got "fast"``.
Problems are collected, not raised one by one, so one run of ``governor
check-config`` shows all of them.

Each reader passes its own :class:`YamlError` subclass as ``error=``; syntax
errors, unreadable files and :meth:`Problems.raise_if_any` then raise that class.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor


@dataclass(frozen=True)
class Problem:
    """One validation error, located in its file."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        path, message = _printable(self.path), _printable(self.message)
        if path != path.strip():  # a key such as " ": quoted, or the line reads as garbled
            path = repr(path)
        return f"{where}: {path}: {message}" if path else f"{where}: {message}"


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str) -> str:
    """Escape control characters (a key such as ``"\\r"`` in a key path): one problem
    stays one line of output, and nothing reaches the terminal raw."""
    return _UNPRINTABLE.sub(lambda m: repr(m[0])[1:-1], text)


class YamlError(ValueError):
    """A data file is invalid; ``problems`` lists every error found.

    A subclass that is also raised for values from no file (a rule built in code,
    a setting from the command line) may be given a plain message instead; its
    ``problems`` is then empty.
    """

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            self.problems: list[Problem] = []
            super().__init__(problems)
        else:
            self.problems = list(problems)
            super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Problems:
    """Collector shared by all nodes of one document; ``error`` is the class raised."""

    items: list[Problem] = field(default_factory=list)
    error: type[YamlError] = YamlError

    def raise_if_any(self) -> None:
        """Raise ``error`` listing every problem in file and line order, if there are any."""
        if self.items:
            raise self.error(sorted(self.items, key=lambda p: (p.file, p.line)))


_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*)+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``"30s"``, ``"2h"``, ``"1h30m"``, ``"500ms"``, ``"3d"``.

    Raises ValueError for anything else; a bare number means seconds.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as 30s, 2h or 3d, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"expected a duration of zero or more, got {text}")
        return float(text)
    if not isinstance(text, str) or not _DURATION_RE.match(text):
        raise ValueError(f"expected a duration such as 30s, 2h or 3d, got {_show(text)}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """Short human form of a duration: ``2h``, ``1h30m``, ``45s``, ``250ms``."""
    if seconds < 1 and seconds > 0:
        return f"{seconds * 1000:.0f}ms"
    rest = int(round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def _show(value: Any) -> str:
    """How a bad value is quoted in an error message."""
    if isinstance(value, str):
        return '"' + (value if len(value) <= 60 else value[:57] + "...") + '"'
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Constructor(SafeConstructor):
    """Builds plain Python values from scalar nodes (int, float, bool, date, str, null)."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_BAD_MERGE = "expected a mapping (or a list of mappings) to merge"


class Node:
    """A YAML node plus its file and key path; typed accessors record problems."""

    __slots__ = ("node", "file", "path", "problems")

    def __init__(self, node: yaml.Node | None, file: str, path: str, problems: Problems) -> None:
        self.node = node
        self.file = file
        self.path = path
        self.problems = problems

    # --- basics -------------------------------------------------------------
    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1 if self.node is not None else 1

    def fail(self, message: str, *, line: int | None = None, path: str | None = None) -> None:
        """Record a problem at this node (or at an explicit line/path)."""
        self.problems.items.append(
            Problem(self.file, line or self.line, self.path if path is None else path, message)
        )

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    @property
    def is_null(self) -> bool:
        return self.node is None or (
            isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"
        )

    def raw(self) -> Any:
        """The plain Python value of this node (scalars, lists, mappings)."""
        if self.node is None:
            return None
        c = _Constructor()
        return c.construct_object(self.node, deep=True)

    # --- containers ----------------------------------------------------------
    def mapping(self, allowed: Iterable[str] | None = None, *, required: Iterable[str] = ()) -> dict[str, Node]:
        """Children of a mapping; keys outside ``allowed`` are reported with a suggestion.

        Each key of ``required`` that is absent is reported as ``PATH.KEY: missing
        key`` at this node's line (unless an unknown key was already reported as a
        likely misspelling of it); when keys are required, a null value is not a
        mapping either. Merge keys (``<<: *anchor``) are expanded, and keys given
        in the mapping itself override merged ones.
        """
        needed = tuple(required)
        if self.is_null and not needed:
            return {}
        if not isinstance(self.node, yaml.MappingNode):
            what = f"a mapping with keys {', '.join(needed)}" if needed else "a mapping (key: value lines)"
            self.fail(f"expected {what}, got {_show(self.raw())}")
            return {}
        known = list(allowed) if allowed is not None else None
        pairs, merged = self._pairs()
        out: dict[str, Node] = {}
        given: set[str] = set()  # keys written in this mapping itself (not merged in)
        hinted: set[str] = set()
        for index, (key_node, value_node) in enumerate(pairs):
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key == "":
                self.fail("keys must be plain strings", line=key_node.start_mark.line + 1)
                continue
            kpath = self.child_path(key)
            if known is not None and key not in known:
                hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hinted.update(hint)
                msg = "unknown key"
                msg += f' (did you mean "{hint[0]}"?)' if hint else f"; expected one of: {', '.join(known)}"
                self.fail(msg, line=key_node.start_mark.line + 1, path=kpath)
                continue
            if index >= merged:
                if key in given:
                    self.fail("duplicate key", line=key_node.start_mark.line + 1, path=kpath)
                given.add(key)
            out[key] = Node(value_node, self.file, kpath, self.problems)
        for key in needed:
            if key not in out and key not in hinted:
                self.fail("missing key", path=self.child_path(key))
        return out

    def _pairs(self, node: yaml.MappingNode | None = None,
               outer: frozenset[int] = frozenset()) -> tuple[list[tuple[yaml.Node, yaml.Node]], int]:
        """(key, value) node pairs with merge keys expanded as PyYAML does, and how many
        of them (at the start) were merged in; a later pair overrides an earlier one.
        """
        node = self.node if node is None else node
        if not any(k.tag == _MERGE_TAG for k, _ in node.value):
            return node.value, 0
        outer = outer | {id(node)}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in reversed(sources):  # of several mappings merged, the first listed wins
                if not isinstance(source, yaml.MappingNode) or id(source) in outer:  # a loop of merges
                    self.fail(_BAD_MERGE, line=source.start_mark.line + 1, path=self.child_path("<<"))
                    continue
                merged.extend(self._pairs(source, outer)[0])
        return merged + own, len(merged)

    def sequence(self) -> list[Node]:
        if self.is_null:
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            self.fail(f"expected a list, got {_show(self.raw())}")
            return []
        return [Node(n, self.file, self.child_path(i), self.problems) for i, n in enumerate(self.node.value)]

    def items(self) -> Iterator[tuple[str, Node]]:
        """Key/value pairs of a free-form mapping (no allowed-key check)."""
        return iter(self.mapping(None).items())

    # --- scalars ---------------------------------------------------------------
    def _scalar(self) -> Any:
        if self.node is not None and not isinstance(self.node, yaml.ScalarNode):
            return self.raw()
        return self.raw()

    def string(self, default: str | None = None, *, pattern: str | None = None, what: str = "a string") -> str | None:
        if self.is_null:
            return default
        v = self._scalar()
        if not isinstance(v, str) or v == "":
            self.fail(f"expected {what}, got {_show(v)}")
            return default
        if pattern is not None and not re.fullmatch(pattern, v):
            self.fail(f"expected {what}, got {_show(v)}")
            return default
        return v

    def boolean(self, default: bool) -> bool:
        if self.is_null:
            return default
        v = self._scalar()
        if not isinstance(v, bool):
            self.fail(f"expected true or false, got {_show(v)}")
            return default
        return v

    def integer(self, default: int | None, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        if self.is_null:
            return default
        v = self._scalar()
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"expected a whole number{_range(minimum, maximum)}, got {_show(v)}")
            return default
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            self.fail(f"expected a whole number{_range(minimum, maximum)}, got {v}")
            return default
        return v

    def number(self, default: float | None, *, positive: bool = False, minimum: float | None = None,
               maximum: float | None = None) -> float | None:
        if self.is_null:
            return default
        v = self._scalar()
        kind = "a positive number" if positive else "a number"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"expected {kind}{_range(minimum, maximum)}, got {_show(v)}")
            return default
        if (positive and v <= 0) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            self.fail(f"expected {kind}{_range(minimum, maximum)}, got {v}")
            return default
        return float(v)

    def duration(self, default: float | None, *, positive: bool = False) -> float | None:
        if self.is_null:
            return default
        try:
            seconds = parse_duration(self._scalar())
        except ValueError as exc:
            self.fail(str(exc))
            return default
        if positive and seconds <= 0:
            self.fail(f"expected a duration above zero, got {_show(self._scalar())}")
            return default
        return seconds

    def choice(self, default: str, choices: Iterable[str]) -> str:
        options = list(choices)
        if self.is_null:
            return default
        v = self._scalar()
        if v not in options:
            self.fail(f"expected one of {', '.join(options)}, got {_show(v)}")
            return default
        return v

    def string_list(self, *, pattern: str | None = None, what: str = "a string") -> tuple[str, ...]:
        """A list of strings (a single string is accepted as a one-item list)."""
        if isinstance(self.node, yaml.ScalarNode) and not self.is_null:
            v = self.string(pattern=pattern, what=what)
            return (v,) if v else ()
        out = []
        for item in self.sequence():
            v = item.string(pattern=pattern, what=what)
            if v is not None:
                out.append(v)
        return tuple(out)


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f" of at least {minimum:g}"
    if maximum is not None:
        return f" of at most {maximum:g}"
    return ""


def parse(text: str, file: str, *, error: type[YamlError] = YamlError) -> tuple[Node, Problems]:
    """Parse one YAML document into a root :class:`Node`.

    A syntax error, or a value YAML cannot build (an unknown ``!tag``, a date such
    as 2024-13-45), raises ``error`` naming file:line; the returned
    :class:`Problems` raises ``error`` too.
    """
    problems = Problems(error=error)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise error([Problem(file, line, "", f"YAML syntax error: {_one_line(exc.problem or exc)}")]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, most controls)
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise error([Problem(file, line, "", f"YAML error: unacceptable character {what}: {exc.reason}")]) from None
    except yaml.YAMLError as exc:  # pragma: no cover - other unmarked errors are rare
        raise error([Problem(file, 1, "", f"YAML error: {_one_line(exc)}")]) from None
    root = Node(node, file, "", problems)
    if node is not None:
        _check_values(root)
        problems.raise_if_any()
    return root, problems


def _one_line(value: object) -> str:
    """An error text on one line: each problem is one ``file:line:`` line."""
    return " ".join(str(value).split())


def load(path: str | os.PathLike[str], file: str | None = None, *,
         error: type[YamlError] = YamlError) -> tuple[Node, Problems]:
    """Read a UTF-8 file and :func:`parse` it; errors name ``file`` (default: ``path``).

    A file that cannot be read raises ``error`` (``FILE:1: cannot read: ...``).
    """
    name = file or str(Path(path))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error([Problem(name, 1, "", "cannot read: file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error([Problem(name, 1, "", f"cannot read: {reason}")]) from None
    return parse(text, name, error=error)


def _check_values(root: Node) -> None:
    """Record a problem for every node :meth:`Node.raw` could not build.

    Scalars are built once here; collections only need a known tag (building them
    would expand merge keys in place, which :meth:`Node.mapping` does itself).
    """
    c = _Constructor()
    seen: set[int] = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if id(n.node) in seen:  # aliases: each node once
            continue
        seen.add(id(n.node))
        if isinstance(n.node, yaml.ScalarNode):
            if n.node.tag == _STR_TAG:  # cannot fail, and most values are strings
                continue
            try:
                c.construct_object(n.node)
            except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
                n.fail(f"invalid value: {getattr(exc, 'problem', None) or exc}")
            continue
        if n.node.tag not in c.yaml_constructors:
            n.fail(f"invalid value: unknown tag {n.node.tag}")
        elif isinstance(n.node, yaml.SequenceNode):
            todo.extend(Node(v, n.file, n.child_path(i), n.problems) for i, v in enumerate(n.node.value))
        else:
            for k, v in n.node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                value = Node(v, n.file, n.child_path(key), n.problems)
                if k.tag != _MERGE_TAG:
                    todo.append(Node(k, n.file, n.path, n.problems))
                elif not all(isinstance(m, yaml.MappingNode)
                             for m in (v.value if isinstance(v, yaml.SequenceNode) else [v])):
                    value.fail(_BAD_MERGE)
                todo.append(value)
