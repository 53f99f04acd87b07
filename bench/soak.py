"""Soak test of the scoring endpoint: N clients for M minutes against one server.

Drives the real server (a subprocess, real HTTP) minute by minute with the same
client as serve_load.py and reports, per minute, requests/s, errors, p50/p99
latency and the server's resident memory. It passes when there are no errors,
the last minute's p99 is within 20% of the first minute's, and the server's RSS
grew by less than 10% from the end of the first minute to the end of the last.

    python bench/soak.py --export artifacts/export --clients 32 --minutes 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import drive, load_items, machine, run_loop, start, stop  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default="artifacts/export")
    ap.add_argument("--prompts", default="artifacts/data/eval_prompts.jsonl")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--window-seconds", type=float, default=60.0, help="Length of one reported 'minute' (tests shorten it).")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()
    items = load_items(Path(args.prompts), "")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(str(Path(args.export).resolve()), "onnx", Path(tmp))
        try:
            minutes = []
            for m in range(args.minutes):
                row = run_loop(drive(url, items, args.clients, args.window_seconds))
                row |= {"minute": m + 1, "server_rss_mb": rss_mb(proc.pid)}
                minutes.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop(proc)
    first, last = minutes[0], minutes[-1]
    verdict = {
        "errors": sum(r["errors"] for r in minutes),
        "requests": sum(r["requests"] for r in minutes),
        "p99_last_over_first": round(last["p99_ms"] / first["p99_ms"], 3),
        "rss_growth": round(last["server_rss_mb"] / first["server_rss_mb"] - 1, 4),
    }
    verdict["passed"] = verdict["errors"] == 0 and verdict["p99_last_over_first"] <= 1.2 and verdict["rss_growth"] < 0.10
    out = {"date": dt.date.today().isoformat(), "machine": machine(), "clients": args.clients, "minutes": minutes, **verdict}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(verdict))
    sys.exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
    main()
