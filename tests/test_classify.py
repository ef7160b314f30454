"""The Yahoo reply classifier against the real-reply corpus, MTA wrappers and bad rule tables."""

from __future__ import annotations

import csv
import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from governor.classify import (
    CLASSES,
    SCOPES,
    Classification,
    Classifier,
    Rule,
    RuleError,
    classify,
    is_bracket_code,
    load_rules,
    required_literals,
)

CORPUS = Path(__file__).parent / "data" / "yahoo_replies.tsv"


def _load_corpus() -> list[dict[str, str]]:
    with CORPUS.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = _load_corpus()
BY_ID = {row["id"]: row for row in ROWS}


def _has_bracket(row: dict[str, str]) -> bool:
    return f"[{row['code']}]" in row["smtp_reply"]


BRACKET_ROWS = [r for r in ROWS if _has_bracket(r)]
LABEL_ROWS = [r for r in ROWS if r["class"] and not _has_bracket(r)]
UNCLASSED_ROWS = [r for r in ROWS if not r["class"]]
#: every Yahoo bracket code we know: the corpus's plus those from the seeds
KNOWN_BRACKET_CODES = {r["code"] for r in BRACKET_ROWS} | {"TS06", "TS07"}

REQUIRED_CODES = {
    "TSS04", "TSS05", "IPTS04", "IPTS05", "TS01", "TS02", "TS03", "TS06", "TS07", "TSS06", "TSS07",
    "TSS09", "TSS11", "BL21", "BL23", "GL01", "PH01", "VS1-IP", "VS1-MF", "VS98-IP0", "VS99-IP1",
    "DEFER_4.16.50", "DEFER_160", "DEFER_170", "DD_USER_UNKNOWN", "DD_NOT_VALID_RCPT",
    "DD_NO_LONGER_VALID", "DD_OVER_QUOTA", "DD_ACTION_ABORTED", "POLICY_5.7.9", "AUTH_5.7.9_UNAUTH",
    "RFC5321_DOMAIN", "RESOURCES_4.16.1", "RESOURCES_UNAVAILABLE", "MAX_MSG_PER_CONN",
    "RECEIVING_TOO_QUICKLY", "SERVICE_NOT_AVAILABLE", "INTERNAL_4.3.2", "MAIL_FROM_NOT_ALLOWED",
    "RFC_HEADERS_291", "MSG_NOT_ALLOWED_299", "MAILBOX_NOT_FOUND_552", "DISABLED_554_30",
    "ATT_DNSBL_RBL", "ATT_USER_UNKNOWN",
}

_IPV4_LITERAL = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def _ids(rows: list[dict[str, str]]) -> list[str]:
    return [f"{r['id']}-{r['code']}" for r in rows]


def _expected_ip(reply: str) -> str | None:
    """The first real literal IPv4 in the reply.

    Placeholders (0.0.0.0, 287.x) do not count, nor does Yahoo's "4.16.55.1" status tail.
    """
    for literal in _IPV4_LITERAL.findall(reply):
        if literal.startswith("4.16."):
            continue
        try:
            addr = ipaddress.ip_address(literal)
        except ValueError:
            continue
        if not addr.is_unspecified:
            return str(addr)
    return None


# --- the corpus -----------------------------------------------------------------


def test_corpus_is_the_one_described() -> None:
    assert len(ROWS) >= 90  # 94 rows today (ids Y002..Y134 with gaps)
    assert {r["class"] for r in ROWS} - {""} <= set(CLASSES)
    assert {r["scope"] for r in ROWS} - {""} <= set(SCOPES)


@pytest.mark.parametrize("row", BRACKET_ROWS, ids=_ids(BRACKET_ROWS))
def test_bracket_rows_get_their_code(row: dict[str, str]) -> None:
    result = classify(row["smtp_reply"])
    assert result.code == row["code"]
    assert is_bracket_code(result.code)
    assert result.is_yahoo
    if row["class"]:
        assert (result.cls, result.scope) == (row["class"], row["scope"])


@pytest.mark.parametrize("row", LABEL_ROWS, ids=_ids(LABEL_ROWS))
def test_labelled_rows_get_label_class_and_scope(row: dict[str, str]) -> None:
    result = classify(row["smtp_reply"])
    assert (result.code, result.cls, result.scope) == (row["code"], row["class"], row["scope"])
    assert not is_bracket_code(result.code)


