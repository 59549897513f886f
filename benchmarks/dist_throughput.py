"""Training throughput of N gloo (or nccl) processes against one process, same config, back to back.

Each mode runs the real CLI on the same config in a fresh run directory:

* ``single``: ``firefly train CONFIG`` (no torch.distributed);
* ``N`` for each N in ``--nprocs``: ``firefly train CONFIG --nproc N`` (torchrun launcher, DDP, global batch
  ``data.batch_size`` split over the N ranks).

Images/s is the training set size over the median per-epoch training time (rank 0's ``epoch_time`` in
metrics.jsonl, which covers the all-reduces), skipping the first epoch (warm-up). Growth is switched off
(``growth.method=static``, no schedule) unless ``--with-growth``, so the numbers measure training alone. The wall time
of the whole command (interpreter and process-group start-up included) is reported too.

    python benchmarks/dist_throughput.py digits-mlp-firefly --nprocs 2 --set train.epochs=4
    python benchmarks/dist_throughput.py fashion-vgg-firefly --nprocs 2 --set train.epochs=3 \\
        --set data.train_subset=10000 --out benchmarks/results/dist_throughput.json

On a CPU machine every rank uses one thread (torchrun sets OMP_NUM_THREADS=1 for N > 1), so compare against
``single`` run with ``--set train.threads=1`` as well as with the default threads. Numbers measured while
other jobs share the CPUs are not throughput numbers; say so next to any you record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run_mode(config: str, overrides: list[str], nproc: int | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "firefly_descent.cli", "train", config, "--out", str(out), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = (out / "train.log").read_text().splitlines()[0]
    m = re.search(r"\((\d+) train\)", first)
    n_train = int(m.group(1)) if m else 0
    times = [r["epoch_time"] for r in rows[1:]] or [r["epoch_time"] for r in rows]
    med = statistics.median(times)
    return {
        "mode": "single" if nproc is None else f"{nproc} processes",
        "nproc": nproc or 1,
        "train_images": n_train,
        "epochs": len(rows),
        "median_epoch_s": med,
        "images_per_s": n_train / med if med > 0 else None,
        "wall_s": wall,
        "final_test_acc": rows[-1].get("test_acc"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    ap.add_argument("--nprocs", default="2", help="comma-separated process counts, e.g. 1,2")
    ap.add_argument("--with-growth", action="store_true", help="keep the config's growth schedule")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()

    overrides = list(args.overrides) + ["train.tensorboard=false"]
    if not args.with_growth:
        overrides += ["growth.method=static", "growth.at=null", "growth.every=null", "growth.warmup_epochs=null"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        modes: list[int | None] = [None] + [int(n) for n in args.nprocs.split(",") if n.strip()]
        for i, nproc in enumerate(modes):
            results.append(_run_mode(args.config, overrides, nproc, Path(tmp) / f"run{i}"))
    base = results[0]["images_per_s"] or 0.0
    print(f"config {args.config} {' '.join(args.overrides)} (cpus: {os.cpu_count()})")
    print("| mode | images/s | vs single | median epoch s | wall s | final test acc |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = (r["images_per_s"] / base) if base else float("nan")
        acc = r["final_test_acc"]
        print(
            f"| {r['mode']} | {r['images_per_s']:.0f} | {ratio:.2f}x | {r['median_epoch_s']:.2f} | "
            f"{r['wall_s']:.0f} | {acc if acc is None else f'{acc:.2%}'} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": args.config, "overrides": args.overrides, "results": results}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
