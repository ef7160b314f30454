"""Property tests for the reply classifier (hypothesis).

A few hundred examples per property; the ``fuzz`` tests use the ``governor-fuzz``
profile (tests/conftest.py): 10^3 examples in every run, 10^5 with ``-m fuzz``.
"""

from __future__ import annotations

import csv
import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governor.classify import Classification, Classifier, _flatten, _unwrap, classify, is_bracket_code

CORPUS = Path(__file__).parent / "data" / "yahoo_replies.tsv"


def _load_corpus() -> list[dict[str, str]]:
    with CORPUS.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = _load_corpus()
YAHOO_REPLIES = [r["smtp_reply"] for r in ROWS if r["class"]]
ALL_REPLIES = [r["smtp_reply"] for r in ROWS]

# a settings profile per test, not global: other test files keep their own
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -----------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).filter(lambda a: not a.is_unspecified).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: not a.is_unspecified and a.ipv4_mapped is None).map(str)
any_ip = st.one_of(ipv4, ipv6)
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
hostname = st.lists(label, min_size=1, max_size=4).map(lambda ls: ".".join([*ls, "yahoodns.net"]))
local_part = st.text("abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=20)
address = st.one_of(st.just(""), st.builds(lambda lp, h: f"{lp}@{h}", local_part, hostname))

#: (template, stage); {h} host, {a} host address, {m} MAIL FROM / RCPT TO address, {r} reply
WRAPPERS = [
    ("host {h}[{a}] said: {r} (in reply to MAIL FROM command)", "mail"),
    ("host {h}[{a}] said: {r} (in reply to RCPT TO command)", "rcpt"),
    ("host {h}[{a}] said: {r} (in reply to end of DATA command)", "data"),
    ("host {h}[{a}] refused to talk to me: {r}", "connect"),
    ("4.7.0 host {h}[{a}] said: {r} (in reply to MAIL FROM command)", "mail"),
    ("SMTP error from remote mail server after pipelined MAIL FROM:<{m}>: {r}", "mail"),
    ("SMTP error from remote mail server after pipelined MAIL FROM:<{m}> SIZE=1234: host {h} [{a}]: {r}", "mail"),
    ("SMTP error from remote mail server after initial connection: {r}", "connect"),
    ("SMTP error from remote mail server after initial connection:\nhost {h} [{a}]: {r}", "connect"),
    ("SMTP error from remote mail server after RCPT TO:<{m}>: {r}", "rcpt"),
    ("SMTP error from remote mail server after RCPT TO:<{m}>: host {h} [{a}]: {r}", "rcpt"),
    ("H={h} [{a}]: SMTP error from remote mail server after pipelined MAIL FROM:<{m}>: {r}", "mail"),
]

YAHOO_TEMPLATES = [
    "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
    "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to user complaints",
    "421 [IPTS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints",
    "421 4.7.1 [TS03] All messages from {ip} will be permanently deferred; Retrying will NOT succeed.",
    "421 4.7.0 [TS01] Messages from {ip} temporarily deferred due to user complaints - 4.16.55.1",
    "553 5.7.1 [BL21] Connections will not be accepted from {ip}, because the ip is in Spamhaus's list",
    "553 5.7.2 [TSS09] All messages from {ip} will be permanently deferred; Retrying will NOT succeed.",
    "553 Mail from {ip} not allowed - 5.7.1 [BL23] Connections not accepted from IP addresses on Spamhaus XBL",
]

NON_YAHOO_TEMPLATES = [
    "421-4.7.0 [{ip} 15] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. - gsmtp",
    "550-5.7.1 [{ip}] The IP you're using to send mail is not authorized to send email directly to our servers. - gsmtp",
    "421-4.7.28 [{ip} 15] Gmail has detected an unusual rate of mail originating from your DKIM domain - gsmtp",
    "421 RP-001 (SNT0-MC2-F19) Unfortunately, some messages from {ip} weren't sent. Please try again.",
    "451 4.7.651 The mail server [{ip}] has been temporarily rate limited due to IP reputation. (S3114)",
    "550 5.7.1 Unfortunately, messages from [{ip}] weren't sent. Please contact your Internet service provider. (S3140)",
    "421 [HCM1] Your mail from {ip} was deferred.",
    "451 [BS02] Temporary server error. Please try again later.",
    "554 5.7.1 [CS01] Message rejected due to local policy.",
    "554 resimta-ch2-18v.sys.comcast.net resimta-ch2-18v.sys.comcast.net {ip} Comcast block for spam.",
    "421 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. Service refused, please try later. LPN007_510 {ip}",
    "554 Message not allowed - 554 Message not allowed - DM Email not accepted for policy reasons. Please visit https://www.yahoo-help.jp/app/answers/detail/a_id/80870/p/622 [895]",
    "554 5.7.1 Service unavailable; Client host [{ip}] blocked using zen.spamhaus.org",
]


def _wrap(template: str, reply: str, host: str, host_ip: str, addr: str) -> str:
    return template.format(h=host, a=host_ip, m=addr, r=reply)


# --- properties --------------------------------------------------------------------------


@PROPS
@given(st.text(max_size=600))
def test_arbitrary_text_never_raises(reply: str) -> None:
    result = classify(reply)
    assert isinstance(result, Classification)
    assert (result.code is None) == (result.cls is None) == (result.scope is None)
    if result.ip is not None:
        assert str(ipaddress.ip_address(result.ip)) == result.ip


@PROPS
@given(st.binary(max_size=400))
def test_decoded_garbage_never_raises(raw: bytes) -> None:
    assert isinstance(classify(raw.decode("utf-8", "surrogateescape")), Classification)
    assert isinstance(classify(raw.decode("latin-1")), Classification)


@PROPS
@given(st.text(max_size=400).filter(lambda s: "[" not in s))
def test_no_bracket_no_bracket_code(reply: str) -> None:
    assert not is_bracket_code(classify(reply).code)


@PROPS
@given(
    st.sampled_from(ALL_REPLIES),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_corpus_replies_inside_noise_never_gain_a_bracket_code(reply: str, before: str, after: str) -> None:
    """A bracket code is only ever assigned when its token is in the text."""
    result = classify(before + reply + after)
    if is_bracket_code(result.code):
        assert f"[{result.code}]".lower() in (before + reply + after).lower()


@PROPS
@given(
    st.sampled_from(WRAPPERS),
    st.one_of(st.sampled_from(YAHOO_REPLIES), st.builds(str.format, st.sampled_from(YAHOO_TEMPLATES), ip=any_ip)),
    hostname,
    any_ip,
    address,
)
def test_wrapping_keeps_the_classification(wrapper: tuple[str, str], reply: str, host: str, host_ip: str, addr: str) -> None:
    template, stage = wrapper
    bare = classify(reply)
    wrapped = classify(_wrap(template, reply, host, host_ip, addr))
    assert bare.code is not None
    assert (wrapped.code, wrapped.cls, wrapped.scope, wrapped.permanent) == (bare.code, bare.cls, bare.scope, bare.permanent)
    assert (wrapped.ip, wrapped.smtp_code, wrapped.enhanced, wrapped.text) == (bare.ip, bare.smtp_code, bare.enhanced, bare.text)
    assert wrapped.stage == stage
    if "{h}" in template:
        assert wrapped.host == host


@PROPS
@given(st.sampled_from(YAHOO_TEMPLATES), any_ip)
def test_yahoo_templates_name_the_ip(template: str, ip: str) -> None:
    result = classify(template.format(ip=ip))
    assert is_bracket_code(result.code)
    assert result.ip == str(ipaddress.ip_address(ip))


@PROPS
@given(st.sampled_from(NON_YAHOO_TEMPLATES), any_ip, st.sampled_from(WRAPPERS), hostname, any_ip, address)
def test_non_yahoo_templates_never_get_a_yahoo_code(
    template: str, ip: str, wrapper: tuple[str, str], host: str, host_ip: str, addr: str
) -> None:
    reply = template.format(ip=ip)
    assert classify(reply).code is None
    assert classify(_wrap(wrapper[0], reply, host, host_ip, addr)).code is None


def _naive_match(clf: Classifier, flat: str) -> str | None:
    """The rule semantics without any pre-filter: table order, first regex hit, bracket token needed."""
    upper = flat.upper()
    for rule in clf.rules:
        if rule.bracket is not None and f"[{rule.bracket}]" not in upper:
            continue
        if rule.regex.search(flat):
            return rule.code
    return None


#: words of real replies, whole replies and tokens: random text that rules do match
fragments = st.one_of(
    st.sampled_from([piece for reply in ALL_REPLIES for piece in reply.split(" ")]
                    + ["[TSS04]", "[ts03]", "[160]", "dd", "from", "\n", " | "]),
    st.sampled_from(ALL_REPLIES),
)


@PROPS
@given(st.lists(fragments, max_size=12).map(" ".join))
def test_prefilter_never_changes_the_answer(reply: str) -> None:
    """The bracket dispatch and literal guards are an optimisation only."""
    clf = Classifier.default()
    _, flat = _flatten(_unwrap(reply)[0])
    rule = clf.match(flat)
    assert (rule.code if rule else None) == _naive_match(clf, flat)


# --- fuzzing (the ``governor-fuzz`` profile: 10^3 examples in every run, 10^5 with -m fuzz) ---

FUZZ = settings.get_profile("governor-fuzz")

#: mail exchangers that are not Yahoo's, for wrapped non-Yahoo replies
other_mx = st.sampled_from(["gmail-smtp-in.l.google.com", "hotmail-com.olc.protection.outlook.com",
                            "mx1.comcast.net", "mx.example.org", "smtp-in.orange.fr"])
#: noise without brackets: it can never carry a Yahoo bracket token
noise = st.text(st.characters(blacklist_characters="[]"), max_size=60)


@pytest.mark.fuzz
@FUZZ
@given(st.one_of(st.text(max_size=2000), st.lists(fragments, max_size=60).map(" ".join),
                 st.binary(max_size=600).map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_fuzz_arbitrary_replies(reply: str) -> None:
    """Never an exception; a bracket code only when its token is in the text."""
    result = classify(reply)
    assert isinstance(result, Classification)
    if is_bracket_code(result.code):
        assert f"[{result.code}]".lower() in reply.lower()


@pytest.mark.fuzz
@FUZZ
@given(st.sampled_from(NON_YAHOO_TEMPLATES), any_ip, st.sampled_from(WRAPPERS), other_mx, any_ip, address,
       noise, noise)
def test_fuzz_non_yahoo_replies_never_get_a_yahoo_code(
    template: str, ip: str, wrapper: tuple[str, str], host: str, host_ip: str, addr: str, before: str, after: str
) -> None:
    """Other providers' replies, in noise, bare or wrapped as from their own MX: no code at all."""
    reply = before + template.format(ip=ip) + after
    assert classify(reply).code is None
    assert classify(_wrap(wrapper[0], reply, host, host_ip, addr)).code is None
