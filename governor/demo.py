"""The demo: real SMTP into the Yahoo simulator, blind versus governed.

Everything runs on loopback and is private to the demo: a throwaway redis-server,
the Yahoo MX simulator, and two senders that speak real SMTP from 127.0.0.x
source addresses.

1. A *blind* sender does what an ungoverned MTA does: 8 parallel connections from
   one IP, retrying every deferral a second later. The simulator answers TSS04
   and, as the retries pile up, escalates to TS02/TS03.
2. The *governed* sender asks the shared store before every message
   (``acquire``: IP pick, concurrency lease, smooth rate), feeds every reply
   through the classifier and the policy into the store (``record``), and
   releases its lease. Midway one IP is blocked by "Yahoo" (TS03 at connect):
   the store holds that IP and the traffic fails over to the other three.

The summary compares what the simulator saw from each sender.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
from rich.console import Console
from rich.table import Table

from governor.classify import classify
from governor.config import Config, EgressIP, apply_time_scale, default_config
from governor.domains import domain_of
from governor.redisproc import RedisProc
from governor.sim import SimThread, ephemeral_settings
from governor.store.aio import AsyncStore

DOMAINS = ("yahoo.com", "aol.com", "ymail.com", "att.net", "sbcglobal.net")
POOL = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
BLIND_IP = "127.0.0.9"
SMTP_TIMEOUT = 10.0


@dataclass
class Options:
    messages: int = 400
    sim_rate: int = 300        # per IP per minute, what "Yahoo" tolerates
    rate: float = 280.0        # per IP per minute, what the governor allows
    concurrency: int = 5
    blind_seconds: float = 6.0
    block_after: float = 0.4   # block one IP when this share of the mail is delivered
    deadline: float = 120.0


@dataclass
class SendResult:
    delivered: int = 0
    replies: Counter = field(default_factory=Counter)
    per_ip: Counter = field(default_factory=Counter)
    elapsed: float = 0.0


def _message(rcpt: str, n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "newsletter@demo.example"
    msg["To"] = rcpt
    msg["Subject"] = f"yahoo-governor demo #{n}"
    msg.set_content("Hello from the yahoo-governor demo.\n")
    return msg


async def send_one(addr: tuple[str, int], source_ip: str, rcpt: str, n: int) -> tuple[int, str]:
    """Deliver one message over a fresh connection; (SMTP code, reply text)."""
    client = aiosmtplib.SMTP(hostname=addr[0], port=addr[1], source_address=(source_ip, 0),
                             timeout=SMTP_TIMEOUT, start_tls=False)
    try:
        await client.connect()
        await client.send_message(_message(rcpt, n), sender="newsletter@demo.example", recipients=[rcpt])
        return 250, "250 ok"
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, f"{exc.code} {exc.message}"
    except (aiosmtplib.SMTPException, OSError) as exc:
        return 0, str(exc)
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()


def recipients(n: int) -> list[str]:
    return [f"user{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(n)]


# --------------------------------------------------------------------------- blind
async def blind_sender(addr: tuple[str, int], seconds: float) -> SendResult:
    """8 parallel connections from one IP, each retrying a second after a deferral."""
    result = SendResult()
    stop = time.monotonic() + seconds
    counter = iter(range(10**6))

    async def worker() -> None:
        while time.monotonic() < stop:
            code, text = await send_one(addr, BLIND_IP, "someone@yahoo.com", next(counter))
            if code == 250:
                result.delivered += 1
            else:
                result.replies[classify(text).code or str(code)] += 1
                await asyncio.sleep(1.0)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(8)))
    result.elapsed = time.monotonic() - start
    return result


# --------------------------------------------------------------------------- governed
async def governed_sender(store: AsyncStore, addr: tuple[str, int], todo: list[str], opts: Options,
                          on_progress, on_half) -> SendResult:
    """Workers that ask the store before each message and report every reply back."""
    result = SendResult()
    queue = list(reversed(todo))
    start = time.monotonic()
    deadline = start + opts.deadline
    half_done = False

    async def worker(n: int) -> None:
        nonlocal half_done
        while queue and time.monotonic() < deadline:
            d = await store.acquire(None)
            if not d.granted:
                await asyncio.sleep(min(max(d.retry_after, 0.01), 1.0))
                continue
            rcpt = queue.pop()
            code, text = await send_one(addr, d.ip, rcpt, n)
            await store.release(d.lease)
            if code == 250:
                result.delivered += 1
                result.per_ip[d.ip] += 1
            else:
                queue.append(rcpt)  # never lose mail: back in the queue
                c = classify(text)
                result.replies[c.code or str(code)] += 1
                await store.record(d.ip, c, rcpt, domain_of(rcpt))
            if not half_done and result.delivered >= opts.block_after * len(todo):
                half_done = True
                on_half()

    async def progress() -> None:
        while queue and time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            on_progress(result, await store.status())

    workers = [asyncio.create_task(worker(i)) for i in range(len(POOL) * opts.concurrency)]
    reporter = asyncio.create_task(progress())
    await asyncio.gather(*workers)
    reporter.cancel()
    result.elapsed = time.monotonic() - start
    return result


def demo_config(redis_url: str, opts: Options) -> Config:
    """Pool of four loopback IPs; Yahoo's hours scaled to seconds (2 h pause → 7 s)."""
    base = default_config()
    cfg = dataclasses.replace(
        base,
        pool=tuple(EgressIP(ip=ip, name=f"yahoo-ip{i + 1}") for i, ip in enumerate(POOL)),
        redis=dataclasses.replace(base.redis, url=redis_url, prefix="demo"),
        limits=dataclasses.replace(base.limits, concurrency=opts.concurrency, messages_per_minute=opts.rate),
        time_scale=0.001,
    )
    return apply_time_scale(cfg)


