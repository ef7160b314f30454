"""Benchmark the Yahoo MX simulator: accepted messages per second it sustains.

Starts ``governor sim`` as a child process (two MX listeners, limits raised so no
one is deferred, but Yahoo's 20 messages per connection kept so clients reconnect
as they must), then drives it with aiosmtplib clients from several 127.0.0.x
source addresses in one or more client processes. The rate is counted by the
simulator itself (its accept timestamps inside the measured window, after a
warm-up), and the simulator's CPU use is sampled from /proc, so the table shows
both what it did and how much of a core that took (headroom).

Prints a table and writes bench/results/sim.json ({"per_s": ..., ...}).

    .venv/bin/python bench/sim.py [--seconds 10] [--sources 4] [--lanes 4] [--workers 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402

from governor.sim import SimProcess  # noqa: E402
from governor.sim.settings import Settings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sim.json"
TARGET_PER_S = 500
BODY = ("From: bench@example.com\r\nTo: user@yahoo.com\r\nSubject: sim bench\r\n\r\n"
        + "x" * 70 + "\r\n") * 1 + ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 25)


async def lane(host: str, port: int, src: str, per_conn: int, end_at: float, out: dict[str, int]) -> None:
    """One client connection slot: connect, send ``per_conn`` messages, QUIT, repeat."""
    message = BODY.encode()
    while time.time() < end_at:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, source_address=(src, 0),
                               local_hostname="bench.example", timeout=30)
        await smtp.connect()
        out["connections"] += 1
        try:
            for _ in range(per_conn):
                if time.time() >= end_at:
                    break
                errors, _ = await smtp.sendmail("bench@example.com", ["user@yahoo.com"], message)
                out["sent"] += 1
                out["refused"] += len(errors)
        except aiosmtplib.SMTPException:
            out["errors"] += 1
        finally:
            try:
                await smtp.quit()
            except aiosmtplib.SMTPException:
                smtp.close()


async def client(addresses: list[tuple[str, int]], sources: list[str], lanes: int, per_conn: int,
                 end_at: float) -> dict[str, dict[str, int]]:
    counts = {s: {"connections": 0, "sent": 0, "refused": 0, "errors": 0} for s in sources}
    tasks = []
    for i, src in enumerate(sources):
        for j in range(lanes):
            host, port = addresses[(i + j) % len(addresses)]
            tasks.append(lane(host, port, src, per_conn, end_at, counts[src]))
    await asyncio.gather(*tasks)
    return counts


def worker(addresses: list[tuple[str, int]], sources: list[str], lanes: int, per_conn: int,
           end_at: float, queue: mp.Queue) -> None:
    queue.put(asyncio.run(client(addresses, sources, lanes, per_conn, end_at)))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(seconds: float, warmup: float, n_sources: int, lanes: int, per_conn: int, workers: int) -> dict[str, Any]:
    settings = Settings.from_mapping({
        "listen": ["127.0.0.1:0", "127.0.0.2:0"], "max_conn": 100_000, "max_rate": 10**9,
        "max_per_conn": per_conn, "penalty": 0, "dd_pattern": "", "defer_pattern": "",
    })
    sources = [f"127.0.0.{100 + i}" for i in range(n_sources)]
    with SimProcess(settings) as sim:
        assert sim.pid is not None
        start = time.time()
        end_at = start + warmup + seconds
        queue: mp.Queue = mp.Queue()
        chunks = [sources[i::workers] for i in range(workers)]
        procs = [mp.Process(target=worker, args=(sim.addresses, chunk, lanes, per_conn, end_at, queue))
                 for chunk in chunks if chunk]
        for p in procs:
            p.start()
        time.sleep(max(0.0, start + warmup - time.time()))
        t0, cpu0 = time.time(), cpu_seconds(sim.pid)
        time.sleep(max(0.0, end_at - time.time()))
        t1, cpu1 = time.time(), cpu_seconds(sim.pid)
        counts: dict[str, dict[str, int]] = {}
        for _ in procs:
            counts.update(queue.get(timeout=120))
        for p in procs:
            p.join(30)
        stats = sim.stats()
    window = t1 - t0
    in_window = {ip: sum(1 for t in rec["accept_times"] if t0 <= t < t1) for ip, rec in stats["ips"].items()}
    per_s = sum(in_window.values()) / window
    sim_cpu = (cpu1 - cpu0) / window
    return {
        "per_s": round(per_s, 1),
        "target_per_s": TARGET_PER_S,
        "sim_cpu_share": round(sim_cpu, 3),
        "per_sim_cpu_second": round(per_s / sim_cpu, 1) if sim_cpu > 0 else None,
        "window_s": round(window, 2),
        "warmup_s": warmup,
        "sources": len(sources),
        "lanes_per_source": lanes,
        "client_processes": len(procs),
        "messages_per_connection": per_conn,
        "message_bytes": len(BODY),
        "accepted_total": stats["total"]["accepted"],
        "deferrals": sum(stats["total"]["replies"].values()),
        "client_errors": sum(c["errors"] + c["refused"] for c in counts.values()),
        "per_source": {ip: {"connections": counts[ip]["connections"], "accepted_in_window": in_window.get(ip, 0),
                            "per_s": round(in_window.get(ip, 0) / window, 1)} for ip in sources},
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"{'source IP':<14}{'conns':>8}{'msgs':>9}{'msgs/s':>10}")
    for ip, row in r["per_source"].items():
        print(f"{ip:<14}{row['connections']:>8}{row['accepted_in_window']:>9}{row['per_s']:>10}")
    print("-" * 41)
    print(f"{'total':<14}{'':>8}{round(r['per_s'] * r['window_s']):>9}{r['per_s']:>10}")
    print(f"\nwindow {r['window_s']} s after {r['warmup_s']} s warm-up; {r['client_processes']} client "
          f"process(es), {r['sources']} sources x {r['lanes_per_source']} connections, "
          f"{r['messages_per_connection']} msgs/connection, {r['message_bytes']} B/msg")
    print(f"simulator CPU: {r['sim_cpu_share'] * 100:.0f}% of one core "
          f"→ {r['per_sim_cpu_second']} msgs per simulator CPU-second")
    print(f"deferrals {r['deferrals']}, client errors {r['client_errors']}; "
          f"target >= {r['target_per_s']}/s: {'OK' if r['per_s'] >= r['target_per_s'] else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up (default 1)")
    ap.add_argument("--sources", type=int, default=4, help="client source IPs 127.0.0.100+ (default 4)")
    ap.add_argument("--lanes", type=int, default=4, help="concurrent connections per source (default 4)")
    ap.add_argument("--per-conn", type=int, default=20, help="messages per connection (default 20, Yahoo's)")
    ap.add_argument("--workers", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args()
    result = run(args.seconds, args.warmup, args.sources, args.lanes, args.per_conn, args.workers)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["per_s"] >= TARGET_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
