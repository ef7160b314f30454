"""Benchmark: acquire + release through the real store (unix socket, hiredis).

Starts a private redis-server, runs 1, 2 and 4 client processes that each loop
acquire() -> release() for a fixed time with limits high enough that nothing is
denied, and measures a bare PING round trip on the same server for the floor.
Prints a table and writes bench/results/decisions.json:

    {"processes": {"1": {"per_s", "p50_us", "p99_us"}, "2": ..., "4": ...},
     "ping": {"p50_us", "p99_us"}, ...}

per_s counts acquire+release pairs (all processes together); p50/p99 are acquire
latencies. Each measurement is repeated (--rounds, default 3) and the round with the
median pairs/s is reported: a shared 2-core VM is noisy. ``--pick`` benchmarks acquire(ip=None) over the pool (one script that
evaluates every IP) instead of acquire(ip).

    .venv/bin/python bench/decisions.py [--seconds 5] [--rounds 3] [--pick] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from governor.config import load_config_text  # noqa: E402
from governor.redisproc import RedisProc  # noqa: E402
from governor.store import Store  # noqa: E402

POOL = ("192.0.2.10", "192.0.2.11", "192.0.2.12")
CONFIG = """
pool:
  - {ip: 192.0.2.10}
  - {ip: 192.0.2.11}
  - {ip: 192.0.2.12}
limits:
  per_ip: {concurrency: 1000, messages_per_minute: 100000000, lease_ttl: 300s}
"""


def _config(url: str):
    cfg = load_config_text(CONFIG, "bench")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url, socket_timeout=5.0))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _worker(url: str, seconds: float, pick: bool, index: int, start_at: float, out: mp.Queue) -> None:
    store = Store.connect(_config(url))
    ip = None if pick else POOL[index % len(POOL)]
    for _ in range(500):  # warm-up: connection, EVALSHA cache, CPU caches
        store.release(store.acquire(ip).lease)
    lat: list[float] = []
    pairs = denied = 0
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    clock = time.perf_counter
    while True:
        t0 = clock()
        if t0 >= end:
            break
        d = store.acquire(ip)
        t1 = clock()
        lat.append(t1 - t0)
        if d.granted:
            store.release(d.lease)
        else:
            denied += 1
        pairs += 1
    out.put({"pairs": pairs, "denied": denied, "lat": lat, "seconds": seconds, "cpu": time.process_time() - cpu0})
    store.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (for redis-server's share of the work)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_processes(url: str, n: int, seconds: float, pick: bool, server_pid: int) -> dict:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=_worker, args=(url, seconds, pick, i, start_at, q)) for i in range(n)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time() + 0.05))
    server0 = _cpu_seconds(server_pid)
    results = [q.get(timeout=seconds + 60) for _ in procs]
    server_cpu = _cpu_seconds(server_pid) - server0
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r["lat"])
    denied = sum(r["denied"] for r in results)
    if denied:
        raise SystemExit(f"{denied} acquires were denied; the limits should admit everything")
    pairs = sum(r["pairs"] for r in results)
    return {
        "per_s": round(pairs / seconds),
        "p50_us": round(_percentile(lat, 0.50) * 1e6, 1),
        "p99_us": round(_percentile(lat, 0.99) * 1e6, 1),
        "max_us": round(lat[-1] * 1e6, 1),
        "acquires": len(lat),
        "client_cpu_us_per_pair": round(sum(r["cpu"] for r in results) / pairs * 1e6, 1),
        "server_cpu_us_per_pair": round(server_cpu / pairs * 1e6, 1),
    }


def ping(url: str, n: int = 20000) -> dict:
    client = redis.Redis.from_url(url)
    for _ in range(1000):
        client.ping()
    lat = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        client.ping()
        lat.append(clock() - t0)
    client.close()
    lat.sort()
    return {"p50_us": round(_percentile(lat, 0.5) * 1e6, 1), "p99_us": round(_percentile(lat, 0.99) * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per process count")
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat every measurement; report the round with the median pairs/s (noisy hosts)")
    ap.add_argument("--pick", action="store_true", help="acquire(ip=None): pick across the 3-IP pool")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decisions.json"))
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",")]
    with RedisProc() as rp:
        rounds: dict[str, list[dict]] = {str(n): [] for n in counts}
        pings = []
        for _ in range(args.rounds):
            pings.append(ping(rp.url))
            for n in counts:
                redis.Redis.from_url(rp.url).flushall()
                rounds[str(n)].append(run_processes(rp.url, n, args.seconds, args.pick, rp.proc.pid))
        table = {}
        for n, runs in rounds.items():
            runs.sort(key=lambda r: r["per_s"])
            table[n] = dict(runs[len(runs) // 2], rounds_per_s=[r["per_s"] for r in runs])
        pings.sort(key=lambda p: p["p50_us"])
        floor = dict(pings[len(pings) // 2], rounds_p50_us=[p["p50_us"] for p in pings])
    result = {
        "processes": table,
        "ping": floor,
        "rounds": args.rounds,
        "mode": "pick (acquire(ip=None), 3-IP pool)" if args.pick else "acquire(ip), 3 IPs round-robin by process",
        "transport": "unix socket, hiredis" if redis.utils.HIREDIS_AVAILABLE else "unix socket, pure-python parser",
        "seconds": args.seconds,
        "host": {"cpus": mp.cpu_count(), "python": platform.python_version(), "redis_py": redis.__version__},
    }
    print(f"mode: {result['mode']}; {result['transport']}")
    print(f"PING round trip: p50 {floor['p50_us']} us, p99 {floor['p99_us']} us"
          f" (median of {args.rounds} rounds; p50s {floor['rounds_p50_us']})")
    print(f"{'procs':>5} {'pairs/s':>9} {'p50 us':>8} {'p99 us':>8} {'max us':>9} {'cli cpu':>8} {'srv cpu':>8}")
    for n, r in table.items():
        print(f"{n:>5} {r['per_s']:>9} {r['p50_us']:>8} {r['p99_us']:>8} {r['max_us']:>9}"
              f" {r['client_cpu_us_per_pair']:>8} {r['server_cpu_us_per_pair']:>8}")
    print("(median round of", args.rounds, "per process count; pairs/s of each round:",
          {n: r["rounds_per_s"] for n, r in table.items()}, ")")
    print("(cli/srv cpu: CPU microseconds per acquire+release pair, all client processes / redis-server)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
