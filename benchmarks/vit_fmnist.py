"""A small ViT on Fashion-MNIST grown from a narrow, shallow start: Firefly (MLP width + whole heads + new
encoder blocks in one budget), random new units (MLP units and whole heads), Net2Net, static small and static
full, with paired seeds (every method sees the same seeds, data and schedule). Attention is `HeadAttention`
(heads a width of their own, `head_dim` 8), so heads grow without widening the LayerNorm'd stream.

Resumable: finished runs are read back from the results file, an interrupted run resumes from its last
checkpoint. The results file records the exact command.

    python benchmarks/vit_fmnist.py --seeds 0,1 --epochs 15 --at 3,6 --budget params:1650 --threads 1 \
        --out benchmarks/results/vit_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from firefly_descent.train import list_checkpoints, train

NARROW = {"d_model": 16, "depth": 1, "num_heads": 1, "head_dim": 8, "mlp_hidden": 16, "patch_size": 7}
FULL = {"d_model": 16, "depth": 2, "num_heads": 2, "head_dim": 8, "mlp_hidden": 32, "patch_size": 7}
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {  # grower, model, grower options
    "firefly": ("firefly", NARROW, {"candidates": "all"}),  # splits, new units, new heads, new blocks
    "random": ("random", NARROW, {}),
    "net2net": ("net2net", NARROW, {}),
    "static-small": ("static", NARROW, {}),
    "static-full": ("static", FULL, {}),
}


def config(
    method: str, model_kwargs: dict[str, Any], options: dict[str, Any], seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    growth: dict[str, Any] = {"method": method}
    if method != "static":
        growth.update({"kwargs": {"budget": args.budget, **options}, "at": [int(e) for e in args.at.split(",")]})
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
        "train": {"epochs": args.epochs, "seed": seed, "threads": args.threads},
        "checkpoint": {"keep_last": 1},
    }


def grown_shape(run_dir: Path) -> list[dict[str, Any]]:
    """Per growth step, what was added: units per group (split + new; a heads group counts units, head_dim
    per head) and the new layers, read from the run's growth.jsonl."""
    path = run_dir / "growth.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        units = dict(rec.get("units_added") or {})
        for g, n in (rec.get("units_split") or {}).items():
            units[g] = units.get(g, 0) + n
        out.append(
            {"units": units, "layers": rec.get("layers_inserted") or [], "params_after": rec.get("params_after")}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--budget", default="params:1650", help="per growth step (a new block costs ~1,160)")
    p.add_argument("--at", default="3,6", help="growth after these epochs")
    p.add_argument("--threads", type=int, default=1)
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
            method, kwargs, options = METHODS[name]
            run_dir = Path(args.runs) / name / f"seed{seed}"
            resume = run_dir.exists() and bool(list_checkpoints(run_dir))
            summary = train(config(method, kwargs, options, seed, args), run_dir, resume=resume, progress=False)
            runs[key] = {k: summary.get(k) for k in ("final_test_acc", "best_test_acc", "params", "num_growths")}
            runs[key]["grown"] = grown_shape(run_dir)
            print(key, runs[key], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
