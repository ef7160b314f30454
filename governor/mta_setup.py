"""Reversible edits of MTA config text for ``governor setup postfix|exim add|remove``.

Pure functions on text, no I/O. Why this shape: an admin must be able to take the
integration out again and get back *exactly* the files they had (a package
upgrade, a config-management diff or a ``dpkg`` conffile prompt notices a single
changed byte). So every change is one of two kinds, each undone by a rule that
needs no state outside the file:

* **Blocks**: whole lines inserted between a ``# BEGIN yahoo-governor (...)`` and a
  ``# END yahoo-governor`` line. Removing them removes the lines. When a block goes
  after a last line that had no newline, that line gets one and the END line goes
  without: an END line without a newline means "take the newline off the line
  before BEGIN again".
* **Saved lines**: an original line that must stop being active (a main.cf
  parameter the governor sets, the qmgr entry it amends, an ``acl_smtp_rcpt`` it
  wraps) is prefixed with :data:`SAVED`; removing strips the prefix.

``add`` always starts from :func:`strip_managed` of the text, so running it twice
gives one block, and ``strip_managed(add(x)) == x`` for any text without our
markers (property-tested). Text that already contains a marker is treated as
managed: that is how a second ``add`` replaces the first.

Config syntax handled here: Postfix logical lines (a line starting with
whitespace continues the entry above it; blank and ``#`` lines are ignored),
Exim ``begin <section>`` lines and backslash continuations.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence

BEGIN = "# BEGIN yahoo-governor"
END = "# END yahoo-governor"
SAVED = "#yahoo-governor-saved# "
#: First line of a conf.d file that ``setup exim add`` owns (and ``remove`` deletes).
FILE_MARK = "# yahoo-governor: managed by \"governor setup exim\"; remove with \"governor setup exim remove\""

EXIM_SECTIONS = ("acl", "routers", "transports", "retry")


class EditError(ValueError):
    """The text cannot be edited safely (a broken block, a missing entry): one line for the CLI."""


# --------------------------------------------------------------------------- lines
def split_lines(text: str) -> list[str]:
    """Lines with their ``\\n`` kept; only ``\\n`` splits (``\\r`` stays part of a line)."""
    parts = text.split("\n")
    out = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def begin_line(mta: str) -> str:
    return f'{BEGIN} (managed by "governor setup {mta}"; remove with "governor setup {mta} remove")'


def _is_begin(line: str) -> bool:
    return line.startswith(BEGIN + " (") or line.rstrip("\n") == BEGIN


def _is_end(line: str) -> bool:
    return line.rstrip("\n") == END


def blocks(lines: Sequence[str]) -> list[tuple[int, int]]:
    """(BEGIN index, END index) of every managed block; raises on an unbalanced marker."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for i, line in enumerate(lines):
        if _is_begin(line):
            if start is not None:
                raise EditError(f"line {i + 1}: {BEGIN} inside another block (line {start + 1})")
            start = i
        elif _is_end(line):
            if start is None:
                raise EditError(f"line {i + 1}: {END} without {BEGIN}")
            out.append((start, i))
            start = None
    if start is not None:
        raise EditError(f"line {start + 1}: {BEGIN} without {END}")
    return out


def is_managed(text: str) -> bool:
    """True when the text holds a block or a saved line of ours."""
    lines = split_lines(text)
    return bool(blocks(lines)) or any(line.startswith(SAVED) for line in lines)


def strip_managed(text: str) -> str:
    """The text as it was before ``add``: blocks removed, saved lines restored."""
    lines = split_lines(text)
    spans = blocks(lines)
    drop: set[int] = set()
    for start, end in spans:
        drop.update(range(start, end + 1))
        if not lines[end].endswith("\n") and start > 0:
            lines[start - 1] = lines[start - 1].removesuffix("\n")
    kept = [line for i, line in enumerate(lines) if i not in drop]
    return "".join(line.removeprefix(SAVED) for line in kept)


