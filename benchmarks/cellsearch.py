"""Cell search at CPU scale: Firefly cell growth vs DARTS (first order) vs random search, same harness.

Each method searches with the same budget (passes over the same training split at the same search size),
every found genotype is evaluated by the same protocol (trained from scratch, tested on the test split),
per seed. Runs go through `firefly_descent.search.run_search`, so an interrupted benchmark continues
where it stopped when rerun with the same arguments. Writes `benchmarks/results/cellsearch/<preset>.json`
and prints a markdown table.

    python benchmarks/cellsearch.py --preset cpu --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from firefly_descent.search import run_search

PRESETS: dict[str, dict[str, Any]] = {
    # Fashion-MNIST slice: 400 training images split 200 (weights) / 200 (validation), 500 test images;
    # a 4-node DARTS cell at C = 4 in 3 cells for the search, the same genotype at C = 8 in 3 cells for evaluation
    "cpu": {
        "space": {"C": 4, "layers": 3, "steps": 4},
        "data": {"name": "fashion-mnist", "train_subset": 400, "test_subset": 500, "val_fraction": 0.5,
                 "batch_size": 50, "augment": None},
        "budget": {"epochs": 4},
        "eval": {"epochs": 6, "C": 8, "layers": 3, "drop_path_prob": 0.1, "batch_size": 50},
        "threads": 1,
    },
    "smoke": {
        "space": {"C": 4, "layers": 3, "steps": 2},
        "data": {"name": "digits", "train_subset": 128, "test_subset": 64, "val_fraction": 0.5, "batch_size": 32,
                 "augment": None},
        "budget": {"epochs": 2},
        "eval": {"epochs": 1, "C": 4, "layers": 3},
        "threads": 1,
    },
}
METHODS: dict[str, dict[str, Any]] = {
    "firefly": {"name": "firefly", "kwargs": {"rounds": 2, "max_edges": 4, "budget": 0.5, "points": 2,
                                              "score_batches": 2, "step_one_batches": 4}},
    "firefly-edges": {"name": "firefly", "kwargs": {"rounds": 2, "max_edges": 4, "budget": 0.5, "points": 2,
                                                    "score_batches": 2, "step_one_batches": 4, "kinds": ["edges"]}},
    "firefly-score": {"name": "firefly", "kwargs": {"rounds": 2, "max_edges": 4, "budget": 0.5, "points": 2,
                                                    "score_batches": 2, "step_one_batches": 4, "rank": "score"}},
    "darts": {"name": "darts", "kwargs": {"order": 1}},
    "random": {"name": "random", "kwargs": {"trials": 2}},
    # random search given about Firefly's measured CPU cost on the cpu preset (~7x the epochs at search size)
    "random-cpu": {"name": "random", "kwargs": {"trials": 14}, "budget": {"epochs": 28}},
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["firefly", "darts", "random"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cellsearch"))
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: tabulate the (method, seed) searches already finished in --runs")
    p.add_argument("--runs", type=Path, default=Path("runs/cellsearch"), help="search run folders (not committed)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    rows = []
    for seed in args.seeds:  # seed by seed, so that an interrupted benchmark has paired results
        for name in args.methods:
            method = {"name": METHODS[name]["name"], "kwargs": dict(METHODS[name]["kwargs"])}
            budget = METHODS[name].get("budget", preset["budget"])
            epochs = budget["epochs"]  # fit the schedule into short presets
            if "rounds" in method["kwargs"]:
                method["kwargs"]["rounds"] = min(method["kwargs"]["rounds"], epochs - 1)
            if "trials" in method["kwargs"]:
                method["kwargs"]["trials"] = min(method["kwargs"]["trials"], epochs)
            cfg = {"name": f"{args.preset}-{name}", "method": method, "seeds": [seed], **preset, "budget": budget}
            folder = args.runs / args.preset / f"{name}-seed{seed}"
            if args.collect_only:
                done = folder / f"seed-{seed}" / "result.json"
                results = [json.loads(done.read_text())] if done.exists() else []
            else:
                results = run_search(cfg, folder, progress=True)["results"]
            for r in results:
                keys = ("method", "seed", "search_cpu_hours", "search_wall_hours", "eval_params", "test_error",
                        "genotype", "threads")
                rows.append({"variant": name} | {k: r[k] for k in keys})
    table = ["| method | seeds | search cost (CPU-hours, mean) | params (eval net) | test error (%) mean ± sd | "
             "per seed (%) |", "|---|---|---:|---:|---:|---|"]
    for name in args.methods:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            table.append(f"| {name} | 0 | not run | | | |")
            continue
        errs = [100 * r["test_error"] for r in rs]
        sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
        table.append(
            f"| {name} | {len(rs)} | {statistics.mean(r['search_cpu_hours'] for r in rs):.4f} | "
            f"{statistics.mean(r['eval_params'] for r in rs):,.0f} | {statistics.mean(errs):.2f} ± {sd:.2f} | "
            + ", ".join(f"{e:.2f}" for e in errs) + " |"
        )
    record = {
        "command": "python " + " ".join(["benchmarks/cellsearch.py", *sys.argv[1:]]) if argv is None else argv,
        "commit": _commit(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "preset": {"name": args.preset, **preset, "methods": {m: METHODS[m] for m in args.methods}},
        "rows": rows,
        "table": "\n".join(table),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.preset}.json").write_text(json.dumps(record, indent=1))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
