"""Per-batch cost of the safeguard's held-out passes before and after a default Firefly step (issue 22).

On the `growth_cost.py` preset's model and batches: a training step, a no-grad forward in train and eval mode and
`safety.heldout_loss` in both modes, per 128-sample batch, on the model before growth and on the grown one (the
check runs on the grown network, whose compute the growth raised). Run it on a quiet machine:

    python benchmarks/check_cost.py --preset paper-vgg19
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from growth_cost import PRESETS, setup, train_epoch

from firefly_descent.methods import make_grower
from firefly_descent.methods.safety import heldout_loss


def per_batch(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: list, n: int = 8) -> dict[str, float]:
    out = {}
    model.train()
    t = time.perf_counter()
    for x, y in loader[:n]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out["train_step"] = (time.perf_counter() - t) / n
    for mode in (True, False):
        model.train(mode)
        t = time.perf_counter()
        with torch.no_grad():
            for x, y in loader[:n]:
                F.cross_entropy(model(x), y)
        out[f"forward_{'train' if mode else 'eval'}"] = (time.perf_counter() - t) / n
        t = time.perf_counter()
        heldout_loss(model, loader[n : n + 4], F.cross_entropy, mode)
        out[f"heldout_{'train' if mode else 'eval'}"] = (time.perf_counter() - t) / 4
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper-vgg19", choices=sorted(PRESETS))
    args = ap.parse_args()
    model, opt, loader, _ = setup(PRESETS[args.preset], 0)
    train_epoch(model, opt, loader[:3])  # warm-up
    for stage in ("before", "before"):
        print(stage, {k: round(v, 4) for k, v in per_batch(model, opt, loader).items()})
    report = make_grower("firefly").grow(model, loader, F.cross_entropy, optimizer=opt)
    print(f"grown {report.params_before} -> {report.params_after} parameters ({report.safety.outcome})")
    for stage in ("after", "after"):
        print(stage, {k: round(v, 4) for k, v in per_batch(model, opt, loader).items()})


if __name__ == "__main__":
    main()
