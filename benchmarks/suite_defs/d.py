"""Suite D: depth growth, Firefly with depth + width candidates against width only (residual MLP, MNIST-1D)."""

from __future__ import annotations

from typing import Any

from ._shared import mnist1d_base, static_small
from ._spec import BUDGET, Method, Suite


def base(preset: str) -> dict[str, Any]:
    """Suite D: a residual MLP (width 16, two residual blocks) on MNIST-1D."""
    return mnist1d_base(preset, {"name": "residual-mlp", "kwargs": {"width": 16, "depth": 2}})


SUITE = Suite(
    name="D",
    title="Depth growth: Firefly with depth + width candidates vs width only (residual MLP, MNIST-1D)",
    description=(
        "Residual MLP (stem of width 16, two residual blocks of hidden width 16) on MNIST-1D, grown by the "
        "same 0.35 budget after epochs 12, 24 and 36 of 60. `firefly-all` lets new residual layers compete with "
        "splits and new neurons for the budget (a layer costs its width in units; the network starts with 48 "
        "growable units, so a round's budget of 16 units affords one new layer); `firefly-width` grows only wider; "
        "`firefly-depth` only deeper."
    ),
    methods={
        "firefly-width": Method("firefly", {"budget": BUDGET, "candidates": "width"}, note="splits + new"),
        "firefly-all": Method("firefly", {"budget": BUDGET, "candidates": "all"}, note="depth + width"),
        "firefly-depth": Method("firefly", {"budget": BUDGET, "candidates": "depth"}, note="new layers only"),
        "static-small": static_small(),
    },
    seeds={"quick": [0], "full": [0, 1, 2, 3, 4]},
    base=base,
    sizes={
        "full": "as suite B's data and schedule; seeds 0-4",
        "quick": "as suite B's quick preset; seed 0",
    },
)
