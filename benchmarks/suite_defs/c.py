"""Suite C: the time and memory of one growth step (benchmarks/growth_cost.py's measurement), no training.

`COST_PRESETS` maps the suite's preset to growth_cost.py's preset (model and data); the driver passes each
method's grower and kwargs to growth_cost.py's functions.
"""

from __future__ import annotations

from ._shared import growers_width
from ._spec import BUDGET, Method, Suite

COST_PRESETS = {"quick": "quick", "full": "fashion-vgg11"}

SUITE = Suite(
    name="C",
    title="Growth cost (time and memory of one growth step)",
    description=(
        "For each method, `benchmarks/growth_cost.py`'s measurement: one growth step (decision + apply) timed "
        "against one training epoch of the same model on the same data, and the peak memory of the growth "
        "step against that of one training step (each in a fresh subprocess; CPU: resident set sampled "
        "every 0.5 ms, peak above "
        "the same baseline). Model and data: growth_cost.py's `fashion-vgg11` preset (VGG-11 at width 8, "
        "10,000 random 28x28 one-channel images, batch 128); the growers see the whole epoch's batches."
    ),
    methods={
        **growers_width(),
        "firefly-paper-code-whole-batches": Method(
            "firefly",
            {"budget": BUDGET, "preset": "paper-code", "micro_batch": None},
            note="paper-code without micro-batches (the same gradients, whole 128-sample batches)",
        ),
    },
    seeds={"quick": [0], "full": [0, 1, 2]},
    sizes={
        "full": "growth_cost.py preset fashion-vgg11 (VGG-11 width 8, 10,000 images of 28x28, batch 128); "
        "seeds 0, 1, 2",
        "quick": "growth_cost.py preset quick (VGG-11 width 4, 256 images, batch 64); seed 0",
    },
)
