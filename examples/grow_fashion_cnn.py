"""Drop Firefly into a plain PyTorch training loop: grow a small CNN on Fashion-MNIST every few epochs.

    python examples/grow_fashion_cnn.py            # ~3 minutes on 2 CPU cores
    python examples/grow_fashion_cnn.py --epochs 9 --train-subset 60000

Reads Fashion-MNIST offline (Debian's `dataset-fashion-mnist`, $FIREFLY_DATA_DIR or ./data), else downloads it
once with torchvision into ~/.cache/firefly-descent.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from firefly_descent.data import load_dataset, make_loaders
from firefly_descent.methods import Firefly
from firefly_descent.models import build_model


def evaluate(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += y.numel()
    return correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--grow-every", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_dataset("fashion-mnist", train_subset=args.train_subset, test_subset=2000, seed=args.seed)
    train_loader, _, test_loader = make_loaders(bundle, batch_size=128, seed=args.seed)
    model = build_model("vgg11", in_channels=1, num_classes=10, widths=args.width, input_size=28).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    grower = Firefly(budget=0.35)  # grow 35 % of the current units per step, one global pool

    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        acc = evaluate(model, test_loader, device)
        params = sum(p.numel() for p in model.parameters())
        print(f"epoch {epoch}: test acc {acc:.4f}, {params:,} params, {time.perf_counter() - t0:.1f}s")
        if epoch % args.grow_every == 0 and epoch < args.epochs:
            # the grower edits `model` in place, remaps the optimizer's parameters and state, and leaves
            # BatchNorm ready to train (running statistics refreshed). Firefly's default bn_mode="batch" scored
            # its candidates with batch statistics, the mode training continues in, so the new units' BatchNorm
            # channels need no calibration (bn_mode="frozen" calibrates them inside `grow`): nothing to do here
            report = grower.grow(model, train_loader, F.cross_entropy, optimizer=optimizer)
            print(report)


if __name__ == "__main__":
    main()
