"""Benchmark: how fast real MTAs drain a Yahoo-bound backlog, and what "Yahoo" says about it.

Five contenders, each from a clean state (fresh simulator, fresh Redis, empty queue),
one after the other on the same machine (governor/lab/contenders.py):

    postfix_plain     plain Postfix, per-IP transports, Debian defaults (concurrency 20)
    postfix_static    the static recipe: per-IP transports, concurrency_limit 5, rate_delay 1s
    postfix_governor  Postfix + governor (slot transports, serve, milter, queue agent)
    exim_governor     Exim + governor (generated snippets, serve)
    exim_plain        plain Exim, random per-IP interface, Debian-like defaults

Workload: N one-recipient messages (80 % to yahoo.com, aol.com, att.net, ymail.com,
sbcglobal.net; 20 % to example.org/.net, which go to an unthrottled sink), injected
over SMTP as fast as the MTA accepts; 4 egress IPs 127.0.0.2-5. The simulator allows
5 connections and 100 messages per "Yahoo minute" per IP; over-limit attempts get
TSS04 and start a penalty window, the 20th violation of an IP is answered with TS02
and the 50th with TS03 (sticky). Time is compressed the same way for everyone (printed
at the start; see Timing in governor/lab/contenders.py).

Scenarios: ``smoke`` (all four IPs clean) and ``ts03`` (127.0.0.5 TS03-blocked from the
start: ideal computed for 3 IPs; connections to the blocked IP are counted).

Prints a table, writes bench/results/drain.json (drain_ts03.json for --scenario ts03)
and a PNG of delivered Yahoo messages over time per contender with the ideal line:

    {"scenario": ..., "timing": {...}, "contenders": {"postfix_governor": {"ratio_to_ideal": ...,
     "tss04": ..., "ts02": ..., "ts03": ..., "lost": ..., "non_yahoo_drain_s": ..., ...}, ...}}

    .venv/bin/python bench/drain.py [--quick] [--scenario smoke|ts03] [--contenders a,b] [--messages N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from governor.lab.contenders import (  # noqa: E402
    NAMES, POOL, Run, Timing, drain, fresh_workdir, make, problem, remove_workdir, workload,
)

BLOCKED = POOL[3]


def ideal_seconds(yahoo: int, ips: int, timing: Timing) -> float:
    """Yahoo messages ÷ (IPs × allowed rate)."""
    return yahoo / (ips * timing.per_ip_per_second)


def measures(run: Run, ideal: float, blocked: str | None) -> dict[str, Any]:
    """The per-contender figures the JSON and the table show."""
    ips = run.stats.get("ips", {})
    replies: dict[str, int] = {}
    for s in ips.values():
        for code, n in s["replies"].items():
            replies[code] = replies.get(code, 0) + n
    yahoo = sum(s["recipients"] for s in ips.values())
    other = run.stats.get("sink", {}).get("total", {}).get("recipients", 0)
    lasts = [s["last_accept"] for s in ips.values() if s.get("last_accept")]
    yahoo_s = round(max(lasts) - run.t0, 2) if yahoo >= run.want[0] and lasts else None
    other_s = next((t for t, _, o in run.curve if o >= run.want[1]), None) if run.want[1] else 0.0
    delivered = yahoo + other
    out: dict[str, Any] = {
        "label": run.label,
        "ratio_to_ideal": round(yahoo_s / ideal, 3) if yahoo_s is not None else None,
        "yahoo_drain_s": yahoo_s,
        "non_yahoo_drain_s": other_s,
        "tss04": replies.get("TSS04", 0),
        "ts02": replies.get("TS02", 0),
        "ts03": replies.get("TS03", 0),
        "replies": {k: v for k, v in sorted(replies.items()) if v},
        "tss04_per_ip": {ip: s["replies"].get("TSS04", 0) for ip, s in ips.items()},
        "max_concurrency_per_ip": {ip: s["concurrency_hwm"] for ip, s in ips.items()},
        "connections_per_ip": {ip: s["connections"] for ip, s in ips.items()},
        "delivered_yahoo": yahoo,
        "delivered_other": other,
        "injected": run.accepted,
        "lost": max(0, run.accepted - min(delivered, run.accepted) - run.queued - run.bounced),
        "duplicates": max(0, delivered - run.accepted),
        "bounced": run.bounced,
        "still_queued": run.queued,
        "timed_out": run.timed_out,
        "inject_s": round(run.inject_s, 2),
        "curve": thin(run.curve),
    }
    if blocked:
        out["blocked_ip_connections"] = ips.get(blocked, {}).get("connections", 0)
    if run.error:
        out["error"] = run.error
    return out


def thin(curve: list[tuple[float, int, int]], step: float = 1.0) -> list[list[float]]:
    """About one sample per ``step`` seconds (and the last one) for the JSON."""
    out: list[list[float]] = []
    for t, y, o in curve:
        if not out or t - out[-1][0] >= step:
            out.append([t, y, o])
    if curve and out[-1][0] != curve[-1][0]:
        out.append(list(curve[-1]))
    return out


def fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, dict[str, Any]], ideal: float, limit: float) -> str:
    cols = ("contender", "Yahoo s", "ratio", "other s", "TSS04", "TS02", "TS03", "max conc", "lost",
            "bounced", "queued", "blocked-IP conns")
    rows = [cols]
    for m in results.values():
        yahoo = fmt(m["yahoo_drain_s"], ".1f") if not m["timed_out"] else f">{limit:.0f} ({m['delivered_yahoo']})"
        rows.append((m["label"], yahoo, fmt(m["ratio_to_ideal"], ".2f"), fmt(m["non_yahoo_drain_s"], ".1f"),
                     str(m["tss04"]), str(m["ts02"]), str(m["ts03"]),
                     "/".join(str(v) for v in m["max_concurrency_per_ip"].values()) or "-",
                     str(m["lost"]), str(m["bounced"]), str(m["still_queued"]),
                     str(m.get("blocked_ip_connections", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"ideal Yahoo drain {ideal:.1f}s; Yahoo s = injection start to last Yahoo delivery "
                 f"(\">limit (delivered)\": not drained within the limit)")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], ideal: float, want: int, path: Path, title: str) -> None:
    """Delivered Yahoo messages over time per contender, with the ideal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, m in results.items():
        xs = [p[0] for p in m["curve"]]
        ys = [p[1] for p in m["curve"]]
        ax.plot(xs, ys, label=m["label"], linewidth=2 if "governor" in name else 1.2)
    ax.plot([0, ideal, max([ideal] + [m["curve"][-1][0] for m in results.values() if m["curve"]])],
            [0, want, want], "k--", linewidth=1, label="ideal (all allowed rate)")
    ax.set_xlabel("seconds since injection started")
    ax.set_ylabel("Yahoo messages delivered")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 messages instead of 5000")
    ap.add_argument("--messages", type=int, help="number of messages (overrides --quick)")
    ap.add_argument("--scenario", choices=("smoke", "ts03"), default="smoke")
    ap.add_argument("--contenders", default=",".join(NAMES), help=f"comma list of {', '.join(NAMES)}")
    ap.add_argument("--time-limit", type=float, help="seconds per contender (default 2.5 x ideal + 30)")
    ap.add_argument("--rate-scale", type=float, default=Timing.rate_scale,
                    help="Yahoo minute = 60/RATE_SCALE seconds (default %(default)g)")
    ap.add_argument("--out", help="JSON path (default bench/results/drain.json, drain_ts03.json)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        print(f"drain.py: unknown contender(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(NAMES)}",
              file=sys.stderr)
        return 2
    for n in names:
        why = problem(n)
        if why:
            print(f"drain.py: {n} cannot run here: {why}", file=sys.stderr)
            return 1

    n_msgs = args.messages or (1000 if args.quick else 5000)
    timing = Timing(rate_scale=args.rate_scale)
    messages = workload(n_msgs)
    want = sum(1 for _, r in messages if r[0].rpartition("@")[2] not in ("example.org", "example.net"))
    blocked = BLOCKED if args.scenario == "ts03" else None
    ips = len(POOL) - (1 if blocked else 0)
    ideal = ideal_seconds(want, ips, timing)
    limit = args.time_limit or 2.5 * ideal + 30
    suffix = "" if args.scenario == "smoke" else f"_{args.scenario}"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"drain{suffix}.json"

    print(f"scenario {args.scenario}: {n_msgs} messages ({want} Yahoo, {n_msgs - want} other), {len(POOL)} IPs"
          + (f", {blocked} TS03-blocked from the start" if blocked else ""))
    print(f"time: one Yahoo minute = {timing.rate_window:g}s; simulator per IP {timing.yahoo_conn} concurrent, "
          f"{timing.yahoo_rate} per {timing.rate_window:g}s, TSS04 penalty {timing.penalty / timing.rate_scale:g}s, "
          f"TS02 at violation {timing.ts02_after}, TS03 at {timing.ts03_after}")
    print(f"governor: {timing.yahoo_rate * timing.rate_scale:g} msgs/min per IP, time_scale "
          f"{timing.governor_time_scale}; retry timers x{timing.retry_scale:.4f}: Postfix "
          f"{timing.postfix_timers()}, Exim retry '{timing.exim_retry()}', Exim queue runner 1s")
    print(f"ideal Yahoo drain {ideal:.1f}s ({ips} IPs); limit per contender {limit:.0f}s; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    started = time.time()
    for name in names:
        work = fresh_workdir(name)
        try:
            run = drain(make(name, timing, work), messages, limit=limit, block=blocked)
        finally:
            remove_workdir(work)
        results[name] = measures(run, ideal, blocked)
        m = results[name]
        print(f"  {name}: Yahoo {m['delivered_yahoo']}/{want} in {fmt(m['yahoo_drain_s'], '.1f')}s, other "
              f"{m['delivered_other']}/{n_msgs - want} in {fmt(m['non_yahoo_drain_s'], '.1f')}s, "
              f"TSS04 {m['tss04']} TS02 {m['ts02']} TS03 {m['ts03']}, lost {m['lost']}"
              + (f"  ERROR {m['error']}" if "error" in m else ""), flush=True)

    print()
    print(table(results, ideal, limit))
    result = {
        "scenario": args.scenario, "messages": n_msgs, "yahoo_messages": want, "other_messages": n_msgs - want,
        "ips": ips, "blocked_ip": blocked, "ideal_s": round(ideal, 2), "limit_s": round(limit, 1),
        "timing": timing.describe(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "python": platform.python_version(), "wall_s": round(time.time() - started, 1),
        "contenders": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot(results, ideal, want, png, f"{n_msgs} messages, scenario {args.scenario}: Yahoo part delivered")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
