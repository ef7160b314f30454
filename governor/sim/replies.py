"""The replies the simulator sends, worded as Yahoo words them.

Texts follow the current forms quoted in ``tests/data/yahoo_replies.tsv`` (row ids
in the comments) so that the project's classifier, and any MTA log parser, sees
exactly what it would see from a real Yahoo MX. The sending IP in the text is
always the peer address of the connection, in its own family (IPv4 or IPv6).
"""
from __future__ import annotations

from dataclasses import dataclass

URL = "https://postmaster.yahooinc.com/error-codes"

# Reply kinds; also the keys of the per-IP ``replies`` counters in the stats.
TSS04 = "TSS04"
TS01 = "TS01"
TS02 = "TS02"
TS03 = "TS03"
DD = "dd"
DEFER = "defer"
MAX_PER_CONN = "max_per_conn"
KINDS = (TSS04, TS01, TS02, TS03, DD, DEFER, MAX_PER_CONN)

#: Kinds that say something about the sending IP (the others are per recipient or
#: per connection and are not penalties).
IP_KINDS = frozenset({TSS04, TS01, TS02, TS03})


@dataclass(frozen=True)
class Reply:
    """One SMTP reply and whether the session is closed right after it."""

    kind: str
    text: str
    close: bool


def tss04(ip: str) -> Reply:
    """Rate/volume/concurrency throttle (Y020, current wording)."""
    return Reply(TSS04, f"421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to "
                        f"unexpected volume or user complaints - 4.16.55.1; {URL}", True)


def ts01(ip: str) -> Reply:
    """Cold IP over its daily budget (Y003 wording, current URL)."""
    return Reply(TS01, f"421 4.7.0 [TS01] Messages from {ip} temporarily deferred due to "
                       f"user complaints - 4.16.55.1; {URL}", True)


def ts02(ip: str) -> Reply:
    """Escalated: excessive complaints (Y006 family, 4.16.56)."""
    return Reply(TS02, f"421 4.16.56 [TS02] Messages from {ip} temporarily deferred due to "
                       f"excessive user complaints - 4.16.56.1; {URL}", True)


def ts03(ip: str) -> Reply:
    """Block: "permanently deferred; Retrying will NOT succeed" (Y008, current URL)."""
    return Reply(TS03, f"421 4.7.1 [TS03] All messages from {ip} will be permanently deferred; "
                       f"Retrying will NOT succeed. See {URL}", True)


def max_per_conn() -> Reply:
    """Per-connection message cap (Y062); a connection matter, not a penalty."""
    return Reply(MAX_PER_CONN, "421 Max message per connection reached, closing transmission channel",
                 True)


def dd(address: str, hostname: str) -> Reply:
    """Unknown recipient (Y084/Y085 form), with the recipient's own domain."""
    domain = address.rpartition("@")[2].lower() or "yahoo.com"
    return Reply(DD, f"554 delivery error: dd This user doesn't have a {domain} account "
                     f"({address}) [0] - {hostname}", False)


def defer() -> Reply:
    """Per-recipient temporary deferral (Y018): a complaint-like signal (seed 001)."""
    return Reply(DEFER, "451 Message temporarily deferred - [160]", False)


def by_kind(kind: str, ip: str) -> Reply:
    """The IP-level reply of ``kind`` for ``ip``."""
    return {TSS04: tss04, TS01: ts01, TS02: ts02, TS03: ts03}[kind](ip)


#: Sent to a client that starts a transaction while the simulator shuts down.
SHUTDOWN = "421 4.3.2 Service shutting down, closing transmission channel"
#: Success reply at end of DATA (Y124: Yahoo's "delivered" wording).
ACCEPTED = "250 ok dirdel"
