"""Benchmark the reply classifier: classifications per second on one core.

Classifies a mix of the corpus replies -- bare and inside the Postfix and Exim
wrappers -- in a loop for a few seconds, prints a small table and writes
bench/results/classify.json ({"per_s": ..., ...}).  Nothing is cached by input:
every call unwraps, matches and extracts from scratch.

    .venv/bin/python bench/classify.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from governor.classify import Classifier  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "yahoo_replies.tsv"
RESULTS = ROOT / "bench" / "results" / "classify.json"
TARGET_PER_S = 50_000

WRAPPERS = (
    "{r}",
    "host mta7.am0.yahoodns.net[67.195.204.72] said: {r} (in reply to MAIL FROM command)",
    "4.7.0 host 127.0.0.1[127.0.0.1] said: {r} (in reply to MAIL FROM command)",
    "host mta6.am0.yahoodns.net[98.136.96.91] refused to talk to me: {r}",
    "SMTP error from remote mail server after pipelined MAIL FROM:<bounce@example.org> SIZE=2353: {r}",
    "SMTP error from remote mail server after RCPT TO:<user@yahoo.com>: host mta5.am0.yahoodns.net [67.195.228.106]: {r}",
)


def replies() -> list[str]:
    """Every corpus reply, bare and in each wrapper (the mix an MTA feeds us)."""
    with CORPUS.open(encoding="utf-8", newline="") as fh:
        bare = [row["smtp_reply"] for row in csv.DictReader(fh, delimiter="\t")]
    return [w.format(r=r) for r in bare for w in WRAPPERS]


def run(seconds: float) -> dict[str, object]:
    """Classify the mix repeatedly for about ``seconds``; return the measurements."""
    classify = Classifier.default().classify  # table loaded before timing starts
    mix = replies()
    recognised = sum(classify(r).is_yahoo for r in mix)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for reply in mix:
            classify(reply)
        done += len(mix)
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    return {
        "per_s": round(done / elapsed, 1),
        "replies": done,
        "seconds": round(elapsed, 3),
        "mix_size": len(mix),
        "mix_recognised": recognised,
        "wrappers": len(WRAPPERS),
        "target_per_s": TARGET_PER_S,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to loop (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = run(args.seconds)
    print(f"{'replies':>10}  {'seconds':>8}  {'per_s':>10}")
    print(f"{result['replies']:>10}  {result['seconds']:>8.3f}  {result['per_s']:>10,.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0 if float(result["per_s"]) >= TARGET_PER_S else 1  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
