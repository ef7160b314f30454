"""The milter's logic through pymilter's TestCtx (no MTA), against a real redis-server.

Covers each row of docs/postfix.md "What the milter does": continue while an IP may
send, hold (all-Yahoo) vs accept (mixed) when none may, tempfail mode, Redis down in
both fail modes, monitor mode, the 0.5 s cache, and the macros Postfix really sends.
"""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import Milter
import pytest
from Milter import testctx

from governor.adapters.milter import (
    GovernorMilter, MilterPolicy, ProviderState, ProviderView, make_factory, rcpt_address,
)
from governor.config import Config, load_config_text
from governor.domains import DomainSet
from governor.store import Store

IPS = ("192.0.2.10", "192.0.2.11")
CONFIG = """
pool:
  - {ip: 192.0.2.10, name: yahoo-ip1}
  - {ip: 192.0.2.11, name: yahoo-ip2}
domains: {dns: false}
"""
MESSAGE = b"From: a@example.org\nTo: b@yahoo.com\nSubject: t\n\nhello\n"


def make_config(url: str, extra: str = "", **changes: Any) -> Config:
    cfg = load_config_text(CONFIG + extra, "test.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url), **changes)


class Ctx(testctx.TestCtx):
    """TestCtx that records quarantine() (TestCtx itself does not implement it)."""

    def __init__(self) -> None:
        super().__init__()
        self.quarantined: list[str] = []

    def quarantine(self, reason: str) -> None:
        self.quarantined.append(reason)


@pytest.fixture
def store(redis_url: str) -> Iterator[Store]:
    s = Store.connect(make_config(redis_url))
    yield s
    s.close()


_OPENED: list[Store] = []


def connect(cfg: Any) -> Store:
    """A Store closed at the end of the test (a MilterPolicy does not own its store)."""
    s = Store.connect(cfg)
    _OPENED.append(s)
    return s


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def policy_for(store: Store, url: str, extra: str = "", ttl: float = 0.0, **changes: Any) -> MilterPolicy:
    cfg = make_config(url, extra, **changes)
    return MilterPolicy(cfg, connect(cfg), DomainSet.from_config(cfg), ttl=ttl)


GO = (Milter.CONTINUE, Milter.ACCEPT)  # the message goes on (ACCEPT: and needs this milter no more)


def feed(policy: MilterPolicy, rcpts: list[str], *, queue_id: str | None = "4ABC123DEF",
         rcpt_macro: bool = True) -> tuple[Ctx, int, list[int]]:
    """One SMTP transaction as Postfix drives it: connect, MAIL, each RCPT (with Postfix's
    macros), DATA, EOM. After an ACCEPT the milter hears nothing more of the message."""
    Milter.factory = make_factory(policy)
    ctx = Ctx()
    assert ctx._connect() == Milter.CONTINUE
    assert ctx._envfrom("<sender@example.org>") == Milter.CONTINUE  # not even sent (no MAIL callback)
    rcpt_codes: list[int] = []
    for n, rcpt in enumerate(rcpts):
        ctx._setsymval("{rcpt_addr}", rcpt if rcpt_macro else None)
        ctx._setsymval("i", queue_id if n > 0 else None)  # Postfix: absent at the first RCPT
        rcpt_codes.append(ctx._envrcpt(f"<{rcpt}>"))
        if rcpt_codes[-1] == Milter.ACCEPT:
            return ctx, Milter.ACCEPT, rcpt_codes
    ctx._setsymval("i", queue_id)
    assert ctx._data() == Milter.CONTINUE
    ctx._body = io.BytesIO()
    rc = ctx._eom()
    return ctx, rc, rcpt_codes


def pause_all(store: Store, seconds: float = 60.0) -> None:
    for ip in IPS:
        store.pause(ip, seconds, "test", "pytest")


# --------------------------------------------------------------------------- pure parts
def test_view_caches_reads_and_failures() -> None:
    calls: list[int] = []
    now = [0.0]
    result: list[Any] = [ProviderState(True)]

    def read() -> ProviderState:
        calls.append(1)
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    view = ProviderView(read, ttl=0.5, clock=lambda: now[0])
    assert view.get().open and view.get().open and len(calls) == 1
    result[0] = ConnectionError("down")
    now[0] = 0.4
    assert view.get().open and len(calls) == 1          # still inside the TTL
    now[0] = 0.6
    with pytest.raises(Exception, match="down"):
        view.get()
    with pytest.raises(Exception, match="down"):
        view.get()                                       # the failure is cached too
    assert len(calls) == 2


# --------------------------------------------------------------------------- against Redis
def test_yahoo_recipient_continues_while_an_ip_may_send(store: Store, redis_url: str) -> None:
    store.pause(IPS[0], 60, "test", "pytest")              # one IP cooling, the other free
    pol = policy_for(store, redis_url)
    ctx, rc, codes = feed(pol, ["someone@yahoo.com"])
    assert (rc, codes, ctx.quarantined) == (Milter.ACCEPT, [Milter.ACCEPT], [])  # accepted at RCPT
    assert store.holds() == []


def test_all_yahoo_message_is_held_and_registered(store: Store, redis_url: str) -> None:
    pause_all(store)
    pol = policy_for(store, redis_url)
    ctx, rc, codes = feed(pol, ["a@yahoo.com", "b@aol.com"], queue_id="4XYZ789")
    assert codes == [Milter.CONTINUE, Milter.CONTINUE] and rc == Milter.CONTINUE
    assert len(ctx.quarantined) == 1 and "cooldown:admin" in ctx.quarantined[0]
    (hold,) = store.holds()
    assert (hold.queue_id, hold.mta, hold.ip in IPS, hold.domain) == ("4XYZ789", "postfix", True, "yahoo.com")
    assert pol.counts["quarantined"] == 1


def test_mixed_message_is_accepted_not_held(store: Store, redis_url: str) -> None:
    pause_all(store)
    pol = policy_for(store, redis_url)
    ctx, rc, codes = feed(pol, ["a@yahoo.com", "friend@example.org"])
    assert codes == [Milter.CONTINUE, Milter.ACCEPT] and rc == Milter.ACCEPT   # mixed: never held
    assert ctx.quarantined == [] and store.holds() == []
    assert pol.counts["mixed_accepted"] == 1
    ctx, rc, codes = feed(pol, ["friend@example.org", "a@yahoo.com"])
    assert codes == [Milter.ACCEPT] and ctx.quarantined == []


def test_non_yahoo_mail_never_asks_the_store(redis_url: str) -> None:
    cfg = make_config("unix:///nonexistent/redis.sock", redis_down="fail-closed")
    pol = MilterPolicy(cfg, connect(cfg), ttl=0.0)
    ctx, rc, codes = feed(pol, ["friend@example.org"])
    assert (rc, codes, ctx._reply) == (Milter.CONTINUE, [Milter.CONTINUE], None)  # fail-closed: no early accept
    assert pol.counts["rcpt_governed"] == 0


def test_tempfail_mode_tempfails_only_yahoo_recipients(store: Store, redis_url: str) -> None:
    pause_all(store)
    pol = policy_for(store, redis_url, "holds: {action: tempfail}\n")
    ctx, rc, codes = feed(pol, ["friend@example.org", "a@yahoo.com"])
    assert codes == [Milter.CONTINUE, Milter.TEMPFAIL]
    code, xcode, text = ctx._reply
    assert (code, xcode) == ("451", "4.7.1") and text.startswith("governor: Yahoo delivery paused (cooldown:admin)")
    assert ctx.quarantined == [] and rc == Milter.CONTINUE  # the message goes on for the others


def test_provider_pause_and_held_ips_count_as_closed(store: Store, redis_url: str) -> None:
    store.pause("provider", 60, "maintenance", "pytest")
    pol = policy_for(store, redis_url)
    ctx, _, _ = feed(pol, ["a@yahoo.com"])
    assert len(ctx.quarantined) == 1
    store.resume("provider", "pytest")
    ctx, _, _ = feed(pol, ["a@yahoo.com"], queue_id="5AAA")
    assert ctx.quarantined == []


@pytest.mark.parametrize("mode,expected", [("fail-open", [Milter.ACCEPT]),
                                           ("fail-closed", [Milter.TEMPFAIL, Milter.CONTINUE])])
def test_redis_down_follows_redis_down_setting(mode: str, expected: list[int]) -> None:
    cfg = make_config("unix:///nonexistent/redis.sock", redis_down=mode)
    pol = MilterPolicy(cfg, connect(cfg), ttl=0.0)
    ctx, rc, codes = feed(pol, ["a@yahoo.com", "friend@example.org"])
    assert codes == expected and rc in GO and ctx.quarantined == []
    if mode == "fail-closed":
        assert ctx._reply[:2] == ("451", "4.7.1")
        assert pol.counts["redis_down_tempfail"] == 1
    else:
        assert pol.counts["redis_down_continue"] == 1


def test_monitor_mode_never_holds_or_tempfails(store: Store, redis_url: str) -> None:
    pause_all(store)
    for action in ("hold", "tempfail"):
        pol = policy_for(store, redis_url, f"holds: {{action: {action}}}\n", mode="monitor")
        ctx, rc, codes = feed(pol, ["a@yahoo.com"])
        assert (codes, ctx.quarantined) == ([Milter.ACCEPT], [])
        assert pol.counts[f"would_{action}"] == 1


def test_cache_hides_changes_for_at_most_ttl(store: Store, redis_url: str) -> None:
    pol = policy_for(store, redis_url, ttl=60.0)
    assert feed(pol, ["a@yahoo.com"])[0].quarantined == []
    pause_all(store)
    assert feed(pol, ["a@yahoo.com"])[0].quarantined == []   # cached "open"
    pol.view.invalidate()
    assert len(feed(pol, ["a@yahoo.com"])[0].quarantined) == 1


def test_no_queue_id_means_accept_rather_than_an_unreleasable_hold(store: Store, redis_url: str) -> None:
    pause_all(store)
    pol = policy_for(store, redis_url)
    ctx, rc, _ = feed(pol, ["a@yahoo.com"], queue_id=None)
    assert (rc, ctx.quarantined, store.holds()) == (Milter.CONTINUE, [], [])
    assert pol.counts["hold_skipped_no_queue_id"] == 1


def test_recipient_comes_from_rcpt_addr_macro_or_the_bracketed_argument(store: Store, redis_url: str) -> None:
    class Fake:
        def __init__(self, macro: str | None) -> None:
            self.macro = macro

        def getsymval(self, name: str) -> str | None:
            return self.macro if name == "{rcpt_addr}" else None

    assert rcpt_address(Fake("a@yahoo.com"), "<ignored@example.org>") == "a@yahoo.com"
    assert rcpt_address(Fake(None), "<User@Yahoo.COM>") == "User@Yahoo.COM"
    pause_all(store)
    pol = policy_for(store, redis_url)
    ctx, _, _ = feed(pol, ["a@yahoo.com"], rcpt_macro=False)
    assert len(ctx.quarantined) == 1


def test_milter_negotiates_only_the_callbacks_it_uses() -> None:
    mask = GovernorMilter.protocol_mask()
    for skipped in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL, Milter.P_NOHDRS, Milter.P_NOBODY,
                    Milter.P_NOEOH, Milter.P_NODATA):
        assert not mask & skipped, "callback should be skipped"
    assert mask & Milter.P_NORCPT  # RCPT is wanted (the bit is cleared in the negotiated options)


def test_tempfail_and_fail_closed_never_accept_early(store: Store, redis_url: str) -> None:
    for extra, mode in (("holds: {action: tempfail}\n", "fail-open"), ("", "fail-closed")):
        pol = policy_for(store, redis_url, extra, redis_down=mode)
        ctx, rc, codes = feed(pol, ["friend@example.org", "a@yahoo.com"])
        assert codes == [Milter.CONTINUE, Milter.CONTINUE] and rc == Milter.CONTINUE  # later RCPTs are heard
