"""Pictures of what the governor did: per-IP rate, leases and cooldown bands over time.

Input is what ``governor status --json --watch`` prints: one JSON object per
egress IP per refresh (the store's status, with Redis time in ``now``). The
picture shows, per IP, the messages granted in the last minute against the rate
allowed (a cooldown drops the allowance to zero, the ramp brings it back), the
concurrency leases in use against the cap, and shaded bands while the IP was
cooling (orange) or held (red) — so an admin sees a cooldown and the ramp back.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Series:
    """One egress IP's samples, in time order."""

    t: list[float] = field(default_factory=list)
    rate_now: list[float] = field(default_factory=list)
    rate_allowed: list[float] = field(default_factory=list)
    leases: list[int] = field(default_factory=list)
    cap: list[int] = field(default_factory=list)
    cooling: list[bool] = field(default_factory=list)
    held: list[bool] = field(default_factory=list)


class ReportError(ValueError):
    """The snapshot input is unusable (names the line)."""


def read_snapshots(lines: Iterable[str], source: str = "<stdin>") -> dict[str, Series]:
    """Group status snapshots by IP; blank lines are skipped, bad ones name their line."""
    series: dict[str, Series] = defaultdict(Series)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row: dict[str, Any] = json.loads(line)
            s = series[row["ip"]]
            now = float(row["now"])
            s.t.append(now)
            s.rate_now.append(float(row["rate_now"]))
            cooling = float(row["cooldown_until"]) > now or float(row.get("provider_paused_until", 0)) > now
            held = bool(row["held"])
            s.rate_allowed.append(0.0 if cooling or held else float(row["rate_allowed"]))
            s.leases.append(int(row["leases"]))
            s.cap.append(int(row["concurrency"]))
            s.cooling.append(cooling)
            s.held.append(held)
        except (ValueError, KeyError, TypeError) as exc:
            raise ReportError(f"{source}:{n}: not a `governor status --json` line ({exc})") from None
    if not series:
        raise ReportError(f"{source}: no status snapshots found")
    return dict(series)


def _bands(ax: Any, t: list[float], flags: list[bool], color: str, label: str) -> None:
    start = None
    for i, on in enumerate(flags + [False]):
        if on and start is None:
            start = t[i]
        elif not on and start is not None:
            end = t[i] if i < len(t) else t[-1]
            ax.axvspan(start, end, color=color, alpha=0.25, label=label, lw=0)
            label = "_nolegend_"
            start = None


def draw_png(series: dict[str, Series], path: str | Path, title: str = "yahoo-governor") -> Path:
    """Render one row per IP: rate (granted vs allowed) and leases, with cooldown/hold bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ips = sorted(series)
    t0 = min(s.t[0] for s in series.values())
    fig, axes = plt.subplots(len(ips), 2, figsize=(12, 2.4 * len(ips) + 0.6), squeeze=False, sharex=True)
    for row, ip in enumerate(ips):
        s = series[ip]
        t = [x - t0 for x in s.t]
        rate_ax, lease_ax = axes[row]
        rate_ax.plot(t, s.rate_allowed, color="grey", ls="--", label="allowed/min")
        rate_ax.plot(t, s.rate_now, color="tab:blue", label="granted in last min")
        lease_ax.step(t, s.leases, where="post", color="tab:green", label="leases")
        lease_ax.step(t, s.cap, where="post", color="grey", ls="--", label="cap")
        for ax in (rate_ax, lease_ax):
            _bands(ax, t, s.cooling, "tab:orange", "cooling")
            _bands(ax, t, s.held, "tab:red", "held")
        rate_ax.set_ylabel(ip)
        if row == 0:
            rate_ax.set_title("messages per minute")
            lease_ax.set_title("concurrency")
            rate_ax.legend(loc="upper left", fontsize="small")
            lease_ax.legend(loc="upper left", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