# --------------------------------------------------------------------------- display
def _ip_table(status, sim_stats: dict, result: SendResult) -> Table:
    table = Table(title="governed sender: per egress IP", title_justify="left")
    for col in ("egress IP", "delivered", "Yahoo saw TSS04", "TS03", "max conc.", "governor state"):
        table.add_column(col, justify="right" if col not in ("egress IP", "governor state") else "left")
    for st in status:
        ips = sim_stats["ips"].get(st.ip, {})
        replies = ips.get("replies", {})
        state = "ok"
        if st.held:
            state = f"HELD ({st.held_reason}) until an admin releases it"
        elif st.cooldown_until > st.now:
            state = f"cooling ({st.cooldown_reason}) {st.cooldown_until - st.now:.0f}s"
        elif st.rate_factor < 1:
            state = f"ramping back, {st.rate_factor:.0%} of the rate"
        table.add_row(st.ip, str(result.per_ip.get(st.ip, 0)), str(replies.get("TSS04", 0)),
                      str(replies.get("TS03", 0)), str(ips.get("concurrency_hwm", 0)), state)
    return table


def _contrast(blind: SendResult, blind_stats: dict, governed: SendResult, sim_stats: dict, opts: Options) -> Table:
    table = Table(title="blind vs governed (as the simulated Yahoo saw it)", title_justify="left")
    for col in ("sender", "seconds", "delivered", "TSS04", "TS02", "TS03", "standing at the end"):
        table.add_column(col)
    b = blind_stats["ips"].get(BLIND_IP, {})
    br = b.get("replies", {})
    table.add_row("blind, 8 conns from 1 IP", f"{blind.elapsed:.1f}", str(blind.delivered), str(br.get("TSS04", 0)),
                  str(br.get("TS02", 0)), str(br.get("TS03", 0)), b.get("standing", "?"))
    totals = Counter()
    for ip in POOL:
        totals.update(sim_stats["ips"].get(ip, {}).get("replies", {}))
    table.add_row(f"governed, {len(POOL)} IPs", f"{governed.elapsed:.1f}", str(governed.delivered),
                  str(totals["TSS04"]), str(totals["TS02"]), str(totals["TS03"]), "see table above")
    return table


# --------------------------------------------------------------------------- main
async def _run(opts: Options, console: Console) -> int:
    settings = ephemeral_settings(max_conn=opts.concurrency, max_rate=opts.sim_rate, penalty=10.0,
                                  ts02_after=10, ts03_after=20)
    with RedisProc() as redis_proc, SimThread(settings) as sim:
        addr = sim.addresses[0]
        console.print(f"[bold]redis-server[/] {redis_proc.url}   [bold]Yahoo simulator[/] {addr[0]}:{addr[1]} "
                      f"(per IP: {opts.concurrency} connections, {opts.sim_rate} msgs/min)")
        console.rule("1. blind sender: what an ungoverned MTA does")
        blind = await blind_sender(addr, opts.blind_seconds)
        blind_stats = sim.stats(include_times=False)
        b = blind_stats["ips"].get(BLIND_IP, {})
        console.print(f"delivered {blind.delivered}, deferred {sum(blind.replies.values())} times: "
                      f"{dict(blind.replies)}; the simulator now rates {BLIND_IP}: [bold red]{b.get('standing')}[/]")

        console.rule("2. governed sender: ask the store before every message")
        cfg = demo_config(redis_proc.url, opts)
        ideal = opts.messages / (len(POOL) * opts.rate / 60)
        console.print(f"{opts.messages} messages over {len(POOL)} IPs at {opts.rate:g}/min each "
                      f"(ideal {ideal:.1f}s with all four; one IP gets blocked midway)")
        store = AsyncStore.connect(cfg)
        blocked = POOL[-1]

        def on_half() -> None:
            sim.block(blocked)
            console.print(f"[yellow]Yahoo blocks {blocked} (TS03 at connect)[/]")

        def on_progress(result: SendResult, status) -> None:
            states = " ".join(f"{s.ip.rsplit('.', 1)[1]}:{'HELD' if s.held else 'ok'}" for s in status)
            console.print(f"  delivered {result.delivered:4d}/{opts.messages}   leases "
                          f"{sum(s.leases for s in status):2d}   {states}")

        try:
            governed = await governed_sender(store, addr, recipients(opts.messages), opts, on_progress, on_half)
            status = await store.status()
            audit = await store.audit(count=200)
        finally:
            await store.aclose()
        sim_stats = sim.stats(include_times=False)
        console.print(_ip_table(status, sim_stats, governed))
        console.print(_contrast(blind, blind_stats, governed, sim_stats, opts))
        actions = Counter(e.action for e in audit)
        console.print(f"audit trail: {dict(actions)}")
        lost = opts.messages - governed.delivered
        console.print(f"governed: {governed.delivered}/{opts.messages} delivered in {governed.elapsed:.1f}s, "
                      f"{lost} not delivered (still queued, never dropped)")
        return 0 if lost == 0 else 1


def run(opts: Options | None = None, console: Console | None = None) -> int:
    """Run the whole demo; returns the process exit status."""
    return asyncio.run(_run(opts or Options(), console or Console()))
