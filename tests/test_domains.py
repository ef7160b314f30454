"""The Yahoo-managed domain set, the MX roll-up and ``governor domain``.

DNS is never contacted: every test uses ``mx_table`` or an injected resolver.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from governor.domains import (
    GROUPS,
    DomainDataError,
    DomainSet,
    InvalidDomain,
    domain_of,
    load_bundled,
    mx_matches,
    normalise_domain,
    parse_bundled,
)

ROOT = Path(__file__).resolve().parent.parent
YAHOO_MX = ("mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net")
AOL_MX = ("mx-aol.mail.gm0.yahoodns.net",)
ATT_OLD_MX = ("al-ip4-mx-vip1.prodigy.net", "al-ip4-mx-vip2.prodigy.net")
ATT_NEW_MX = ("mx-att.mail.am0.yahoodns.net",)


def _no_dns(domain: str) -> Sequence[str]:
    raise AssertionError(f"DNS must not be contacted in tests (asked for {domain})")


def make(**kw) -> DomainSet:
    """A DomainSet whose DNS path fails the test unless a resolver is given."""
    kw.setdefault("resolver", _no_dns)
    return DomainSet(**kw)


class Counter:
    """An injected resolver that answers from a dict and counts calls."""

    def __init__(self, answers: dict[str, Sequence[str]] | None = None, error: Exception | None = None) -> None:
        self.answers = answers or {}
        self.error = error
        self.calls: list[str] = []

    def __call__(self, domain: str) -> Sequence[str]:
        self.calls.append(domain)
        if self.error is not None:
            raise self.error
        return self.answers.get(domain, ())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- bundled data
def test_bundled_file_loads_and_covers_the_families() -> None:
    b = load_bundled()
    must = {
        "yahoo": ["yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de", "yahoo.es", "yahoo.it", "yahoo.ca",
                  "yahoo.com.au", "yahoo.com.br", "yahoo.com.mx", "yahoo.co.in", "yahoo.in", "ymail.com",
                  "rocketmail.com"],
        "aol": ["aol.com", "aim.com", "aol.co.uk", "aol.fr", "aol.de"],
        "verizon": ["verizon.net"],
        "att": ["att.net", "sbcglobal.net", "bellsouth.net", "pacbell.net", "swbell.net", "prodigy.net",
                "flash.net", "snet.net", "ameritech.net", "nvbell.net", "wans.net", "currently.com"],
    }
    for group, names in must.items():
        for name in names:
            assert b.entries[name].group == group, name
    assert all(e.group in GROUPS and e.source for e in b.entries.values())
    assert "yahoo.co.jp" not in b.entries
    assert "LY Corporation" in b.never["yahoo.co.jp"].reason
    assert len(b.sources) >= 5


def test_every_bundled_domain_is_canonical() -> None:
    for name in load_bundled().entries:
        assert normalise_domain(name) == name


def test_data_error_names_file_and_line() -> None:
    text = (
        "domains:\n"
        "  - {domain: yahoo.com, group: yahoo, source: x}\n"
        "  - {domain: aol.com, group: aoll, source: x}\n"
        "  - {domain: Yahoo.com, group: yahoo, source: x}\n"
        "  - {domain: yahoo.com, group: yahoo, source: x}\n"
        "  - {domain: a..b, group: yahoo, source: x}\n"
        "  - {domain: ymail.com, group: yahoo}\n"
        "never:\n"
        "  - {domain: yahoo.com, reason: r, source: s}\n"
    )
    with pytest.raises(DomainDataError) as info:
        parse_bundled(text)
    msg = str(info.value)
    assert "domains.yaml:3: domains[1].group: expected one of yahoo, aol, att, verizon, other" in msg
    assert 'domains.yaml:4: domains[2].domain: expected the canonical form "yahoo.com"' in msg
    assert "domains.yaml:5: domains[3].domain: duplicate domain yahoo.com (first listed at line 2)" in msg
    assert "domains.yaml:6:" in msg and "empty label" in msg
    assert "domains.yaml:7: domains[5].source: missing key" in msg
    assert "domains.yaml:9:" in msg and "both as a Yahoo domain" in msg


def test_data_error_from_a_file_and_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "domains.yaml"
    bad.write_text("domains:\n  - {domain: yahoo.com, group: yahoo, source: x\n")
    with pytest.raises(DomainDataError) as info:
        load_bundled(bad)
    assert str(info.value).startswith("domains.yaml:")
    assert "YAML syntax error" in str(info.value)


def test_unknown_key_gets_a_hint() -> None:
    with pytest.raises(DomainDataError) as info:
        parse_bundled("domains:\n  - {domain: yahoo.com, group: yahoo, sources: x}\n")
    assert 'domains.yaml:2: domains[0].sources: unknown key (did you mean "source"?)' in str(info.value)


# --------------------------------------------------------------------------- names and addresses
@pytest.mark.parametrize("raw, want", [
    ("yahoo.com", "yahoo.com"),
    ("Yahoo.COM", "yahoo.com"),
    ("yahoo.com.", "yahoo.com"),
    ("  AOL.com.  ", "aol.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example.", "xn--bcher-kva.example"),
])
def test_normalise(raw: str, want: str) -> None:
    assert normalise_domain(raw) == want


@pytest.mark.parametrize("raw, why", [
    ("a..b", "empty label"),
    (".yahoo.com", "empty label"),
    ("yahoo.com..", "empty label"),
    ("", "empty name"),
    ("-bad.com", "starts or ends with a hyphen"),
    ("under_score.com", "has the character '_'"),
    ("x" * 64 + ".com", "longer than 63"),
])
def test_invalid_names(raw: str, why: str) -> None:
    with pytest.raises(InvalidDomain) as info:
        normalise_domain(raw)
    assert why in str(info.value)
    assert str(info.value).startswith(f'invalid domain name "{raw}": ')


@pytest.mark.parametrize("address, want", [
    ("<User@Yahoo.COM>", "yahoo.com"),
    ("User@Yahoo.COM", "yahoo.com"),
    ("Jane Doe <jane@AOL.com.>", "aol.com"),
    ('"odd@local"@att.net', "att.net"),
    ("postmaster", None),
    ("<>", None),
    ("user@", None),
    ("user@a..b", None),
])
def test_domain_of(address: str, want: str | None) -> None:
    assert domain_of(address) == want
    assert DomainSet.domain_of(address) == want


# --------------------------------------------------------------------------- listed families
@pytest.mark.parametrize("name, group", [
    ("yahoo.com", "yahoo"), ("yahoo.co.uk", "yahoo"), ("ymail.com", "yahoo"), ("rocketmail.com", "yahoo"),
    ("aol.com", "aol"), ("aim.com", "aol"), ("verizon.net", "verizon"),
])
def test_listed_domains_are_governed_without_dns(name: str, group: str) -> None:
    ds = make()  # resolver fails the test if called
    v = ds.verdict(name)
    assert (v.governed, v.source, v.group, v.mx) == (True, "bundled", group, ())
    assert v.reason == f"listed in the bundled Yahoo domain set (group {group})"
    assert ds.is_governed(name)
    assert ds.is_governed(name.upper() + ".")


def test_subdomains_are_not_the_listed_domain() -> None:
    ds = make(dns=False)
    v = ds.verdict("mail.yahoo.com")
    assert not v.governed and v.source == "none"
    assert "not listed and no Yahoo MX" in v.reason


def test_never_list_beats_include_and_mx() -> None:
    ds = make(include=["yahoo.co.jp"], mx_table={"yahoo.co.jp": YAHOO_MX})
    v = ds.verdict("Yahoo.co.JP.")
    assert (v.governed, v.source, v.domain) == (False, "never", "yahoo.co.jp")
    assert v.reason.startswith("yahoo.co.jp is operated by LY Corporation")


def test_exclude_beats_include_and_never() -> None:
    ds = make(include=["yahoo.com"], exclude=["yahoo.com", "yahoo.co.jp"])
    v = ds.verdict("yahoo.com")
    assert (v.governed, v.source, v.reason) == (False, "config-exclude", "excluded by domains.exclude in config")
    assert ds.verdict("yahoo.co.jp").source == "config-exclude"
    assert not ds.is_governed("YAHOO.COM")


def test_include_governs_an_unlisted_domain() -> None:
    ds = make(include=["Example.ORG."])
    v = ds.verdict("example.org")
    assert (v.governed, v.source, v.reason) == (True, "config-include", "included by domains.include in config")


# --------------------------------------------------------------------------- AT&T family
def test_att_auto_with_yahoo_mx_is_governed() -> None:
    ds = make(mx_table={"att.net": ATT_NEW_MX})
    v = ds.verdict("att.net")
    assert (v.governed, v.source, v.group, v.mx) == (True, "mx-table", "att", ATT_NEW_MX)
    assert v.reason == "AT&T family: att_family=auto and its MX (mx-att.mail.am0.yahoodns.net) is under yahoodns.net"


def test_att_auto_with_prodigy_mx_is_not_governed() -> None:
    ds = make(mx_table={"sbcglobal.net": ATT_OLD_MX})
    v = ds.verdict("sbcglobal.net")
    assert (v.governed, v.source, v.group) == (False, "mx-table", "att")
    assert v.reason == ("AT&T family: att_family=auto and its MX (al-ip4-mx-vip1.prodigy.net) "
                        "is not under yahoodns.net")


def test_att_auto_without_dns_or_table_says_why() -> None:
    counter = Counter({"att.net": ATT_NEW_MX})
    ds = DomainSet(dns=False, resolver=counter)
    v = ds.verdict("att.net")
    assert not v.governed and v.source == "bundled"
    assert "DNS is off" in v.reason and "att_family: on" in v.reason
    assert counter.calls == []


def test_att_auto_by_dns() -> None:
    counter = Counter({"bellsouth.net": ATT_NEW_MX, "pacbell.net": ATT_OLD_MX})
    ds = DomainSet(resolver=counter)
    assert ds.is_governed("bellsouth.net")
    assert ds.verdict("bellsouth.net").source == "dns"
    assert not ds.is_governed("pacbell.net")


def test_att_on_and_off() -> None:
    on = make(att_family="on", dns=False)
    v = on.verdict("att.net")
    assert (v.governed, v.source, v.group) == (True, "bundled", "att")
    off = make(att_family="off", mx_table={"att.net": ATT_NEW_MX})
    v = off.verdict("att.net")
    assert (v.governed, v.group) == (False, "att")
    assert "att_family=off" in v.reason
    # include is the operator's override of att_family=off
    assert make(att_family="off", include=["att.net"]).is_governed("att.net")


def test_att_family_value_is_checked() -> None:
    with pytest.raises(ValueError, match="att_family"):
        DomainSet(att_family="maybe")


# --------------------------------------------------------------------------- MX roll-up
def test_mx_rollup_governs_an_unlisted_domain() -> None:
    ds = make(mx_table={"example.net": ("mx.example.net.", "MX-AOL.mail.gm0.YahooDNS.net.")})
    v = ds.verdict("example.net")
    assert (v.governed, v.source, v.group) == (True, "mx-table", None)
    assert v.reason == "MX mx-aol.mail.gm0.yahoodns.net ends in yahoodns.net"
    assert v.mx == ("mx.example.net", "mx-aol.mail.gm0.yahoodns.net")


def test_mx_rollup_matches_on_a_label_boundary() -> None:
    assert mx_matches("mta5.am0.yahoodns.net", "yahoodns.net")
    assert mx_matches("yahoodns.net", "yahoodns.net")
    assert not mx_matches("mx.evilyahoodns.net", "yahoodns.net")
    assert not mx_matches("yahoodns.net.evil.com", "yahoodns.net")
    ds = make(mx_table={"evil.com": ("mx.evilyahoodns.net",), "tricky.com": ("yahoodns.net.evil.com",)})
    assert not ds.is_governed("evil.com")
    assert not ds.is_governed("tricky.com")
    assert "no Yahoo MX (MX mx.evilyahoodns.net)" in ds.verdict("evil.com").reason


def test_custom_suffixes_are_normalised() -> None:
    ds = make(mx_suffixes=[".Example-MX.test."], mx_table={"a.org": ("in1.example-mx.test",)})
    assert ds.verdict("a.org").reason == "MX in1.example-mx.test ends in example-mx.test"


def test_unconfirmed_entries_are_decided_by_mx() -> None:
    ds = make(mx_table={"yahoo.com.sg": ("mx-apac.mail.gm0.yahoodns.net",), "cox.net": ("mx.cox.net",)})
    v = ds.verdict("yahoo.com.sg")
    assert (v.governed, v.group, v.source) == (True, "yahoo", "mx-table")
    assert "unconfirmed" in v.reason
    v = ds.verdict("cox.net")
    assert (v.governed, v.group) == (False, "other")
    no_dns = make(dns=False)
    assert not no_dns.is_governed("yahoo.com.sg")
    assert "DNS is off" in no_dns.verdict("yahoo.com.sg").reason


def test_no_mx_and_invalid_names_on_the_hot_path() -> None:
    ds = make(mx_table={"nomx.org": ()})
    v = ds.verdict("nomx.org")
    assert not v.governed and v.reason == "not listed and no Yahoo MX (no MX hosts)"
    assert ds.is_governed("a..b") is False
    with pytest.raises(InvalidDomain):
        ds.verdict("a..b")


# --------------------------------------------------------------------------- DNS path and cache
def test_dns_off_makes_no_resolver_call() -> None:
    counter = Counter({"example.org": YAHOO_MX})
    ds = DomainSet(dns=False, resolver=counter)
    assert not ds.is_governed("example.org")
    assert ds.mx_hosts("example.org") == ()
    assert ds.verdict("example.org").source == "none"
    assert counter.calls == []


def test_listed_domains_never_reach_the_resolver() -> None:
    counter = Counter()
    ds = DomainSet(resolver=counter, att_family="on", include=["x.org"], exclude=["y.org"])
    for name in ("yahoo.com", "aol.com", "att.net", "yahoo.co.jp", "x.org", "y.org", "Verizon.NET."):
        ds.is_governed(name)
        ds.verdict(name)
    assert counter.calls == []


def test_mx_table_comes_before_dns() -> None:
    counter = Counter({"example.org": ("mx.example.org",)})
    ds = DomainSet(resolver=counter, mx_table={"example.org": YAHOO_MX})
    assert ds.mx_hosts("EXAMPLE.org.") == YAHOO_MX
    assert counter.calls == []


def test_cache_ttl() -> None:
    counter = Counter({"example.org": YAHOO_MX})
    clock = Clock()
    ds = DomainSet(resolver=counter, cache_ttl=100.0, clock=clock)
    assert ds.is_governed("example.org")
    assert ds.is_governed("Example.org.")
    assert ds.verdict("example.org").mx == YAHOO_MX
    assert counter.calls == ["example.org"]
    clock.now += 99.0
    ds.is_governed("example.org")
    assert len(counter.calls) == 1
    counter.answers["example.org"] = ("mx.elsewhere.example",)
    clock.now += 2.0  # past the TTL: asked again, and the new answer counts
    assert not ds.is_governed("example.org")
    assert len(counter.calls) == 2


def test_zero_ttl_disables_the_cache() -> None:
    counter = Counter({"example.org": YAHOO_MX})
    ds = DomainSet(resolver=counter, cache_ttl=0)
    ds.is_governed("example.org")
    ds.is_governed("example.org")
    assert len(counter.calls) == 2


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("governor.domains.MAX_CACHE_ENTRIES", 2)
    counter = Counter()
    ds = DomainSet(resolver=counter)
    for name in ("a.org", "b.org", "c.org", "c.org", "a.org"):
        ds.is_governed(name)
    assert counter.calls == ["a.org", "b.org", "c.org", "a.org"]  # a.org was evicted first


def test_resolver_errors_are_not_governed_and_retried_sooner() -> None:
    counter = Counter(error=TimeoutError("no answer within 2s"))
    clock = Clock()
    ds = DomainSet(resolver=counter, cache_ttl=3600.0, clock=clock)
    v = ds.verdict("example.org")
    assert not v.governed and v.source == "dns"
    assert "MX lookup failed: no answer within 2s" in v.reason
    clock.now += 30.0
    ds.is_governed("example.org")
    assert len(counter.calls) == 1
    clock.now += 31.0  # past ERROR_TTL (60 s), far before cache_ttl
    counter.error = None
    counter.answers["example.org"] = YAHOO_MX
    assert ds.is_governed("example.org")
    assert len(counter.calls) == 2


def test_from_config_duck_typed() -> None:
    class Cfg:
        include = ("example.org",)
        exclude = ("aol.com",)
        att_family = "on"
        mx_suffixes = ("yahoodns.net",)
        mx_table = {"other.org": YAHOO_MX}
        dns = False
        dns_timeout = 1.0
        cache_ttl = 10.0

    ds = DomainSet.from_config(Cfg())
    assert ds.is_governed("example.org") and not ds.is_governed("aol.com")
    assert ds.is_governed("att.net") and ds.is_governed("other.org")

    class Whole:
        domains = Cfg()

    assert DomainSet.from_config(Whole()).is_governed("att.net")


def test_from_real_domains_config() -> None:
    config = pytest.importorskip("governor.config")
    ds = DomainSet.from_config(config.DomainsConfig(dns=False, mx_table={"x.org": YAHOO_MX}))
    assert ds.is_governed("x.org") and ds.is_governed("yahoo.com") and not ds.is_governed("att.net")


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_main() -> click.Group:
    """``governor``'s click group (with ``domain`` registered)."""
    from governor.cli import main

    return main


