"""Benchmark: Exim-style readsocket requests against a real ``governor serve``.

Starts a private redis-server and ``governor serve --foreground`` on a scratch unix
socket, then runs several client processes that each do what Exim's
``${readsocket}`` does, one connection per request: connect, send
``acquire yahoo.com auto - -\\n``, shut down the write side, read to EOF, close.
Limits are high (and leases short) so nothing is ever denied; a DEFER or ERR aborts
the run. Each round runs every client for ``--seconds``; the round with the median
throughput is reported. Prints a table and writes bench/results/exim_socket.json:

    {"per_s": ..., "p50_us": ..., "p99_us": ..., "clients": ..., "rounds": [...], ...}

Latency is per request as the client sees it (connect to EOF).

    .venv/bin/python bench/exim_socket.py [--clients 4] [--seconds 5] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from governor.redisproc import RedisProc  # noqa: E402

REQUEST = b"acquire yahoo.com auto - -\n"
CONFIG = """
pool:
  - {{ip: 192.0.2.10, name: yahoo-ip1}}
  - {{ip: 192.0.2.11, name: yahoo-ip2}}
  - {{ip: 192.0.2.12, name: yahoo-ip3}}
limits:
  per_ip: {{concurrency: 1000, messages_per_minute: 100000000, lease_ttl: 200ms}}
redis: {{url: "{url}", socket_timeout: 2s}}
domains: {{dns: false}}
sockets: {{exim: {dir}/exim.sock, socketmap: unix:{dir}/map.sock}}
logging: {{syslog: false, stderr: true, level: warning}}
"""
SERVE = "import governor.cli.serve_cmd; from governor.cli import main; main(prog_name='governor')"


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _client(path: str, seconds: float, start_at: float, out: mp.Queue) -> None:
    """One Exim-like caller: a fresh connection per request, like ${readsocket}."""
    lat: list[float] = []
    bad = 0
    while time.time() < start_at:
        time.sleep(0.001)
    clock = time.perf_counter
    end = clock() + seconds
    while True:
        t0 = clock()
        if t0 >= end:
            break
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(REQUEST)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        lat.append(clock() - t0)
        if not reply.startswith(b"OK governed=yes"):
            bad += 1
            if bad == 1:
                print(f"unexpected reply: {reply[:200]!r}", file=sys.stderr)
    out.put({"lat": lat, "bad": bad})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(path: str, clients: int, seconds: float, daemon_pid: int) -> dict:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_client, args=(path, seconds, start_at, q)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = _cpu_seconds(daemon_pid)
    results = [q.get(timeout=seconds + 60) for _ in procs]
    cpu = _cpu_seconds(daemon_pid) - cpu0
    for p in procs:
        p.join()
    bad = sum(r["bad"] for r in results)
    if bad:
        raise SystemExit(f"{bad} requests were not granted; the limits should admit everything")
    lat = sorted(x for r in results for x in r["lat"])
    return {
        "per_s": round(len(lat) / seconds),
        "p50_us": round(_percentile(lat, 0.50) * 1e6, 1),
        "p99_us": round(_percentile(lat, 0.99) * 1e6, 1),
        "max_us": round(lat[-1] * 1e6, 1),
        "requests": len(lat),
        "daemon_cpu_us_per_request": round(cpu / len(lat) * 1e6, 1),
    }


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"governor serve exited with {proc.returncode}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise SystemExit("governor serve did not create its socket")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "exim_socket.json"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="gov-bench-", dir="/tmp")  # short: unix socket paths <= 107 bytes
    try:
        with RedisProc() as redis_proc:
            cfg = Path(work) / "governor.yaml"
            cfg.write_text(CONFIG.format(url=redis_proc.url, dir=work))
            daemon = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--config", str(cfg), "--foreground"],
                                      cwd=ROOT)
            try:
                path = f"{work}/exim.sock"
                _wait_for(path, daemon)
                run_round(path, 1, 0.5, daemon.pid)  # warm-up: Redis connection, scripts, caches
                rounds = [run_round(path, args.clients, args.seconds, daemon.pid) for _ in range(args.rounds)]
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(15)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = sorted(rounds, key=lambda r: r["per_s"])[len(rounds) // 2]
    result = {
        "per_s": best["per_s"], "p50_us": best["p50_us"], "p99_us": best["p99_us"], "max_us": best["max_us"],
        "daemon_cpu_us_per_request": best["daemon_cpu_us_per_request"],
        "clients": args.clients, "seconds": args.seconds, "request": REQUEST.decode().strip(),
        "rounds": [{k: r[k] for k in ("per_s", "p50_us", "p99_us")} for r in rounds],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    print(f"{'round':>5} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'max us':>9} {'daemon cpu us/req':>18}")
    for i, r in enumerate(rounds, 1):
        mark = " *" if r is best else ""
        print(f"{i:>5} {r['per_s']:>8} {r['p50_us']:>8} {r['p99_us']:>8} {r['max_us']:>9} "
              f"{r['daemon_cpu_us_per_request']:>18}{mark}")
    print(f"median round (*): {result['per_s']} requests/s, p50 {result['p50_us']} us, p99 {result['p99_us']} us "
          f"({args.clients} clients, one connection per request)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
