"""Intra-op threads on a shared CPU: the default run's epoch time with 1 vs N torch threads, alone and next to
deliberate CPU-bound competitors (busy-loop processes started and stopped by this script).

    python benchmarks/threads_contention.py                     # threads 1 and 2, 0 and 2 competitors
    python benchmarks/threads_contention.py --threads 1 2 --competitors 0 1 2 --repeats 2

Each measurement is one `firefly train fashion-vgg-firefly` epoch without growth on a training subset
(`--subset`, default 4,000 images = 32 batches), in a fresh process; the number reported is the training
epoch's own time from `metrics.jsonl` (start-up and evaluation excluded). Conditions are interleaved so a
drift in other jobs' load spreads over all of them. Results go to stdout as a markdown table and, with
`--json`, to a file. Other jobs on the machine are not controlled: the 1-minute load average before each
measurement is printed next to it, and the numbers are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True:\n    pass\n"


def one_epoch(threads: int, subset: int, out: Path) -> float:
    """Seconds of one training epoch (no growth) with `threads` intra-op threads."""
    cmd = [
        sys.executable,
        "-m",
        "firefly_descent.cli",
        "train",
        "fashion-vgg-firefly",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.epochs=1",
        "--set",
        f"data.train_subset={subset}",
        "--set",
        "data.test_subset=500",
        "--set",
        f"train.threads={threads}",
        "--set",
        "train.tensorboard=false",
        "--set",
        "growth.method=static",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return float(row["epoch_time"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        for rep in range(args.repeats):
            for comp in args.competitors:
                for threads in args.threads:
                    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(comp)]
                    try:
                        time.sleep(1.0 if comp else 0.0)
                        load = os.getloadavg()[0]
                        i += 1
                        secs = one_epoch(threads, args.subset, Path(tmp) / f"r{i}")
                    finally:
                        for p in procs:
                            p.kill()
                            p.wait()
                    row = {"repeat": rep, "competitors": comp, "threads": threads, "load_before": load, "epoch_s": secs}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    batches = -(-args.subset // 128)
    print(f"\n| competitors | threads | epoch (s, {batches} batches) | ms/batch | load before |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        ms = 1000 * r["epoch_s"] / batches
        print(f"| {r['competitors']} | {r['threads']} | {r['epoch_s']:.1f} | {ms:.0f} | {r['load_before']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