@pytest.mark.parametrize("row", UNCLASSED_ROWS, ids=_ids(UNCLASSED_ROWS))
def test_unclassed_rows_never_get_a_bracket_code(row: dict[str, str]) -> None:
    result = classify(row["smtp_reply"])
    assert not is_bracket_code(result.code)
    assert result.code not in KNOWN_BRACKET_CODES
    if row["code"] == "NOT_YAHOO":
        assert result.code is None
        assert result.cls is None and result.scope is None
        assert not result.is_yahoo


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_permanent_ip_and_text(row: dict[str, str]) -> None:
    result = classify(row["smtp_reply"])
    if row["permanent"]:
        assert result.permanent is (row["permanent"] == "yes")
    assert result.ip == _expected_ip(row["smtp_reply"])
    assert result.text == row["smtp_reply"].strip()
    assert result.meaning
    assert result.stage is None  # bare replies carry no MTA wrapper


@pytest.mark.parametrize(
    ("row_id", "ip"),
    [
        ("Y025", "78.225.183.108"),
        ("Y003", "50.57.111.177"),
        ("Y006", "72.5.230.103"),
        ("Y053", "11.22.33.44"),
        ("Y108", "1.2.3.4"),  # AT&T "521< 1.2.3.4 >"
        ("Y020", None),  # 0.0.0.0 placeholder
        ("Y024", None),  # 287.190.241.178 is not an address
        ("Y027", None),  # *********
        ("Y028", None),  # xxx.xxx.xxx.xxx
        ("Y034", None),  # 23.102.x.x
        ("Y038", None),  # a.b.c.d
        ("Y049", None),  # the word IP
        ("Y112", None),  # relay=[x.xx.xx.xx]
        ("Y116", None),  # <0.0.0.0>
    ],
)
def test_ip_extraction(row_id: str, ip: str | None) -> None:
    assert classify(BY_ID[row_id]["smtp_reply"]).ip == ip


@pytest.mark.parametrize(
    ("row_id", "smtp_code", "enhanced"),
    [
        ("Y020", 421, "4.7.0"),
        ("Y002", 421, "4.16.55"),
        ("Y006", None, "4.7.0"),  # reported without the 421
        ("Y040", 421, None),
        ("Y053", 553, "5.7.1"),  # enhanced code in the middle, before [BL23]
        ("Y056", 451, "4.1.8"),  # "(#4.1.8)"
        ("Y064", 451, "4.16.1"),  # "[#4.16.1]"
        ("Y095", 554, None),  # "554 30 Sorry" is not an enhanced code
        ("Y126", 421, "4.7.28"),
    ],
)
def test_smtp_and_enhanced_codes(row_id: str, smtp_code: int | None, enhanced: str | None) -> None:
    result = classify(BY_ID[row_id]["smtp_reply"])
    assert (result.smtp_code, result.enhanced) == (smtp_code, enhanced)


@pytest.mark.parametrize(
    ("row_id", "host"),
    [
        ("Y081", "mta123.mail.mud.yahoo.com"),
        ("Y088", "atlas315.free.mail.ne1.yahoo.com"),
        ("Y090", "example.yahoo.com"),
        ("Y123", "mtaproxy121.aol.mail.ne1.yahoo.com"),
        ("Y025", None),
        ("Y070", None),  # the help URL is not an MX host
    ],
)
def test_host_from_the_reply_itself(row_id: str, host: str | None) -> None:
    assert classify(BY_ID[row_id]["smtp_reply"]).host == host


def test_ts03_is_a_block_though_it_is_a_4xx() -> None:
    result = classify(BY_ID["Y008"]["smtp_reply"])
    assert (result.code, result.cls, result.permanent, result.smtp_code) == ("TS03", "block", False, 421)


def test_vs98_is_permanent_though_it_says_deferred() -> None:
    result = classify(BY_ID["Y120"]["smtp_reply"])
    assert (result.code, result.cls, result.permanent) == ("VS98-IP0", "block", True)


def test_ipts04_without_any_smtp_code() -> None:
    result = classify("[IPTS04] Messages from 192.0.2.7 temporarily deferred due to unexpected volume or user complaints")
    assert (result.code, result.cls, result.scope) == ("IPTS04", "rate", "ip")
    assert (result.smtp_code, result.enhanced, result.permanent) == (None, None, False)
    assert result.ip == "192.0.2.7"


