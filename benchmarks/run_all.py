"""Run every benchmark, one after another (they share 2 cores: never in parallel), each writing its
section of docs/BENCHMARKS.md. `make bench` calls this.

    .venv/bin/python benchmarks/run_all.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_retrieval", "bench_generation", "bench_concurrency", "bench_tutor", "bench_leaderboard", "bench_finetune"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="names such as bench_retrieval")
    args = ap.parse_args()
    names = [n for n in ORDER if (HERE / f"{n}.py").exists() and (not args.only or n in args.only)]
    failed = []
    for name in names:
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py")])
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
