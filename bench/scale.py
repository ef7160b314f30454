"""Benchmark: how decisions/s grow with MTA-side processes, on one Redis and on a Cluster.

Runs bench/decisions.py's worker (each process loops acquire(ip) -> release() on
one of 3 IPs, limits high enough that nothing is denied) with 1, 2, 4 and 8
processes against:

- ``unix``: one private redis-server over its unix socket (the default transport);
- ``tcp``: the same server over loopback TCP (what a remote store costs);
- ``cluster``: a private 3-master Redis Cluster (governor.lab.redisha.ClusterLab,
  no replicas by default), over loopback TCP; the 3 IPs' hash tags live on
  different masters, so the load spreads.

Prints a table and writes bench/results/scale.json:

    {"targets": {"unix": {"1": {"per_s", "p50_us", "p99_us", ...}, "2": ...}, "tcp": ..., "cluster": ...}, ...}

per_s counts acquire+release pairs of all processes; p50/p99 are acquire latencies.
Each cell is the median of --rounds rounds. On one host every server and client
shares the same CPUs, so a Cluster cannot beat one Redis here: the run shows the
per-decision cost of the Cluster client and how the curve flattens when the CPUs
are full; on separate hosts each master adds its own CPU.

    .venv/bin/python bench/scale.py [--seconds 3] [--rounds 1] [--processes 1,2,4,8] [--targets unix,tcp,cluster]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import decisions  # noqa: E402  (bench/decisions.py: the worker and the statistics)

from governor.lab.redisha import ClusterLab  # noqa: E402
from governor.redisproc import RedisProc  # noqa: E402


def _flush(url: str) -> None:
    if url.startswith("redis+cluster://"):
        host, port = url.split("://", 1)[1].split(",")[0].rsplit(":", 1)
        c = redis.RedisCluster(host=host, port=int(port))
        c.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        c.close()
        return
    c = redis.Redis.from_url(url)
    c.flushall()
    c.close()


def _server_pids(target: str, single: RedisProc | None, lab: ClusterLab | None) -> list[int]:
    if target == "cluster" and lab is not None:
        return [n.proc.pid for n in lab.nodes if n.proc is not None]
    return [single.proc.pid] if single is not None and single.proc is not None else []


def run_cell(url: str, n: int, seconds: float, pids: list[int]) -> dict[str, Any]:
    """One measurement: n processes for ``seconds`` (decisions.run_processes, several servers)."""
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=decisions._worker, args=(url, seconds, False, i, start_at, q)) for i in range(n)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time() + 0.05))
    server0 = sum(decisions._cpu_seconds(pid) for pid in pids)
    results = [q.get(timeout=seconds + 120) for _ in procs]
    server_cpu = sum(decisions._cpu_seconds(pid) for pid in pids) - server0
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r["lat"])
    pairs = sum(r["pairs"] for r in results)
    if sum(r["denied"] for r in results):
        raise SystemExit("acquires were denied; the limits should admit everything")
    return {
        "per_s": round(pairs / seconds),
        "p50_us": round(decisions._percentile(lat, 0.50) * 1e6, 1),
        "p99_us": round(decisions._percentile(lat, 0.99) * 1e6, 1),
        "max_us": round(lat[-1] * 1e6, 1),
        "client_cpu_us_per_pair": round(sum(r["cpu"] for r in results) / pairs * 1e6, 1),
        "server_cpu_us_per_pair": round(server_cpu / pairs * 1e6, 1),
    }


def measure(target: str, url: str, counts: list[int], seconds: float, rounds: int, pids: list[int]) -> dict:
    table = {}
    for n in counts:
        runs = []
        for _ in range(rounds):
            _flush(url)
            runs.append(run_cell(url, n, seconds, pids))
        runs.sort(key=lambda r: r["per_s"])
        table[str(n)] = dict(runs[len(runs) // 2], rounds_per_s=[r["per_s"] for r in runs])
        r = table[str(n)]
        print(f"{target:>8} {n:>5} {r['per_s']:>9} {r['p50_us']:>8} {r['p99_us']:>8} "
              f"{r['client_cpu_us_per_pair']:>8} {r['server_cpu_us_per_pair']:>8}", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per cell; the median is reported")
    ap.add_argument("--processes", default="1,2,4,8")
    ap.add_argument("--targets", default="unix,tcp,cluster")
    ap.add_argument("--replicas", type=int, default=0, help="replicas per Cluster master")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    result: dict[str, Any] = {"targets": {}}
    print(f"{'target':>8} {'procs':>5} {'pairs/s':>9} {'p50 us':>8} {'p99 us':>8} {'cli cpu':>8} {'srv cpu':>8}")
    if {"unix", "tcp"} & set(targets):
        with RedisProc() as rp:
            for target, url in (("unix", rp.url), ("tcp", rp.tcp_url)):
                if target in targets:
                    result["targets"][target] = measure(target, url, counts, args.seconds, args.rounds,
                                                        _server_pids(target, rp, None))
    if "cluster" in targets:
        with ClusterLab(masters=3, replicas=args.replicas) as lab:
            result["targets"]["cluster"] = measure("cluster", lab.url, counts, args.seconds, args.rounds,
                                                   _server_pids("cluster", None, lab))
    result.update(
        mode="acquire(ip) + release, 3 IPs round-robin by process (bench/decisions.py worker)",
        cluster=f"3 masters, {args.replicas} replica(s) each, loopback TCP",
        seconds=args.seconds, rounds=args.rounds,
        host={"cpus": mp.cpu_count(), "python": platform.python_version(), "redis_py": redis.__version__},
    )
    print("(cli/srv cpu: CPU microseconds per acquire+release pair, all client processes / all redis-servers)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
