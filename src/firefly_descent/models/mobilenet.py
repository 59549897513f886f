"""MobileNetV1 for CIFAR (the paper grows it on CIFAR-100 from 32 channels per layer)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ._common import init_weights, resolve_widths

# (out_channels, stride) of the 13 depthwise-separable blocks, CIFAR strides
# (stride-1 stem, so 32×32 inputs end at 2×2).
# fmt: off
MOBILENET_V1_BLOCKS: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]
# fmt: on
MOBILENET_V1_STEM = 32


def depthwise_separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """3×3 depthwise conv (groups=C) + BN + ReLU, then 1×1 pointwise conv + BN + ReLU.

    Children: `dw_conv`, `dw_bn`, `dw_relu`, `pw_conv`, `pw_bn`, `pw_relu`.
    """
    return nn.Sequential(
        OrderedDict(
            dw_conv=nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False),
            dw_bn=nn.BatchNorm2d(in_ch),
            dw_relu=nn.ReLU(),
            pw_conv=nn.Conv2d(in_ch, out_ch, 1, bias=False),
            pw_bn=nn.BatchNorm2d(out_ch),
            pw_relu=nn.ReLU(),
        )
    )


class MobileNetV1(nn.Module):
    """Stem conv3×3-BN-ReLU → 13 depthwise-separable blocks → global average pool → Linear.

    Width knobs: ``width`` puts the same number of channels in every layer (paper: 32);
    ``widths`` lists all 14 widths (stem first); otherwise ``width_multiplier`` scales
    the standard 32, 64…1024 config.
    Attributes: `stem`, `features` (Sequential of blocks), `avgpool`, `flatten`, `classifier`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int | None = None,
        widths: Sequence[int] | None = None,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if width is not None and widths is not None:
            raise ValueError("give either width or widths, not both")
        defaults = [MOBILENET_V1_STEM] + [c for c, _ in MOBILENET_V1_BLOCKS]
        chans = resolve_widths(
            len(defaults), defaults, width if widths is None else widths, width_multiplier, "mobilenetv1"
        )
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(chans[0]),
                relu=nn.ReLU(),
            )
        )
        blocks = []
        for (_, stride), cin, cout in zip(MOBILENET_V1_BLOCKS, chans[:-1], chans[1:]):
            blocks.append(depthwise_separable(cin, cout, stride))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(chans[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(self.flatten(self.avgpool(x)))


# MobileNetV1's CIFAR layout as stages: (width, stride of the stage's first block, blocks); the full
# network is blocks (1, 2, 2, 6, 2).
MOBILENET_V1_STAGES: list[tuple[int, int, int]] = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 2, 6), (1024, 2, 2)]


class MobileNetV1Stages(nn.Module):
    """MobileNetV1 for 32×32 inputs with a configurable number of blocks per stage: a shallow, narrow
    start for growth in depth and width (the paper's MobileNetV1 experiment).

    Stem conv3×3-BN-ReLU → `features`, one flat Sequential of depthwise-separable blocks (stage s has
    `blocks[s]` blocks; its first has the stage's stride, the rest stride 1) → average pool → Linear.
    ``widths`` gives the stem's and each stage's width (an int: the same everywhere); ``blocks=(1, 2, 2, 6, 2)``
    with the default widths is `MobileNetV1`'s layout.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        blocks: Sequence[int] = (1, 1, 1, 1, 1),
        widths: int | Sequence[int] | None = None,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        blocks = [int(b) for b in blocks]
        if len(blocks) != len(MOBILENET_V1_STAGES) or any(b < 1 for b in blocks):
            raise ValueError(f"mobilenetv1-stages: blocks must be {len(MOBILENET_V1_STAGES)} counts >= 1, not {blocks}")
        defaults = [MOBILENET_V1_STEM] + [w for w, _, _ in MOBILENET_V1_STAGES]
        chans = resolve_widths(len(defaults), defaults, widths, width_multiplier, "mobilenetv1-stages")
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(chans[0]),
                relu=nn.ReLU(),
            )
        )
        layers, prev = [], chans[0]
        for (_, stride, _), width, n in zip(MOBILENET_V1_STAGES, chans[1:], blocks):
            for i in range(n):
                layers.append(depthwise_separable(prev, width, stride if i == 0 else 1))
                prev = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(self.flatten(self.avgpool(x)))
