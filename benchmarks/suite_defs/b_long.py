"""Suite B-long: suite B with 40 epochs between growths, closer to the paper's long rounds."""

from __future__ import annotations

from typing import Any

from . import b
from ._shared import growers_width, pick
from ._spec import Suite


def base(preset: str) -> dict[str, Any]:
    """Suite B-long: suite B with 40 epochs between growths (160 in all), closer to the paper's long rounds."""
    cfg = b.base(preset)
    if preset == "full":
        cfg["train"]["epochs"], cfg["growth"]["at"] = 160, [40, 80, 120]
    return cfg


SUITE = Suite(
    name="B-long",
    title="MLP width growth on MNIST-1D with long training between growths",
    description=(
        "Suite B's network, data and budget with 40 epochs between growths: grown after epochs 40, 80 and "
        "120 of 160 (Adam lr 3e-3, one cosine schedule over the run). The paper trains 160 epochs per round; "
        "this asks whether a decision's head start survives longer training."
    ),
    methods=pick(growers_width(), ("firefly", "random", "random-matched", "tiny")),
    seeds={"quick": [0], "full": list(range(10))},
    base=base,
    sizes={
        "full": "as suite B; 160 epochs; growth after 40, 80, 120; seeds 0-9",
        "quick": "as suite B's quick preset; seed 0",
    },
)