def test_seed_codes_not_in_corpus() -> None:
    assert classify("421 [TS06] Service unavailable").code == "TS06"
    ts07 = classify("550 5.7.1 [TS07] Message rejected")
    assert (ts07.code, ts07.cls, ts07.scope, ts07.permanent) == ("TS07", "content", "message", True)


def test_unlisted_yahoo_codes_fall_back_without_a_bracket_code() -> None:
    deferred = classify("421 4.7.0 [TSS12] Messages from 192.0.2.1 temporarily deferred due to user complaints")
    assert (deferred.code, deferred.cls, deferred.scope) == ("DEFERRED_OTHER", "rate", "ip")
    blocked = classify("553 5.7.2 [TSS13] All messages from 192.0.2.1 will be permanently deferred")
    assert (blocked.code, blocked.cls, blocked.permanent) == ("BLOCKED_OTHER", "block", True)


@pytest.mark.parametrize(
    "reply",
    [
        "421 [HCM1] Your mail from 192.0.2.1 was deferred.",
        "451 [BS02] Temporary server error. Please try again later.",
        "421 [TSS04X] Messages look alike",  # not a token we know
        "421-4.7.28 [192.0.2.1 15] Our system has detected an unusual rate of unsolicited mail - gsmtp",
        "421 RP-001 (BAY004-MC1F2) Unfortunately, some messages from 192.0.2.1 weren't sent.",
        "451 4.7.651 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
        "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. (S3140) [x.prod.outlook.com]",
    ],
)
def test_other_providers_never_get_a_yahoo_code(reply: str) -> None:
    assert classify(reply).code is None


# --- MTA wrappers -------------------------------------------------------------------

TSS04 = "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
DD = "554 delivery error: dd This user doesn't have a yahoo.com account (nobody@yahoo.com) [0] - mta1061.mail.ne1.yahoo.com"
TS03 = "421 4.7.1 [TS03] All messages from {ip} will be permanently deferred; Retrying will NOT succeed. See https://help.yahoo.com/kb/postmaster/SLN3436.html"

WRAPPERS = [
    # (template, host, stage)
    ("host mta7.am0.yahoodns.net[67.195.204.72] said: {r} (in reply to MAIL FROM command)", "mta7.am0.yahoodns.net", "mail"),
    ("host mta5.am0.yahoodns.net[2001:4998:44:3507::8000] said: {r} (in reply to RCPT TO command)", "mta5.am0.yahoodns.net", "rcpt"),
    ("host mx-aol.mail.gm0.yahoodns.net[67.195.204.79] said: {r} (in reply to end of DATA command)", "mx-aol.mail.gm0.yahoodns.net", "data"),
    ("host mta6.am0.yahoodns.net[98.136.96.91] refused to talk to me: {r}", "mta6.am0.yahoodns.net", "connect"),
    ("4.7.0 host 127.0.0.1[127.0.0.1] said: {r} (in reply to MAIL FROM command)", "127.0.0.1", "mail"),
    ("status=deferred (host mta7.am0.yahoodns.net[67.195.204.72] said: {r} (in reply to MAIL FROM command))", "mta7.am0.yahoodns.net", "mail"),
    ("SMTP error from remote mail server after pipelined MAIL FROM:<bounce@example.org> SIZE=2353: {r}", None, "mail"),
    ("SMTP error from remote mail server after pipelined MAIL FROM:<>: {r}", None, "mail"),
    ("SMTP error from remote mail server after initial connection: {r}", None, "connect"),
    ("SMTP error from remote mail server after initial connection:\nhost e.mx.mail.yahoo.com [216.39.53.1]: {r}", "e.mx.mail.yahoo.com", "connect"),
    ("SMTP error from remote mail server after RCPT TO:<user@yahoo.com>: host mta5.am0.yahoodns.net [67.195.228.106]: {r}", "mta5.am0.yahoodns.net", "rcpt"),
    ("SMTP error from remote mail server after end of data: {r}", None, "data"),
    ("H=mta7.am0.yahoodns.net [67.195.204.72]: SMTP error from remote mail server after pipelined MAIL FROM:<a@b.example> SIZE=99: {r}", "mta7.am0.yahoodns.net", "mail"),
    ("host mta7.am0.yahoodns.net [2001:4998:c:1023::4]\n    SMTP error from remote mail server after RCPT TO:<user@yahoo.com>:\n    {r}", "mta7.am0.yahoodns.net", "rcpt"),
]


