"""Fuzzing the configuration loader (governor/config.py on governor/yamlnode.py).

Whatever YAML text an operator writes, ``load_config_text`` gives a Config or a
ConfigError whose every line names ``file:line:``; never another exception (a
traceback from ``governor check-config`` would be a bug). Inputs: arbitrary text,
the documented example file with lines dropped, doubled or spliced with hostile
characters, and documents with the real key tree and random values. The ``fuzz``
tests use the ``governor-fuzz`` profile (tests/conftest.py): 10^3 examples in every
run, 10^5 with ``pytest -m fuzz``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.config import Config, ConfigError, load_config_text

FUZZ = settings.get_profile("governor-fuzz")
NAME = "fuzz.yaml"
EXAMPLE = (Path(__file__).resolve().parent.parent / "packaging" / "governor.yaml.example").read_text()
EXAMPLE_TREE: dict[str, Any] = yaml.safe_load(EXAMPLE)
LOCATED = re.compile(rf"{re.escape(NAME)}:(\d+): \S")
YAML_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def check(text: str) -> Config | ConfigError:
    """Load ``text``; a ConfigError must locate every problem within the text."""
    try:
        cfg = load_config_text(text, NAME)
    except ConfigError as exc:
        lines = str(exc).split("\n")
        assert lines and exc.problems, repr(exc)
        last = len(YAML_BREAK.findall(text)) + 2  # YAML's own line count; an error may point past the end
        for line in lines:
            m = LOCATED.match(line)
            assert m, f"problem without {NAME}:line: {line!r}"
            assert 1 <= int(m[1]) <= last, line
        return exc
    assert isinstance(cfg, Config)
    assert math.isfinite(cfg.time_scale) and cfg.time_scale > 0
    return cfg


# --------------------------------------------------------------------------- strategies
HOSTILE_TEXT = ["{", "}", "[", "]", "*", "&a", "*a", "!!python/object:os.system", "!!binary x", "%YAML 1.1", "---",
                "...", ":", "- ", "\t", "\r", "\x00", "\ufeff", "\u2028", "'", '"', "#", "|", ">", "? ", "@", "`",
                "x" * 300, "1e999", "-1", "0x1F", "nan", ".inf", "2026-13-45", "~", "<<: *a"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["30s", "2h", "1h30m", "500ms", "0", "-5s", "1e9d", "unix:/x",
                                           "/run/x.sock", "inet:127.0.0.1:1", "0660", "0o777", "redis://h:1/0",
                                           "rediss://x", "192.0.2.10", "2001:db8::1", "fe80::1%eth0",
                                           "yahoo.com", "*", "{x}", "fail-open", "monitor", "hold", "tempfail"]),
)


def _values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return scalars
    inner = _values(depth - 1)
    return st.one_of(scalars, st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))


VALUES, SMALL_VALUES = _values(2), _values(1)  # built once: building strategies per draw is slow


_DROP = object()


def _shape(tree: Any) -> st.SearchStrategy[Any]:
    """The example's key tree with values kept, replaced or dropped (built once)."""
    if isinstance(tree, dict):
        fields = {k: st.one_of(_shape(v), st.just(_DROP), VALUES) for k, v in tree.items()}
        return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not _DROP})
    if isinstance(tree, list):
        return st.tuples(*(_shape(item) for item in tree), st.integers(0, len(tree))).map(lambda t: list(t[:t[-1]]))
    return st.one_of(st.just(tree), scalars)


def _with_unknown(doc: dict[str, Any], extra: tuple[str, Any] | None) -> dict[str, Any]:
    return {**doc, extra[0]: extra[1]} if extra is not None else doc


SHAPED = st.builds(_with_unknown, _shape(EXAMPLE_TREE), st.none() | st.tuples(st.text(max_size=10), SMALL_VALUES))


def _dump(doc: Any) -> str:
    """Block style, or flow style for some documents (deterministically, so it shrinks)."""
    flow = isinstance(doc, dict) and len(doc) % 2 == 1
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, default_flow_style=flow)


def _splice(lines: list[str], at: int, op: int, junk: str) -> str:
    lines = list(lines)
    at %= len(lines)
    if op == 0:
        del lines[at]
    elif op == 1:
        lines.insert(at, lines[at])
    elif op == 2:
        cut = len(lines[at]) // 2
        lines[at] = lines[at][:cut] + junk + lines[at][cut:]
    else:
        lines[at] = junk
    return "\n".join(lines)


EXAMPLE_LINES = EXAMPLE.split("\n")
spliced = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.sampled_from(HOSTILE_TEXT) | st.text(max_size=8)),
                   min_size=1, max_size=4)


def _apply(edits: list[tuple[int, int, str]]) -> str:
    lines = EXAMPLE_LINES
    for at, op, junk in edits:
        lines = _splice(lines, at, op, junk).split("\n")
    return "\n".join(lines)


TEXTS = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(HOSTILE_TEXT) | st.text(max_size=10), max_size=8).map("".join),
    spliced.map(_apply),
    SHAPED.map(_dump),
)


# --------------------------------------------------------------------------- properties
def test_the_example_and_the_empty_file_load() -> None:
    assert isinstance(check(EXAMPLE), Config)
    assert isinstance(check(""), Config)


@pytest.mark.parametrize("text", HOSTILE_TEXT + [
    "x" * 10_240, "a: " + "x" * 10_240, "redis: {password_file: /nonexistent}", "pool: [{ip: '{x}'}]", "' ': 1",
    "\"\\r\": 1", "sockets: {mode: '7777'}", "time_scale: 1e-400"])
def test_hostile_fragments_give_located_errors(text: str) -> None:
    check(text)


@pytest.mark.fuzz
@FUZZ
@given(TEXTS)
def test_fuzz_any_text_gives_a_config_or_a_located_config_error(text: str) -> None:
    check(text)


@pytest.mark.fuzz
@FUZZ
@given(SHAPED)
def test_fuzz_real_keys_with_random_values(doc: Any) -> None:
    check(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
