"""A small ViT on Fashion-MNIST grown from a narrow, shallow start: Firefly, random new units, Net2Net,
static small and static full, with paired seeds (every method sees the same seeds, data and schedule).

Resumable: finished runs are read back from the results file, an interrupted run resumes from its last
checkpoint. The results file records the exact command.

    python benchmarks/vit_fmnist.py --seeds 0,1 --epochs 6 --out benchmarks/results/vit_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from firefly_descent.train import list_checkpoints, train

NARROW = {"d_model": 16, "depth": 1, "num_heads": 2, "mlp_hidden": 16, "patch_size": 7}
FULL = {"d_model": 16, "depth": 1, "num_heads": 2, "mlp_hidden": 64, "patch_size": 7}
METHODS = {
    "firefly": ("firefly", NARROW),
    "random": ("random", NARROW),
    "net2net": ("net2net", NARROW),
    "static-small": ("static", NARROW),
    "static-full": ("static", FULL),
}


def config(method: str, model_kwargs: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    growth: dict[str, Any] = {"method": method}
    if method != "static":
        growth.update({"kwargs": {"budget": args.budget}, "at": list(range(2, args.epochs, 2))})
    return {
        "data": {
            "name": "fashion-mnist",
            "root": args.data_root,
            "train_subset": args.train_subset,
            "test_subset": args.test_subset,
            "batch_size": 128,
            "eval_batch_size": 500,
            "augment": None,
        },
        "model": {"name": "transformer", "kwargs": dict(model_kwargs)},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "restart_after_growth": False},
        "growth": growth,
        "train": {"epochs": args.epochs, "seed": seed},
        "checkpoint": {"keep_last": 1},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--train-subset", type=int, default=6000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--runs", default="runs/vit_fmnist", help="run directories (checkpoints; not committed)")
    p.add_argument("--out", default="benchmarks/results/vit_fmnist.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["command"] = "python benchmarks/vit_fmnist.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs = results.setdefault("runs", {})
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.methods.split(","):
            key = f"{name}/seed{seed}"
            if key in runs:
                continue
            method, kwargs = METHODS[name]
            run_dir = Path(args.runs) / name / f"seed{seed}"
            resume = run_dir.exists() and bool(list_checkpoints(run_dir))
            summary = train(config(method, kwargs, seed, args), run_dir, resume=resume, progress=False)
            runs[key] = {k: summary.get(k) for k in ("final_test_acc", "best_test_acc", "params", "num_growths")}
            print(key, runs[key], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
