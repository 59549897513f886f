"""One growth step on suite B's setup: how much does each grower lower the loss, on its growth batches and
on held-out data?

MNIST-1D (generated locally, 4000 train / 1000 test), MLP 40 -> 16 -> 16 -> 10, Adam 3e-3 for `--epochs`
epochs (suite B grows first after epoch 12), then one growth step per method from the same weights with the
same 16 growth batches of 128 training samples and budget 0.35. Reported per method, mean ± std over seeds:
the loss change on the growth batches (in-sample: what TINY's line search optimises) and on the test set
(held-out), and the parameters added. Accuracy numbers, not timings.

    PYTHONPATH=src python benchmarks/tiny_growth_step.py --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from firefly_descent.data.synthetic import make_mnist1d
from firefly_descent.methods import make_grower
from firefly_descent.methods.base import mean_loss
from firefly_descent.models.mlp import MLP

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-no-update": ("tiny", {"update_existing": False}),
    "tiny-no-update-holdout4": ("tiny", {"update_existing": False, "holdout": 4}),
    "tiny-update-existing": ("tiny", {"update_existing": True}),  # the default
    "tiny-update-existing-holdout4": ("tiny", {"update_existing": True, "holdout": 4}),
    "tiny-random-directions": ("tiny", {"update_existing": False, "random_directions": True}),
    "random": ("random", {}),
    "gradmax": ("gradmax", {}),
    "firefly": ("firefly", {}),
}


def run(seed: int, epochs: int, methods: list[str]) -> dict[str, dict[str, float]]:
    d = make_mnist1d()
    xtr, ytr, xte, yte = d["train_x"], d["train_y"], d["test_x"], d["test_y"]
    torch.manual_seed(seed)
    model = MLP(40, [16, 16], 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    perm = torch.randperm(len(ytr), generator=g)[:16 * 128]
    batches = [(xtr[perm[i:i + 128]], ytr[perm[i:i + 128]]) for i in range(0, len(perm), 128)]
    test = [(xte, yte)]
    base_test = mean_loss(model, test, F.cross_entropy)
    out = {}
    for name in methods:
        method, kw = METHODS[name]
        m = copy.deepcopy(model)
        common = {} if method == "firefly" else {"seed": seed, "batches": 16}  # firefly: its default preset
        grower = make_grower(method, budget=0.35, **common, **kw)
        report = grower.grow(m, batches, F.cross_entropy)
        out[name] = {
            "growth_batches": float(report.loss_after - report.loss_before),
            "held_out": mean_loss(m, test, F.cross_entropy) - base_test,
            "params_added": float(report.params_after - report.params_before),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = a.methods.split(",")
    rows = [run(s, a.epochs, methods) for s in range(a.seeds)]
    print(f"{'method':<24} {'growth-batch dL':>20} {'held-out dL':>20} {'params added':>14}")
    for name in methods:
        cols = []
        for k in ("growth_batches", "held_out", "params_added"):
            v = [r[name][k] for r in rows]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cols.append(f"{statistics.mean(v):+.4f} ± {sd:.4f}" if k != "params_added" else f"{statistics.mean(v):.0f}")
        print(f"{name:<24} {cols[0]:>20} {cols[1]:>20} {cols[2]:>14}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"epochs": a.epochs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
