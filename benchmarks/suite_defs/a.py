"""Suite A: CNN width growth on Fashion-MNIST, VGG-11 (BN, 1x1-conv classifier) from 8 channels."""

from __future__ import annotations

from typing import Any

from ._shared import controls, growers_width, score_ablation
from ._spec import BUDGET, FASHION_ROOT, Method, Suite

FULL_WIDTH = 64  # the static-full control's width


def base(preset: str) -> dict[str, Any]:
    """Suite A: VGG-11-BN (1x1-conv classifier) from 8 channels on Fashion-MNIST."""
    full = preset == "full"
    epochs, at = (15, [3, 6, 9]) if full else (2, [1])
    return {
        "data": {
            "name": "fashion-mnist",
            "root": FASHION_ROOT,
            # the train pool is split into train + validation (NASH selects children on validation);
            # full: 22,000 -> 20,000 train + 2,000 validation, the full 10,000-image test set
            "train_subset": 22000 if full else 550,
            "val_fraction": 1 / 11,
            "test_subset": None if full else 500,
            "batch_size": 128,
            "eval_batch_size": 1000,
        },
        "model": {"name": "vgg11", "kwargs": {"widths": 8, "classifier": "conv1x1"}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        "growth": {
            "at": at,
            "refresh_bn": True,
            "refresh_bn_batches": 20 if full else 4,
            "data_batches": 20 if full else 4,
        },
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


SUITE = Suite(
    name="A",
    title="CNN width growth on Fashion-MNIST (VGG-11, from 8 channels)",
    description=(
        "VGG-11 layout with BatchNorm and a 1x1-conv classifier, 8 channels in every conv layer, grown by a "
        "0.35 budget (35% more neurons per round, one global pool) after epochs 3, 6 and 9, then trained to "
        "epoch 15; every method has the same epoch budget and the same step schedule (lr 0.05, x0.1 at 50% "
        "and 75% of each phase, restarted after each growth, SGD Nesterov, wd 5e-4, batch 128). The controls "
        "use the static grower at the same epochs, so their learning-rate schedule is identical."
    ),
    methods={
        **growers_width(),
        "firefly-no-bn-calibration": Method(
            "firefly",
            {"budget": BUDGET},
            growth={"calibrate_new_bn": False},
            note="ablation: new units' BatchNorm channels left fresh (train mode rescales them to unit variance)",
        ),
        **score_ablation(),
        **controls(
            {"widths": FULL_WIDTH, "classifier": "conv1x1"},
            f"width {FULL_WIDTH} in every conv (8x the start; the widest affordable on 2 CPU cores)",
        ),
    },
    seeds={"quick": [0], "full": [0, 1, 2]},
    base=base,
    sizes={
        "full": "20,000 train + 2,000 validation images (seeded subset per seed), full 10,000 test; 15 epochs; "
        "growth after epochs 3, 6, 9; growth sees 20 batches; seeds 0, 1, 2",
        "quick": "500 train + 50 validation, 500 test; 2 epochs; growth after epoch 1; 4 growth batches; seed 0",
    },
)
