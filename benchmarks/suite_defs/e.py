"""Suite E and its variants: MobileNetV1 grown in width and depth from one block per stage (issue 13).

E runs on a CIFAR-10 subset (--cifar10 PATH), E-fmnist the same protocol on Fashion-MNIST, E-cifar100 the
paper-scale CIFAR-100 run (--cifar100 PATH; its full preset is for a GPU).
"""

from __future__ import annotations

import copy
from typing import Any

from ._shared import static_small
from ._spec import CIFAR10_ENV, CIFAR100_ENV, FASHION_ROOT, Method, Suite, dataset_root

# MobileNetV1 from one depthwise-separable block per stage and narrow widths (stem, then stages)
START = {"blocks": [1, 1, 1, 1, 1], "widths": [16, 16, 32, 32, 64, 64]}
FULL = {"blocks": [1, 2, 2, 6, 2], "width_multiplier": 0.25}  # MobileNetV1's 13-block layout at 1/4 width
BUDGET = "params:8000"  # each growth round may add this many parameters, for every method


def base(preset: str, dataset: str = "cifar10") -> dict[str, Any]:
    """Suite E: the paper's MobileNetV1 growth at CPU scale, from the shallow, narrow start `START`."""
    full = preset == "full"
    if dataset == "cifar10":
        root = dataset_root(
            CIFAR10_ENV,
            f"suite E needs the CIFAR-10 ImageFolder tree: pass --cifar10 PATH (or set {CIFAR10_ENV}); suite "
            "E-fmnist runs the same protocol on Fashion-MNIST",
        )
        data: dict[str, Any] = {"name": "imagefolder", "root": root}
        sizes = (2000, 2000) if full else (300, 300)
    elif dataset == "cifar100":
        root = dataset_root(
            CIFAR100_ENV, "suite E-cifar100 needs CIFAR-100 in torchvision's layout: pass --cifar100 PATH"
        )
        data = {"name": "cifar100", "root": root}
        sizes = (None, None) if full else (2000, 2000)
    else:
        data = {"name": "fashion-mnist", "root": FASHION_ROOT}
        sizes = (2000, 2000) if full else (300, 300)
    epochs, at = (6, [2, 4]) if full else (2, [1])
    if dataset == "cifar100" and full:  # the paper-scale run, for a GPU
        epochs, at = (160, [40, 80, 120])
    return {
        "data": {
            **data,
            "train_subset": sizes[0],
            "val_fraction": 0.1,
            "test_subset": sizes[1],
            "batch_size": 64 if dataset != "cifar100" or not full else 128,
            "eval_batch_size": 500,
        },
        "model": {"name": "mobilenetv1-stages", "kwargs": copy.deepcopy(START)},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        "growth": {"at": at, "refresh_bn": True, "refresh_bn_batches": 8, "data_batches": 8},
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


def methods(
    full: dict[str, Any] = FULL, full_note: str = "MobileNetV1's 13 blocks at 1/4 width, static"
) -> dict[str, Method]:
    """Issue 13's comparison: Firefly width + depth against width only, depth only and the baselines, every
    grower with the same parameter budget per round."""
    b = {"budget": BUDGET}
    return {
        "firefly-wd": Method(
            "firefly", {**b, "candidates": "all"}, note="width + depth: dwsep blocks compete with splits and new units"
        ),
        "firefly-width": Method("firefly", {**b, "candidates": "width"}, note="width only (splits + new units)"),
        "firefly-depth": Method("firefly", {**b, "candidates": "depth"}, note="depth only (new dwsep blocks)"),
        "firefly-width-exact": Method(
            "firefly",
            {**b, "candidates": "width", "exact_params": True},
            note="width only, selection trimmed to the exact parameter budget as firefly-wd's is",
        ),
        "splitting-fast": Method("splitting-fast", dict(b), note="Rayleigh-quotient descent (width)"),
        "net2net": Method(
            "net2net", {**b, "noise": 0.01, "deepen": True}, note="wider (random copies), deeper (one identity layer)"
        ),
        "random": Method("random", dict(b), note="random new units, zero outgoing weights"),
        "static-small": static_small(),
        "static-full": Method("static", kind="control", model=copy.deepcopy(full), note=full_note),
    }


DESCRIPTION = (
    "MobileNetV1 for 32x32 inputs started shallow and narrow: one depthwise-separable block per stage (5 blocks; "
    "stem 16, stages 16, 32, 32, 64, 64 channels), grown after epochs 2 and 4 of 6 with a budget of 8,000 "
    "parameters per round for every method (SGD Nesterov lr 0.05, x0.1 at 50% and 75% of each phase, restarted "
    "after each growth, wd 5e-4, batch 64). `firefly-wd` lets new stride-1 depthwise-separable blocks (residual, "
    "z + s*h(z), exact at s = 0) compete with splits and new units on loss decrease per parameter."
)

SUITE = Suite(
    name="E",
    title="Width and depth: MobileNetV1 grown from one block per stage (CIFAR-10 subset, CPU scale)",
    description=DESCRIPTION + " Data: a 2,000-image subset of real CIFAR-10 (ImageFolder JPEGs).",
    methods=methods(),
    seeds={"quick": [0], "full": [0, 1, 2]},
    base=base,
    sizes={
        "full": "2,000 train images (1,800 train + 200 validation, seeded subset per seed), 2,000 test; 6 "
        "epochs; growth after 2 and 4; 8 growth batches of 64; seeds 0, 1, 2",
        "quick": "300 train, 300 test; 2 epochs; growth after epoch 1; seed 0",
    },
)

SUITE_FMNIST = Suite(
    name="E-fmnist",
    title="Suite E's protocol on Fashion-MNIST (for machines without CIFAR-10)",
    description=DESCRIPTION + " Data: a 2,000-image subset of Fashion-MNIST (28x28, one channel).",
    methods=methods(),
    seeds={"quick": [0], "full": [0, 1, 2]},
    base=lambda preset: base(preset, "fashion-mnist"),
    sizes={"full": "as suite E on Fashion-MNIST", "quick": "as suite E's quick preset"},
)

SUITE_CIFAR100 = Suite(
    name="E-cifar100",
    title="The paper's MobileNetV1 experiment on CIFAR-100 (full preset: all 50,000 images, for a GPU)",
    description=DESCRIPTION.replace("after epochs 2 and 4 of 6", "after epochs 40, 80 and 120 of 160 (full)")
    + " Data: CIFAR-100 in torchvision's layout (--cifar100 PATH).",
    methods=methods({"blocks": [1, 2, 2, 6, 2]}, "the full MobileNetV1 (13 blocks, 32-1024 channels), static"),
    seeds={"quick": [0], "full": [0, 1, 2]},
    base=lambda preset: base(preset, "cifar100"),
    sizes={
        "full": "all 50,000 train images (45,000 + 5,000 validation), 10,000 test; 160 epochs; growth after 40, "
        "80, 120; batch 128; a GPU run (--threads 0 --set train.device=cuda)",
        "quick": "2,000 train, 2,000 test; 2 epochs; growth after epoch 1; seed 0",
    },
)
