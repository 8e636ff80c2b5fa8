"""Cost of obd's read counters: a 4 KiB read straight from a source vs through ``CountingDevice``.

``CountingDevice`` (tcmu_overlaybd/stats/device.py) sits between the TCMU handler and
the image on every device read: counters, in-flight tracking and the latency
histogram of ``obd stats``.  The figure that matters is the added time per read
against the ~100k reads/s a warm cache serves.  Times best-of-N interleaved rounds
(a busy machine then only hides an overhead, never invents one), prints the
per-read times, the overhead and the ratio, and writes
``benchmarks/results/stats.json``.

Usage: .venv/bin/python benchmarks/bench_stats.py [--reads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcmu_overlaybd.block.source import BytesSource  # noqa: E402
from tcmu_overlaybd.stats.device import CountingDevice  # noqa: E402


def per_read(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn(4096, 4096)
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=2000, help="reads per round")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    src = BytesSource(bytes(1 << 20))
    dev = CountingDevice(src, slow_ms=1000)
    best = {"bare": float("inf"), "counted": float("inf")}
    for _ in range(args.rounds):
        best["bare"] = min(best["bare"], per_read(src.read, args.reads))
        best["counted"] = min(best["counted"], per_read(dev.read, args.reads))
    overhead = best["counted"] - best["bare"]
    result = {"python": platform.python_version(), "bare_us": best["bare"] * 1e6,
              "counted_us": best["counted"] * 1e6, "overhead_us": overhead * 1e6,
              "ratio_counted_to_bare": best["counted"] / best["bare"],
              "reads_counted": dev.snapshot().reads}
    print(f"4 KiB read from memory: bare {result['bare_us']:.2f} µs, through CountingDevice "
          f"{result['counted_us']:.2f} µs: +{result['overhead_us']:.2f} µs per read "
          f"({result['ratio_counted_to_bare']:.2f}x)")
    out = ROOT / "benchmarks" / "results" / "stats.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