@pytest.mark.parametrize(("template", "host", "stage"), WRAPPERS, ids=[w[0][:40] for w in WRAPPERS])
@pytest.mark.parametrize("ip", ["203.0.113.10", "2001:db8::1"])
def test_wrappers_keep_code_ip_and_give_stage_and_host(template: str, host: str | None, stage: str, ip: str) -> None:
    for bare, code in ((TSS04.format(ip=ip), "TSS04"), (TS03.format(ip=ip), "TS03")):
        result = classify(template.format(r=bare))
        assert (result.code, result.ip, result.host, result.stage) == (code, ip, host, stage)
        assert result.text == bare
    dd = classify(template.format(r=DD))
    assert (dd.code, dd.cls, dd.stage) == ("DD_USER_UNKNOWN", "recipient", stage)
    assert dd.host == (host or "mta1061.mail.ne1.yahoo.com")


def test_ipv6_forms_are_normalised() -> None:
    assert classify(TSS04.format(ip="2001:DB8:0:0::1")).ip == "2001:db8::1"
    assert classify(TSS04.format(ip="::ffff:192.0.2.9")).ip == "192.0.2.9"
    assert classify(TSS04.format(ip="01.2.3.4")).ip is None  # ipaddress rejects leading zeros


def test_multiline_reply_with_continuation_lines() -> None:
    reply = (
        "421-4.7.0 [TSS04] Messages from 192.0.2.3 temporarily\n"
        "421-4.7.0 deferred due to unexpected volume or user complaints\n"
        "421 4.7.0 - 4.16.55.1"
    )
    result = classify(reply)
    assert (result.code, result.ip, result.smtp_code, result.enhanced) == ("TSS04", "192.0.2.3", 421, "4.7.0")
    assert result.text == reply.replace("\n", " | ")
    # the same reply as Postfix logs it: lines joined by spaces, prefixes kept
    postfix = classify("host mta7.am0.yahoodns.net[67.195.204.72] said: " + reply.replace("\n", " ")
                       + " (in reply to MAIL FROM command)")
    assert (postfix.code, postfix.stage) == ("TSS04", "mail")
    phrase = classify("421-4.7.0 [TSS12] Messages from 192.0.2.3 temporarily\r\n421 4.7.0 deferred due to user complaints")
    assert phrase.code == "DEFERRED_OTHER"


def test_seed_wrapped_ts02_reply() -> None:
    reply = (
        "421 4.16.56 [TS02] Messages from 203.0.113.42 temporarily deferred\n"
        "   due to excessive user complaints - see\n"
        "   https://postmaster.yahooinc.com/smtp-error-codes for more information.\n"
        "   mta1234.mail.yahoo.com"
    )
    result = classify(reply)
    assert (result.code, result.ip, result.host, result.enhanced) == ("TS02", "203.0.113.42", "mta1234.mail.yahoo.com", "4.16.56")


# --- odd input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    ["", "   ", "\n\n", "|", " | | ", "421", "421-", "[", "[TSS04", "\x00\udcff\ufffd", "host [", "x" * 1_000_000,
     "SMTP error from remote mail server after ", "(in reply to ", "4.7.0", "#5.5.5", "< 1.2.3.4", "from ::"],
)
def test_odd_input_never_raises(reply: str) -> None:
    result = classify(reply)
    assert isinstance(result, Classification)
    assert not is_bracket_code(result.code)


def test_bytes_are_decoded() -> None:
    result = classify(TSS04.format(ip="192.0.2.1").encode() + b"\xff")  # type: ignore[arg-type]
    assert result.code == "TSS04"


def test_huge_reply_with_code_up_front() -> None:
    result = classify(TSS04.format(ip="192.0.2.1") + " filler" * 100_000)
    assert result.code == "TSS04"


def test_success_and_frozen() -> None:
    ok = classify("250 ok dirdel")
    assert ok.success and not ok.is_yahoo and not ok.permanent
    assert not classify(TSS04.format(ip="192.0.2.1")).success
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.code = "TSS04"  # type: ignore[misc]


# --- the shipped table ---------------------------------------------------------------


def test_default_table_covers_the_required_codes() -> None:
    rules = Classifier.default().rules
    assert REQUIRED_CODES <= {r.code for r in rules}
    for rule in rules:
        assert rule.cls in CLASSES and rule.scope in SCOPES and rule.meaning and "\n" not in rule.meaning
        if is_bracket_code(rule.code):
            assert f"\\[{rule.code}\\]" in rule.match  # bracket rules key on the token itself
    assert Classifier.default() is Classifier.default()


