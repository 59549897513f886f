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
