"""governor.mta_setup: reversible edits of MTA config text (pure, no MTA needed).

The property that matters to an admin: ``strip_managed(add(x)) == x`` for any
config text, and ``add`` twice is ``add`` once.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from governor import mta_setup as ms

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SETTINGS = {"yahoo-ip1-s1_transport_rate_delay": "3s", "smtpd_milters": "{ unix:/m.sock, default_action=accept }"}
QMGR = {"qmgr/unix": ["-o rewrite_service_name=gov-rewrite"]}
ENTRY = "gov-rewrite    unix  -       -       n       -       -       trivial-rewrite\n  -o transport_maps=x"

# Lines that look like config: parameters we set, master.cf entries, continuations,
# comments, Exim sections, blank lines, \r and odd bytes; joined with or without a
# final newline.
_LINE = st.one_of(
    st.sampled_from([
        "smtpd_milters = inet:localhost:8891", "  inet:localhost:8892", "\tmore", "# comment", "  # indented",
        "", " ", "qmgr      unix  n       -       n       300     1       qmgr", "  -o a=b",
        "yahoo-ip1-s1_transport_rate_delay=1s", "begin acl", "begin routers", " begin retry ",
        "acl_smtp_rcpt = acl_check_rcpt", "acl_smtp_rcpt = a\\", "  b", "mydestination = $myhostname",
        "gov-rewrite unix - - n - - trivial-rewrite", "line\r", "caf\udce9",
    ]),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30),
)
TEXTS = st.builds(lambda lines, nl: "\n".join(lines) + ("\n" if nl and lines else ""),
                  st.lists(_LINE, max_size=25), st.booleans())


def _unmarked(text: str) -> bool:
    return "yahoo-governor" not in text


def _adders() -> list:
    return [
        lambda t: ms.postfix_main_add(t, SETTINGS),
        lambda t: ms.postfix_master_add(t, [ENTRY], {}),
        lambda t: ms.exim_add(t, {"": "M = 1\n", "acl": "a:\n  accept\n", "retry": "* * F,1d,1m"},
                              wrap_rcpt_acl="acl_gov"),
    ]


# --------------------------------------------------------------------------- properties
@PROPS
@given(TEXTS, st.integers(0, 2))
def test_remove_of_add_is_identity(text: str, which: int) -> None:
    assume(_unmarked(text))
    added = _adders()[which](text)
    assert ms.strip_managed(added) == text
    assert ms.is_managed(added)


@PROPS
@given(TEXTS, st.integers(0, 2))
def test_add_is_idempotent(text: str, which: int) -> None:
    assume(_unmarked(text))
    add = _adders()[which]
    once = add(text)
    assert add(once) == once
    assert ms.strip_managed(ms.strip_managed(once)) == text


@PROPS
@given(TEXTS)
def test_master_add_with_qmgr_round_trips(text: str) -> None:
    assume(_unmarked(text))
    lines = ms.split_lines(text)
    if "qmgr/unix" not in ms.master_cf_entries(lines):
        with pytest.raises(ms.EditError, match="no qmgr/unix"):
            ms.postfix_master_add(text, [ENTRY], QMGR)
        return
    added = ms.postfix_master_add(text, [ENTRY], QMGR)
    assert ms.strip_managed(added) == text
    assert len(ms.blocks(ms.split_lines(added))) == 1


@PROPS
@given(TEXTS)
def test_split_lines_keeps_every_byte(text: str) -> None:
    assert "".join(ms.split_lines(text)) == text


# --------------------------------------------------------------------------- examples
def test_main_cf_saves_existing_definitions_with_continuations() -> None:
    text = ("# my milters\nsmtpd_milters = inet:localhost:8891,\n  # opendkim\n\n  inet:localhost:8892\n"
            "myhostname = mx.example\n")
    out = ms.postfix_main_add(text, SETTINGS)
    assert out.splitlines() == [
        "# my milters",
        "#yahoo-governor-saved# smtpd_milters = inet:localhost:8891,",
        "#yahoo-governor-saved#   # opendkim",
        "#yahoo-governor-saved# ",
        "#yahoo-governor-saved#   inet:localhost:8892",
        "myhostname = mx.example",
        ms.begin_line("postfix"),
        "yahoo-ip1-s1_transport_rate_delay = 3s",
        "smtpd_milters = { unix:/m.sock, default_action=accept }",
        ms.END,
    ]
    assert ms.strip_managed(out) == text


def test_missing_final_newline_is_restored() -> None:
    text = "a = 1\nsmtpd_milters = x"
    out = ms.postfix_main_add(text, SETTINGS)
    assert out.endswith(ms.END)  # the END line carries the "no newline" mark
    assert ms.strip_managed(out) == text


def test_master_cf_amends_qmgr_and_replaces_our_services() -> None:
    text = ("qmgr      unix  n       -       n       300     1       qmgr\n  -o x=y\n"
            "gov-rewrite unix - - n - - trivial-rewrite\nsmtp unix - - n - - smtp\n")
    out = ms.postfix_master_add(text, [ENTRY], QMGR)
    lines = out.splitlines()
    assert lines[:3] == ["#yahoo-governor-saved# qmgr      unix  n       -       n       300     1       qmgr",
                         "#yahoo-governor-saved#   -o x=y",
                         "#yahoo-governor-saved# gov-rewrite unix - - n - - trivial-rewrite"]
    block = lines[lines.index(ms.begin_line("postfix")) + 1:lines.index(ms.END)]
    assert block[:3] == ["qmgr      unix  n       -       n       300     1       qmgr", "  -o x=y",
                         "  -o rewrite_service_name=gov-rewrite"]
    assert block[3:] == ENTRY.splitlines()
    assert ms.strip_managed(out) == text


def test_exim_blocks_go_after_begin_lines_and_wrap_the_rcpt_acl() -> None:
    text = ("primary_hostname = x\nacl_smtp_rcpt = acl_check_rcpt\nbegin acl\nacl_check_rcpt:\n  accept\n"
            "begin routers\ndnslookup:\n  driver = dnslookup\n")
    out = ms.exim_add(text, {"": "GOV = 1\n", "acl": "gov_acl:\n  accept\n", "routers": "gov:\n  driver = x\n",
                             "retry": "* * F,1d,1m\n"}, wrap_rcpt_acl="acl_gov")
    lines = out.splitlines()
    assert lines[0] == ms.begin_line("exim") and lines[1] == "GOV = 1"
    assert "YAHOO_GOVERNOR_NEXT_RCPT_ACL = acl_check_rcpt" in lines
    assert "#yahoo-governor-saved# acl_smtp_rcpt = acl_check_rcpt" in lines
    assert lines.index("gov:") < lines.index("dnslookup:")
    assert lines[lines.index("begin acl") + 2] == "gov_acl:"
    assert "begin retry" in lines  # a missing section is added at the end
    assert len(ms.blocks(ms.split_lines(out))) == 4
    assert ms.strip_managed(out) == text


def test_broken_markers_are_refused() -> None:
    with pytest.raises(ms.EditError, match="without # END"):
        ms.strip_managed(ms.begin_line("postfix") + "\nx = 1\n")
    with pytest.raises(ms.EditError, match="without # BEGIN"):
        ms.postfix_main_add("x = 1\n" + ms.END + "\n", SETTINGS)


def test_unified_diff_and_conf_d_files() -> None:
    diff = ms.unified_diff("/etc/postfix/main.cf", "a = 1\n", "a = 1\nb = 2")
    assert diff.startswith("--- a/etc/postfix/main.cf\n+++ b/etc/postfix/main.cf\n")
    assert diff.endswith("+b = 2\n\\ No newline at end of file\n")
    assert ms.unified_diff("/x", "same", "same") == ""
    assert ms.is_our_file(ms.conf_d_file("text\n")) and not ms.is_our_file("text\n")