def test_default_table_matches_every_corpus_code() -> None:
    """Every labelled corpus code has a rule, and no rule is dead (each matches something)."""
    labelled = {r["code"] for r in ROWS if r["class"]}
    codes = {r.code for r in Classifier.default().rules}
    assert labelled <= codes


# --- rule tables ------------------------------------------------------------------------

GOOD_RULE = """  - code: {code}
    class: rate
    scope: ip
    permanent: null
    match: '{match}'
    meaning: test rule
"""


def _table(*rules: str) -> str:
    return "# header\nrules:\n" + "".join(rules)


def test_load_rules_from_text_and_file(tmp_path: Path) -> None:
    text = _table(GOOD_RULE.format(code="TSS04", match=r"\[TSS04\]"))
    assert [r.code for r in load_rules(text)] == ["TSS04"]
    path = tmp_path / "replies.yaml"
    path.write_text(text)
    assert [r.code for r in load_rules(path)] == ["TSS04"]
    assert [r.code for r in load_rules(str(path))] == ["TSS04"]
    assert [r.code for r in Classifier.from_file(path).rules] == ["TSS04"]
    assert load_rules("rules: []") == []
    top_list = "- code: X_1\n  class: rate\n  scope: ip\n  permanent: false\n  match: 'x1'\n  meaning: m\n"
    assert load_rules(top_list)[0].permanent is False


def _error(text: str) -> str:
    with pytest.raises(RuleError) as info:
        load_rules(text)
    return str(info.value)


def _rule_yaml(**overrides: str) -> str:
    """One rule as YAML (6 lines), fields in RULE_KEYS order, values as YAML source."""
    fields = {"code": "TSS05", "class": "rate", "scope": "ip", "permanent": "null",
              "match": r"'\[TSS05\]'", "meaning": "test rule", **overrides}
    lines = [f"{k}: {v}" for k, v in fields.items()]
    return "  - " + lines[0] + "\n" + "".join(f"    {line}\n" for line in lines[1:])


@pytest.mark.parametrize(
    ("field", "value", "line", "expected"),
    [
        # table: lines 1-2 header, first rule lines 3-8, second rule lines 9-14
        ("match", "'[TSS05'", 13, "replies.yaml:13: rules[1].match: bad regex"),
        ("match", "'a?'", 13, "replies.yaml:13: rules[1].match: regex matches the empty string"),
        ("match", "''", 13, "replies.yaml:13: rules[1].match: must be a non-empty string"),
        ("class", "rates", 10, "replies.yaml:10: rules[1].class: unknown class 'rates'"),
        ("scope", "mx", 11, "replies.yaml:11: rules[1].scope: unknown scope 'mx'"),
        ("permanent", "maybe", 12, "replies.yaml:12: rules[1].permanent: must be true, false or null"),
        ("code", "'TS 01'", 9, "replies.yaml:9: rules[1].code: 'TS 01' is not a code"),
        ("code", "160", 9, "replies.yaml:9: rules[1].code: must be a non-empty string"),
        ("meaning", "''", 14, "replies.yaml:14: rules[1].meaning: must be a non-empty string"),
    ],
)
def test_bad_values_report_file_line_and_key(field: str, value: str, line: int, expected: str) -> None:
    message = _error(_table(GOOD_RULE.format(code="TSS04", match=r"\[TSS04\]"), _rule_yaml(**{field: value})))
    assert message.startswith(expected), message


def test_missing_unknown_and_duplicate_keys() -> None:
    first = GOOD_RULE.format(code="TSS04", match=r"\[TSS04\]")
    missing = GOOD_RULE.format(code="TSS05", match="x").replace("    match: 'x'\n", "")
    assert _error(_table(first, missing)).startswith("replies.yaml:9: rules[1].match: missing")
    typo = GOOD_RULE.format(code="TSS05", match="x").replace("    match:", "    mtach:")
    assert _error(_table(first, typo)).startswith("replies.yaml:13: rules[1].mtach: unknown key")
    dup = GOOD_RULE.format(code="TSS05", match="x").replace("    meaning:", "    scope: ip\n    meaning:")
    assert _error(_table(first, dup)).startswith("replies.yaml:14: rules[1].scope: duplicate key")
    multi = GOOD_RULE.format(code="TSS05", match="x").replace("meaning: test rule", 'meaning: "two\\nlines"')
    assert _error(_table(first, multi)).startswith("replies.yaml:14: rules[1].meaning: must be one line")


