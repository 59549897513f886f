"""Suite B: MLP width growth on MNIST-1D (generated locally), with issue 11's ablations of Firefly."""

from __future__ import annotations

from typing import Any

from ._shared import controls, firefly_ablations, growers_width, mnist1d_base, score_ablation
from ._spec import Suite


def base(preset: str) -> dict[str, Any]:
    """Suite B: a 2-hidden-layer MLP from 16 units per layer on MNIST-1D."""
    return mnist1d_base(preset, {"name": "mlp", "kwargs": {"hidden": [16, 16]}})


SUITE = Suite(
    name="B",
    title="MLP width growth on MNIST-1D",
    description=(
        "MLP with two hidden layers of 16 units on MNIST-1D (generated locally, never downloaded), grown by a "
        "0.35 budget after epochs 12, 24 and 36 of 60 (Adam lr 3e-3, cosine schedule, batch 128)."
    ),
    methods={
        **growers_width(),
        **firefly_ablations(),
        **score_ablation(),
        **controls({"hidden": [256, 256]}, "two hidden layers of 256 units"),
    },
    seeds={"quick": [0], "full": list(range(20))},
    base=base,
    sizes={
        "full": "10,000 samples -> 7,200 train + 800 validation, 2,000 test; 60 epochs; growth after 12, 24, "
        "36; 16 growth batches; seeds 0-19 (issue 11's paired protocol; some methods ran on fewer, see n)",
        "quick": "1,000 samples -> 720 train + 80 validation, 200 test; 4 epochs; growth after epoch 2; seed 0",
    },
)
