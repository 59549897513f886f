"""Suite F: the paper's headline setting at CPU scale, VGG-19 (BN) from 16 channels on real CIFAR-10."""

from __future__ import annotations

from typing import Any

from ._shared import (
    cifar10_vgg_base,
    growers_width,
    init_ablation,
    pick,
    score_ablation,
    static_small,
    tiny_matched,
)
from ._spec import Method, Suite

START, STATIC = 16, 32  # the starting width and the static-wide control's


def base(preset: str) -> dict[str, Any]:
    """Suite F: the paper's headline setting at CPU scale, VGG-19 (BN) from 16 channels on real CIFAR-10."""
    return cifar10_vgg_base(
        "F",
        preset,
        {"name": "vgg19", "kwargs": {"widths": START, "classifier": "conv1x1"}},
        5000,
        0.1,
        (12, [3, 6, 9]),
        {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        log_every=50,
    )


SUITE = Suite(
    name="F",
    title="The paper's headline data: VGG-19 from 16 channels on real CIFAR-10 (CPU scale)",
    description=(
        "VGG-19 with BatchNorm and a 1x1-conv classifier, 16 channels in every conv layer (the paper's start), "
        "on a 5,000-image subset of real CIFAR-10 (ImageFolder JPEGs), grown by a 0.35 budget after epochs 3, "
        "6 and 9 of 12 (SGD Nesterov lr 0.05, x0.1 at 50% and 75% of each phase, restarted after each growth, "
        "wd 5e-4, batch 128, flips and crops). The paper trains 160 epochs per round on all 50,000 images on "
        "a GPU; this is the same comparison at a size two CPU cores can afford, so absolute accuracies are far "
        "below the paper's."
    ),
    methods={
        **pick(growers_width(), ("firefly", "random", "random-matched", "net2net", "splitting-fast", "tiny")),
        "tiny-matched": tiny_matched(),
        **score_ablation(),
        **init_ablation(),
        "static-small": static_small(),
        "static-wide": Method(
            "static",
            kind="control",
            model={"widths": STATIC, "classifier": "conv1x1"},
            note=f"width {STATIC} in every conv (2x the start; the paper's full VGG-19 is beyond 2 CPU cores)",
        ),
    },
    seeds={"quick": [0], "full": [0, 1]},
    base=base,
    sizes={
        "full": "5,000 train images (4,500 train + 500 validation, seeded subset per seed), 2,000 test; 12 "
        "epochs; growth after 3, 6, 9; 16 growth batches; seeds 0, 1",
        "quick": "500 train, 500 test; 2 epochs; growth after epoch 1; seed 0",
    },
)