def edit(text: str, mta: str, *, comment: Iterable[int] = (), inserts: Iterable[tuple[int, str]] = ()) -> str:
    """Apply one add to pristine ``text``: comment out line indices ``comment`` and
    insert each ``(position, body)`` as a block before line ``position``
    (``len(lines)`` = at the end). Positions refer to the pristine lines."""
    lines = split_lines(text)
    for i in comment:
        lines[i] = SAVED + lines[i]
    by_pos: dict[int, str] = {}
    for pos, body in inserts:
        if body and not body.endswith("\n"):
            body += "\n"
        by_pos[pos] = by_pos.get(pos, "") + body  # one block per position
    out: list[str] = []
    for pos in range(len(lines) + 1):
        if by_pos.get(pos):
            out += _block(mta, by_pos[pos], out)
        if pos < len(lines):
            out.append(lines[pos])
    return "".join(out)


def _block(mta: str, body: str, before: list[str]) -> list[str]:
    """The block's lines; fixes up a preceding last line that has no newline."""
    missing_nl = bool(before) and not before[-1].endswith("\n")
    if missing_nl:
        before[-1] += "\n"
    inner = [line if line.endswith("\n") else line + "\n" for line in split_lines(body)]
    return [begin_line(mta) + "\n", *inner, END + ("" if missing_nl else "\n")]


def unified_diff(path: str, old: str, new: str) -> str:
    """A unified diff of one file (``a/PATH`` → ``b/PATH``, usable with ``patch -p1`` from
    ``/``), empty when nothing changes."""
    if old == new:
        return ""
    name = path.lstrip("/")
    diff = difflib.unified_diff(split_lines(old), split_lines(new), f"a/{name}", f"b/{name}")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in diff)


# --------------------------------------------------------------------------- Postfix syntax
def logical_entries(lines: Sequence[str]) -> list[tuple[int, list[int]]]:
    """Postfix logical lines: (head index, every index it spans).

    A head starts in column 0 and is not a comment; a following line that starts
    with whitespace continues it (blank and comment lines in between are skipped
    by Postfix, and are covered here only when a continuation follows them).
    """
    out: list[tuple[int, list[int]]] = []
    current: list[int] | None = None
    pending: list[int] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            pending.append(i)
            continue
        if line[0] in " \t":
            if current is not None:
                current += pending + [i]
            pending = []
            continue
        current = [i]
        out.append((i, current))
        pending = []
    return out


_PARAM = re.compile(r"^([A-Za-z0-9_.\-]+)\s*=")


def main_cf_definitions(lines: Sequence[str], names: Iterable[str]) -> list[int]:
    """Indices of every line of every active definition of ``names`` in main.cf."""
    wanted = set(names)
    out: list[int] = []
    for head, span in logical_entries(lines):
        m = _PARAM.match(lines[head])
        if m and m.group(1) in wanted:
            out += span
    return out


def master_cf_entries(lines: Sequence[str]) -> dict[str, list[list[int]]]:
    """``service/type`` → the line spans of each entry with that key in master.cf."""
    out: dict[str, list[list[int]]] = {}
    for head, span in logical_entries(lines):
        fields = lines[head].split()
        if len(fields) >= 2:
            out.setdefault(f"{fields[0]}/{fields[1]}", []).append(span)
    return out


def postfix_main_add(text: str, settings: Mapping[str, str]) -> str:
    """main.cf with ``settings`` in a block at the end; earlier definitions of the same
    parameters are commented out (saved), so ours are the only ones Postfix sees."""
    pristine = strip_managed(text)
    lines = split_lines(pristine)
    body = "".join(f"{name} = {value}\n" for name, value in settings.items())
    return edit(pristine, "postfix", comment=main_cf_definitions(lines, settings),
                inserts=[(len(lines), body)])