def test_structural_errors() -> None:
    assert _error("rules:\n  - just a string\n").startswith("replies.yaml:2: rules[0]: expected a mapping")
    assert _error("rule:\n  - {}\n").startswith("replies.yaml:1: rule: unknown key")
    assert _error("rules: 3\n").startswith("replies.yaml:1: rules: expected a list")
    assert _error("# nothing\n").startswith("replies.yaml:1: rules: missing")
    assert _error("rules:\n  - code: [unclosed\n").startswith("replies.yaml:3: YAML syntax error")
    assert _error(_table(GOOD_RULE.format(code="A1", match="x"), "  - code: 'x\n")).startswith("replies.yaml:")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "replies.yaml"
    path.write_text(_table(GOOD_RULE.format(code="TSS04", match=r"\[TSS04\]").replace("scope: ip", "scope: planet")))
    with pytest.raises(RuleError, match=rf"^{re.escape(str(path))}:5: rules\[0\].scope: unknown scope"):
        Classifier.from_file(path)
    with pytest.raises(RuleError, match=r"missing\.yaml:1: cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_rule_objects_validate_too() -> None:
    with pytest.raises(RuleError):
        Rule("TSS04", "rate", "ip", None, "[", "m")
    with pytest.raises(RuleError):
        Rule("TSS04", "nope", "ip", None, "x", "m")


# --- semantics of a custom table -----------------------------------------------------------


def _rule(code: str, match: str, cls: str = "rate", permanent: bool | None = None) -> Rule:
    return Rule(code, cls, "ip", permanent, match, f"meaning of {code}")


def test_first_match_wins_across_bracket_and_label_rules() -> None:
    clf = Classifier([_rule("LABEL_FIRST", "temporarily deferred"), _rule("TSS04", r"\[TSS04\]")])
    assert clf.classify(TSS04.format(ip="192.0.2.1")).code == "LABEL_FIRST"
    clf = Classifier([_rule("TSS04", r"\[TSS04\]"), _rule("LABEL_FIRST", "temporarily deferred")])
    assert clf.classify(TSS04.format(ip="192.0.2.1")).code == "TSS04"


def test_bracket_code_needs_its_token_whatever_the_regex_says() -> None:
    clf = Classifier([_rule("TSS04", "unexpected volume"), _rule("TS01", r"\[TS01\]|Messages from")])
    assert clf.classify(TSS04.format(ip="192.0.2.1")).code == "TSS04"
    assert clf.classify("421 Messages from 192.0.2.1 deferred due to unexpected volume").code is None
    assert clf.classify("421 [HCM1] unexpected volume").code is None


def test_permanent_override_and_derivation() -> None:
    clf = Classifier([_rule("FORCED", "forced", permanent=True), _rule("DERIVED", "derived")])
    assert clf.classify("421 forced").permanent is True
    assert clf.classify("421 derived").permanent is False
    assert clf.classify("554 derived").permanent is True
    assert clf.classify("5.7.1 derived").permanent is True
    assert Classifier([]).classify("421 anything").code is None


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"\[TSS04\]", ("[tss04]",)),
        (r"delivery error: dd\b.{0,300}?\bover quota", ("delivery error: dd",)),
        (r"(?:foo bar|baz qux) x", ("foo bar", "baz qux")),
        (r"abc(?:def)?ghi", ("abc",)),
        (r"(?:ab|cdef)", None),  # "ab" is too short to filter
        (r"a?", None),
        (r"\bMessages from \S{1,64} temporarily", ("messages from ",)),
        ("Stra\u00dfe dead", ("e dead",)),  # non-ASCII literals are never used as a guard
    ],
)
def test_required_literals(pattern: str, expected: tuple[str, ...] | None) -> None:
    assert required_literals(pattern) == expected


def test_host_words_inside_a_reply_are_not_a_wrapper() -> None:
    reply = "554 5.7.1 Service unavailable; Client host mail.example[192.0.2.1] blocked using zen.spamhaus.org"
    result = classify(reply)
    assert (result.text, result.host, result.stage, result.code) == (reply, None, None, None)