def _config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "governor.yaml"
    path.write_text(body)
    return str(path)


DOMAINS_YAML = """\
domains:
  dns: false
  exclude: [aol.com]
  mx_table:
    att.net: [mx-att.mail.am0.yahoodns.net]
    example.org: [mx.example.org]
"""


def test_cli_text(cli_main: click.Group, tmp_path: Path) -> None:
    cfg = _config(tmp_path, DOMAINS_YAML)
    result = CliRunner().invoke(cli_main, ["-c", cfg, "domain", "Yahoo.COM.", "att.net", "aol.com",
                                           "example.org", "yahoo.co.jp", "<someone@YMAIL.com>"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "yahoo.com: governed — listed in the bundled Yahoo domain set (group yahoo)"
    assert lines[1] == ("att.net: governed — AT&T family: att_family=auto and its MX "
                        "(mx-att.mail.am0.yahoodns.net) is under yahoodns.net")
    assert lines[2] == "aol.com: not governed — excluded by domains.exclude in config"
    assert lines[3] == "example.org: not governed — not listed and no Yahoo MX (MX mx.example.org)"
    assert lines[4].startswith("yahoo.co.jp: not governed — yahoo.co.jp is operated by LY Corporation")
    assert lines[5].startswith("ymail.com: governed")
    assert len(lines) == 6


def test_cli_json_lines(cli_main: click.Group, tmp_path: Path) -> None:
    cfg = _config(tmp_path, DOMAINS_YAML)
    result = CliRunner().invoke(cli_main, ["-c", cfg, "domain", "--json", "att.net", "verizon.net"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert rows[0] == {"domain": "att.net", "governed": True, "source": "mx-table", "group": "att",
                       "mx": ["mx-att.mail.am0.yahoodns.net"],
                       "reason": "AT&T family: att_family=auto and its MX (mx-att.mail.am0.yahoodns.net) "
                                 "is under yahoodns.net"}
    assert rows[1]["domain"] == "verizon.net" and rows[1]["governed"] is True
    assert set(rows[1]) == {"domain", "governed", "reason", "source", "group", "mx"}


def test_cli_invalid_name_exits_2(cli_main: click.Group, tmp_path: Path) -> None:
    cfg = _config(tmp_path, DOMAINS_YAML)
    result = CliRunner().invoke(cli_main, ["-c", cfg, "domain", "yahoo.com", "a..b"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip() == 'governor: invalid domain name "a..b": empty label'
