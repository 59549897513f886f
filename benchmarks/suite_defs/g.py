"""Suite G: a well-trained regime, where the wider static network beats the narrower one (issue 26, item 4).

Suite F's regime is under-trained (its static 32-channel VGG-19 ends below the 16-channel one), and a method
that warm-starts units can win there and lose where networks are trained properly. Here VGG-11 (BN) trains
for 40 epochs on 19,000 real CIFAR-10 images with one cosine schedule (no restart at growth: LEMON keeps the
schedule), grown early (after epochs 4, 8 and 12) so the grown network trains for most of the run. The static
controls are the start, uniform widths 24 and 32, and each Firefly run's final architecture trained from
scratch; `benchmarks/make_docs.py` plots accuracy against total training FLOPs, growth included.
"""

from __future__ import annotations

from typing import Any

from ._shared import cifar10_vgg_base, growers_width, pick, static_small, tiny_matched
from ._spec import Method, Suite

START = 16  # the starting width of every conv layer


def base(preset: str) -> dict[str, Any]:
    """Suite G: VGG-11 (BN) from 16 channels, 19,000 CIFAR-10 images, 40 epochs, growth after epochs 4, 8, 12."""
    return cifar10_vgg_base(
        "G",
        preset,
        {"name": "vgg11", "kwargs": {"widths": START, "classifier": "conv1x1"}},
        20000,
        0.05,
        (40, [4, 8, 12]),
        {"name": "cosine", "restart_after_growth": False},
        log_every=100,
    )


def _static(width: int) -> Method:
    return Method(
        "static",
        kind="control",
        model={"widths": width, "classifier": "conv1x1"},
        note=f"width {width} in every conv, never grown",
    )


SUITE = Suite(
    name="G",
    title="A well-trained regime: VGG-11 on 19,000 real CIFAR-10 images for 40 epochs",
    description=(
        "VGG-11 with BatchNorm and a 1x1-conv classifier, 16 channels in every conv layer, on a 20,000-image "
        "subset of real CIFAR-10 (19,000 train + 1,000 validation; 2,000 test), grown by a 0.35 budget after "
        "epochs 4, 8 and 12 of 40 (SGD Nesterov lr 0.05, one cosine schedule over the run, wd 5e-4, batch 128, "
        "flips and crops). Long enough that a wider static network beats a narrower one (the regime suite F "
        "lacks); TINY is budget-matched to Firefly's rounds. Controls: the start, widths 24 and 32, and each "
        "Firefly run's final architecture trained from scratch."
    ),
    methods={
        **pick(growers_width(), ("firefly", "random", "random-matched", "net2net", "splitting-fast")),
        "tiny-matched": tiny_matched(),
        "static-small": static_small(),
        "static-w24": _static(24),
        "static-w32": _static(32),
        "firefly-arch-from-scratch": Method(
            "static",
            kind="replay",
            replay_of="firefly",
            note="final architecture of the firefly run (same seed) via replay_history, re-initialised",
        ),
    },
    seeds={"quick": [0], "full": [0, 1, 2, 3, 4]},
    compute_view=True,
    base=base,
    sizes={
        "full": "20,000 train images (19,000 train + 1,000 validation, seeded subset per seed), 2,000 test; 40 "
        "epochs; growth after 4, 8, 12; 16 growth batches; seeds 0-4",
        "quick": "500 train, 500 test; 2 epochs; growth after epoch 1; seed 0",
    },
)