def postfix_master_add(text: str, entries: Sequence[str], amend: Mapping[str, Sequence[str]]) -> str:
    """master.cf with ``entries`` (service text) in a block at the end.

    Existing entries with the same ``service/type`` are commented out. Each entry
    named in ``amend`` (e.g. ``qmgr/unix``) is commented out and repeated in the
    block with the extra ``-o`` lines appended; it must exist.
    """
    pristine = strip_managed(text)
    lines = split_lines(pristine)
    existing = master_cf_entries(lines)
    comment: list[int] = []
    body: list[str] = []
    for key, extra in amend.items():
        if key not in existing:
            raise EditError(f"master.cf has no {key} service to amend")
        span = existing[key][-1]  # the last definition is the one master(8) uses
        for s in existing[key]:
            comment += s
        copied = [lines[i].rstrip("\n") for i in span if lines[i].strip() and not lines[i].lstrip().startswith("#")]
        body += [line for line in copied if line.strip() not in extra]  # e.g. left by `postfix-config --apply`
        body += [f"  {line}" for line in extra]
    for entry in entries:
        fields = entry.split()
        key = f"{fields[0]}/{fields[1]}"
        for s in existing.get(key, []):
            comment += s
        body.append(entry.rstrip("\n"))
    return edit(pristine, "postfix", comment=sorted(set(comment)),
                inserts=[(len(lines), "\n".join(body) + "\n")])


# --------------------------------------------------------------------------- Exim syntax
_BEGIN_SECTION = re.compile(r"^\s*begin\s+(\w+)\s*$")
_ACL_RCPT = re.compile(r"^\s*acl_smtp_rcpt\s*=\s*(.*?)\s*$")


def exim_sections(lines: Sequence[str]) -> dict[str, int]:
    """Section name → index of its (first) ``begin`` line."""
    out: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _BEGIN_SECTION.match(line.rstrip("\n"))
        if m:
            out.setdefault(m.group(1).lower(), i)
    return out


def exim_rcpt_acl(lines: Sequence[str]) -> tuple[str, list[int]] | None:
    """The main section's ``acl_smtp_rcpt`` value and its lines (with backslash
    continuations), or None when it is not set there."""
    end = min(exim_sections(lines).values(), default=len(lines))
    for i in range(end):
        m = _ACL_RCPT.match(lines[i].rstrip("\n"))
        if not m:
            continue
        span, value = [i], m.group(1)
        while value.endswith("\\") and span[-1] + 1 < end:
            nxt = span[-1] + 1
            span.append(nxt)
            value = value[:-1] + lines[nxt].strip()
        return value, span
    return None


def exim_add(text: str, sections: Mapping[str, str], *, wrap_rcpt_acl: str | None = None) -> str:
    """A monolithic Exim config with the governor's pieces in blocks.

    ``sections['']`` goes at the top of the file (its macros must be defined before
    anything uses them, e.g. Debian's ``MAIN_ACL_CHECK_RCPT``); each other section's
    text goes right after its ``begin`` line (the governor's router before the
    admin's dnslookup, its retry rules before the ``*`` rule); a section the file
    lacks is added at the end. With ``wrap_rcpt_acl`` (the ACL name to use instead),
    an ``acl_smtp_rcpt`` setting of the main section is saved and replaced, and the
    old value becomes ``YAHOO_GOVERNOR_NEXT_RCPT_ACL``.
    """
    pristine = strip_managed(text)
    lines = split_lines(pristine)
    where = exim_sections(lines)
    inserts: list[tuple[int, str]] = []
    comment: list[int] = []
    main = sections.get("", "")
    found = exim_rcpt_acl(lines) if wrap_rcpt_acl else None
    if found is not None and wrap_rcpt_acl:
        old, span = found
        comment += span
        main += (f"YAHOO_GOVERNOR_NEXT_RCPT_ACL = {old}\n.ifdef YAHOO_GOVERNOR_ENABLE\n"
                 f"acl_smtp_rcpt = {wrap_rcpt_acl}\n.else\nacl_smtp_rcpt = {old}\n.endif\n")
    if main:
        inserts.append((0, main))
    for name in EXIM_SECTIONS:
        piece = sections.get(name)
        if not piece:
            continue
        if name in where:
            inserts.append((where[name] + 1, piece))
        else:
            inserts.append((len(lines), f"begin {name}\n{piece}"))
    return edit(pristine, "exim", comment=comment, inserts=inserts)


def conf_d_file(text: str) -> str:
    """A conf.d file's text as ``setup exim add`` writes it: marked as ours."""
    return f"{FILE_MARK}\n{text}"


def is_our_file(text: str) -> bool:
    return text.startswith(FILE_MARK + "\n")
