"""CIFAR-style ResNets (ResNet-20/56 of He et al. and ResNet-18 with a 3×3 stem).

Names follow torchvision (`conv1`, `bn1`, `layer1`…, `avgpool`, `fc`; blocks have
`conv1`, `bn1`, `conv2`, `bn2`, `downsample`) so users recognise them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import init_weights


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or (option B) a 1×1 conv + BN in `downsample` when the
    stride or width changes. `downsample is None` is decided at construction, so
    tracing sees no branch.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """Stem conv3×3-BN-ReLU → stages of BasicBlocks → global average pool → `fc`.

    `blocks` gives the number of blocks per stage, `widths` the width of each stage;
    the first stage keeps stride 1, later stages halve the spatial size.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"{len(blocks)} stages but {len(widths)} widths")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        prev = widths[0]
        self.num_stages = len(blocks)
        for s, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(prev, w, stride=2 if (s > 0 and b == 0) else 1))
                prev = w
            self.add_module(f"layer{s + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _stage_widths(width: int, widths: Sequence[int] | None, n: int) -> list[int]:
    if widths is not None:
        if len(widths) != n:
            raise ValueError(f"expected {n} stage widths, got {len(widths)}")
        return [int(w) for w in widths]
    return [width * 2**i for i in range(n)]


def resnet_cifar(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    widths: Sequence[int] | None = None,
) -> ResNet:
    """ResNet-(6n+2) for CIFAR: 3 stages of n BasicBlocks, widths width·(1, 2, 4)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet([n] * 3, _stage_widths(width, widths, 3), in_channels, num_classes)


def resnet18(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 64,
    widths: Sequence[int] | None = None,
) -> ResNet:
    """ResNet-18 with a CIFAR 3×3 stride-1 stem (no max-pool): BasicBlocks [2, 2, 2, 2]."""
    return ResNet([2, 2, 2, 2], _stage_widths(width, widths, 4), in_channels, num_classes)
