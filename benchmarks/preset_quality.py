"""Firefly presets side by side on real data: growth time ÷ training epoch, and test accuracy right after
growth and after a short fine-tune at a lower learning rate (issue 3's default-vs-paper-code target).

Fashion-MNIST subset, VGG-11 (BN, 1x1-conv classifier) at width 8: train, grow once with each preset from the
same checkpoint, fine-tune one epoch, evaluate. Several seeds; results to benchmarks/results/preset_quality.json.

    python benchmarks/preset_quality.py --seeds 0 1 --train-subset 5000 --pre-epochs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from firefly_descent.data import load_dataset, make_loaders
from firefly_descent.methods import Firefly
from firefly_descent.models import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from growth_cost import train_epoch as epoch  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "none": None,  # no growth: the fine-tune reference
    "default": {},
    "paper-code": {"preset": "paper-code"},
    "long": {"step_one_steps": 40, "sample_size": None, "score_batches": 8},
}


def accuracy(model, loader) -> float:
    model.eval()
    c = n = 0
    with torch.no_grad():
        for x, y in loader:
            c += (model(x).argmax(1) == y).sum().item()
            n += y.numel()
    return c / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--pre-epochs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/preset_quality.json")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        bundle = load_dataset("fashion-mnist", train_subset=args.train_subset, test_subset=2000, seed=seed)
        train, _, test = make_loaders(bundle, batch_size=128, seed=seed)
        base = build_model("vgg11", in_channels=1, num_classes=10, widths=8, input_size=28)
        opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        for _ in range(args.pre_epochs):
            t_epoch = epoch(base, opt, train)
        acc0 = accuracy(base, test)
        for name in args.variants:
            model = copy.deepcopy(base)
            o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
            o.load_state_dict(opt.state_dict())
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            kwargs = VARIANTS[name]
            rep = None
            if kwargs is not None:
                rep = Firefly(seed=seed, **kwargs).grow(model, train, F.cross_entropy, optimizer=o)
            grow_s = time.perf_counter() - t0
            acc_grown = accuracy(model, test)
            for g in o.param_groups:  # short fine-tune at a lower rate: growth, not SGD noise, should decide
                g["lr"] = args.finetune_lr
            accs = []
            for _ in range(args.finetune_epochs):
                epoch(model, o, train)
                accs.append(accuracy(model, test))
            acc_ft = accs[-1]
            row = dict(
                seed=seed,
                variant=name,
                epoch_s=t_epoch,
                growth_s=grow_s,
                growth_over_epoch=grow_s / t_epoch,
                acc_before=acc0,
                acc_after_growth=acc_grown,
                acc_after_finetune=acc_ft,
                finetune_curve=accs,
                params_after=sum(p.numel() for p in model.parameters()),
                loss_before=rep.loss_before if rep else None,
                loss_after=rep.loss_after if rep else None,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "command": "python " + " ".join(sys.argv),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"),
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
