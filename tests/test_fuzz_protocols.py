"""Fuzzing the MTA-facing parsers (hypothesis): the Exim line protocol's ``parse`` and
the socketmap's netstring reader.

Arbitrary bytes give a parsed request or the protocol's own error (``Refused``,
``NetstringError``), never another exception; a parsed request carries only values
the store's validators accept, so nothing hostile can reach a Redis key. The ``fuzz``
tests use the ``governor-fuzz`` profile (tests/conftest.py): 10^3 examples in every
run, 10^5 with ``pytest -m fuzz``.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.adapters.exim_socket import MAX_LINE, Acquire, Held, Refused, Release, Report, parse
from governor.adapters.socketmap import MAX_NETSTRING, NetstringError, NetstringReader, encode
from governor.store.keys import parse_lease, valid_domain, valid_ip, valid_recipient

FUZZ = settings.get_profile("governor-fuzz")

# --------------------------------------------------------------------------- Exim line protocol
IP = "192.0.2.10"
MSGID = "1xVXpg-0002Es-1T"
LEASE = f"{IP}|0123456789abcdef"
#: pieces of real requests and hostile values: braces (hash tags), glob characters,
#: spaces, CR/LF, NUL, non-UTF-8, a 10 kB field
HOSTILE = [b"{", b"}", b"*", b"?", b"[", b"]", b" ", b"  ", b"\r", b"\n", b"\r\n", b"\x00", b"\t", b"\xff",
           b"\xc3", b"\xed\xa0\x80", b"%", b"|", b"\\", b"x" * 10_240, "é".encode(), "\u202e".encode()]
WORDS = [b"acquire", b"release", b"report", b"held", b"yahoo.com", b"aol.com", b"gmail.com", b"auto", b"-",
         IP.encode(), b"2001:db8::1", b"fe80::1%eth0", MSGID.encode(), b"u@yahoo.com", b"u+tag@Yahoo.COM",
         b"msg:defer", b"msg:delivery", b"msg:host:defer", b"tcp:connect", b"421", b"4.7.0", b"[TSS04]",
         LEASE.encode(), LEASE.encode() + b"|holder", b"xn--bcher-kva.example", b"yahoo.com."]
TOKENS = st.sampled_from(WORDS + HOSTILE) | st.binary(max_size=16)
LINES = st.one_of(
    st.lists(TOKENS, max_size=10).map(b" ".join),
    st.lists(TOKENS, max_size=10).map(b"".join),
    st.binary(max_size=MAX_LINE + 16),
)
VALID_LINES = [
    f"acquire yahoo.com auto {MSGID} u@yahoo.com".encode(),
    f"acquire aol.com {IP} - -".encode(),
    f"release {LEASE}".encode(),
    f"report {LEASE} yahoo.com msg:defer {MSGID} u@yahoo.com 421 4.7.0 [TSS04] deferred".encode(),
    b"report - - tcp:connect - -",
    b"held yahoo.com",
]


def _mutate(line: bytes, at: int, junk: bytes, drop: int) -> bytes:
    at %= len(line) + 1
    return line[:at] + junk + line[at + drop:]


MUTATED = st.builds(_mutate, st.sampled_from(VALID_LINES), st.integers(0, 200), st.sampled_from(HOSTILE) | st.binary(max_size=4),
                    st.integers(0, 3))
_UNSAFE = re.compile(r"[\s{}\x00-\x1f\x7f]")  # never in a field (key names, hash tags, the protocol)
#: may never survive into any parsed field; ``*``, ``%``, ``|`` ... may (a local part can hold them)
NEVER = [b"{", b"}", b" ", b"\r", b"\n", b"\x00", b"\t", b"\xff", b"\xc3", b"\xed\xa0\x80", b"x" * 10_240]


def _assert_safe(req: object) -> None:
    """Every value a parsed request carries is what the key builders accept."""
    if isinstance(req, (Acquire, Held)) or (isinstance(req, Report) and req.domain is not None):
        assert valid_domain(req.domain) == req.domain and not _UNSAFE.search(req.domain)
    if isinstance(req, (Acquire, Report)):
        if req.ip is not None:
            assert valid_ip(req.ip) == req.ip
        if req.rcpt is not None:
            assert valid_recipient(req.rcpt) == req.rcpt and not _UNSAFE.search(req.rcpt)
        if req.msgid is not None:
            assert re.fullmatch(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}", req.msgid)
    lease = req.lease if isinstance(req, (Release, Report)) else None
    if lease is not None:
        ip, member = parse_lease(lease)
        assert valid_ip(ip) == ip and not _UNSAFE.search(member)
    if isinstance(req, Report):
        assert not re.search(r"[\x00-\x1f\x7f]", req.text) and len(req.text.encode()) <= MAX_LINE


def _parse_or_refuse(line: bytes) -> object | None:
    try:
        req = parse(line)
    except Refused as exc:
        message = str(exc)
        assert message and len(message) < 200 and not re.search(r"[\x00-\x1f\x7f]", message), message
        return None
    assert isinstance(req, (Acquire, Release, Report, Held))
    return req


@pytest.mark.fuzz
@FUZZ
@given(st.one_of(LINES, MUTATED))
def test_fuzz_exim_parse_gives_a_safe_request_or_refused(line: bytes) -> None:
    req = _parse_or_refuse(line)
    if req is not None:
        _assert_safe(req)


@pytest.mark.fuzz
@FUZZ
@given(st.sampled_from(VALID_LINES), st.sampled_from(NEVER), st.integers(0, 200))
def test_fuzz_hostile_bytes_inside_a_field_are_refused(line: bytes, junk: bytes, at: int) -> None:
    """A brace, space, control character, non-UTF-8 or 10 kB run inside a field of a
    valid request is refused."""
    words = line.split(b" ")
    n = 1 + at % (min(len(words), 6) - 1)  # a field, not the verb (report text is free)
    if words[0] == b"report" and n >= 6:
        return
    field = words[n]
    cut = at % (len(field) + 1)
    words[n] = field[:cut] + junk + field[cut:]
    mutated = b" ".join(words)
    req = _parse_or_refuse(mutated)
    if req is not None:
        _assert_safe(req)
        assert junk == b" " and b"report" == words[0], (mutated, req)  # only the free reply text may have one


def test_hostile_values_in_every_field_are_refused() -> None:
    """The fixed list the issue names, in each field of each request."""
    for line in VALID_LINES:
        words = line.split(b" ")
        for n in range(1, min(len(words), 6)):
            for junk in (b"{", b"}", b"*", b" x", b"\r", b"\x00", b"x" * 10_240, b"\xff\xfe"):
                bad = b" ".join([*words[:n], words[n] + junk, *words[n + 1:]])
                if junk == b" x" and (words[n] in (b"-", b"auto") or (words[0] == b"report" and n == 5)):
                    continue  # "- x": a well-formed field, then one too many or report's free text
                with pytest.raises(Refused):
                    parse(bad)


# --------------------------------------------------------------------------- netstrings
def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(data[at:at + size])
        at += size
    out.append(data[at:])
    return out


NETSTRING_NOISE = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.binary(max_size=40).map(encode), st.sampled_from(
        [b"0:,", b"1:", b":", b",", b"9999999:", b"100001:", b"-1:x,", b"+1:x,", b" 1:x,", b"1 :x,", b"01:x,",
         b"3:abc;", b"\x00", b"2:\r\n,"])), max_size=12).map(b"".join),
)


@pytest.mark.fuzz
@FUZZ
@given(NETSTRING_NOISE, st.lists(st.integers(0, 64), max_size=8))
def test_fuzz_netstring_reader_gives_payloads_or_netstring_error(data: bytes, sizes: list[int]) -> None:
    """Any bytes in any chunking: payloads that re-encode to exactly what was consumed,
    or NetstringError; a bounded buffer either way."""
    reader = NetstringReader()
    payloads: list[bytes] = []
    try:
        for chunk in _chunks(data, sizes):
            payloads += reader.feed(chunk)
    except NetstringError:
        return
    consumed = b"".join(encode(p) for p in payloads)
    assert data == consumed + bytes(reader.buf)
    assert reader.pending <= len(str(MAX_NETSTRING)) + 1 + MAX_NETSTRING + 1
    assert all(len(p) <= MAX_NETSTRING for p in payloads)


@pytest.mark.fuzz
@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_netstring_round_trip(payloads: list[bytes], sizes: list[int]) -> None:
    data = b"".join(encode(p) for p in payloads)
    reader = NetstringReader()
    got = [p for chunk in _chunks(data, sizes) for p in reader.feed(chunk)]
    assert got == payloads and reader.pending == 0


@pytest.mark.parametrize("data", [b"01:x,", b"00:,", b"007:abcdefg,"])
def test_netstring_lengths_with_leading_zeros_are_refused(data: bytes) -> None:
    with pytest.raises(NetstringError):
        NetstringReader().feed(data)
    assert NetstringReader().feed(b"0:,") == [b""]


@pytest.mark.parametrize("rcpt, ok", [
    ("u@yahoo.com", True), ("User+Tag@Yahoo.COM", True), ("u*x@yahoo.com", True), ("a@b@yahoo.com", True),
    ("u@y%ahoo.com", False), ("u@yahoo.com*", False), ("u@{yahoo.com}", False), ("u@[192.0.2.1]", False),
    ("u@", False), ("@yahoo.com", False), ("u v@yahoo.com", False), ("u\x00@yahoo.com", False),
    ("x" * 250 + "@yahoo.com", False),
])
def test_recipients_need_a_host_name_after_the_last_at(rcpt: str, ok: bool) -> None:
    if ok:
        assert valid_recipient(rcpt) == rcpt
    else:
        with pytest.raises(ValueError):
            valid_recipient(rcpt)
