"""VGG with BatchNorm, as grown in the Firefly paper (VGG-19, 16 channels per layer, 1×1-conv head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import init_weights, resolve_widths

# "M" marks a 2×2 max-pool; numbers are the standard conv widths.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


class VGG(nn.Module):
    """Conv3×3-BN-ReLU stacks with max-pools, then a classifier head.

    Attributes: `features` (an `nn.Sequential` of Conv2d/BatchNorm2d/ReLU/MaxPool2d)
    and `classifier` (an `nn.Sequential`):

    * ``classifier="conv1x1"`` (paper): ``Conv2d(C, num_classes, 1)`` → ``AdaptiveAvgPool2d(1)``
      → ``Flatten``.
    * ``classifier="linear"``: [``AdaptiveAvgPool2d(pool_to)``] → ``Flatten`` → (Linear → ReLU)*
      for ``hidden`` → ``Linear``. The flatten keeps spatial positions, so the last conv's
      channels feed ``C·H·W`` Linear inputs.

    Max-pools adapt to ``input_size``: a pool is skipped once it would shrink the map
    below 1×1 (so 28×28 inputs work), and at most ``max_pools`` pools are kept.
    """

    def __init__(
        self,
        config: Sequence[int | str] | str = "vgg19",
        in_channels: int = 3,
        num_classes: int = 10,
        widths: int | Sequence[int] | None = None,
        width_multiplier: float = 1.0,
        input_size: int = 32,
        classifier: str = "conv1x1",
        pool_to: int | None = None,
        max_pools: int | None = None,
        hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else list(config)
        defaults = [c for c in cfg if c != "M"]
        chans = resolve_widths(len(defaults), defaults, widths, width_multiplier, "vgg")
        layers: list[nn.Module] = []
        prev, size, pools, i = in_channels, input_size, 0, 0
        for item in cfg:
            if item == "M":
                if size // 2 >= 1 and (max_pools is None or pools < max_pools):
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                    pools += 1
                continue
            layers += [
                nn.Conv2d(prev, chans[i], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i]),
                nn.ReLU(),
            ]
            prev = chans[i]
            i += 1
        self.features = nn.Sequential(*layers)
        self.final_size = size  # spatial size of the last feature map
        if classifier == "conv1x1":
            if pool_to is not None or hidden:
                raise ValueError("pool_to/hidden only apply to classifier='linear'")
            self.classifier = nn.Sequential(
                nn.Conv2d(prev, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
            )
        elif classifier == "linear":
            head: list[nn.Module] = []
            if pool_to is not None:
                head.append(nn.AdaptiveAvgPool2d(pool_to))
                size = pool_to
            head.append(nn.Flatten(1))
            feat = prev * size * size
            for h in hidden:
                head += [nn.Linear(feat, h), nn.ReLU()]
                feat = h
            head.append(nn.Linear(feat, num_classes))
            self.classifier = nn.Sequential(*head)
        else:
            raise ValueError(f"classifier must be 'conv1x1' or 'linear', got {classifier!r}")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_stages(
    in_channels: int = 3,
    num_classes: int = 10,
    blocks: Sequence[int] = (1, 1, 1, 1, 1),
    widths: int | Sequence[int] = 16,
    input_size: int = 32,
    classifier: str = "conv1x1",
) -> VGG:
    """A plain VGG (conv3×3-BN-ReLU, BatchNorm) with `blocks[s]` convs in stage s, a 2×2 max-pool after
    each stage, and ``widths`` channels per stage (an int: the same everywhere): one conv per stage by
    default, a shallow start for growth in depth and width. ``blocks=(2, 2, 4, 4, 4)`` is VGG-19's layout."""
    blocks = [int(b) for b in blocks]
    if not blocks or any(b < 1 for b in blocks):
        raise ValueError(f"vgg-stages: blocks must be counts >= 1, not {blocks}")
    stage_w = [int(widths)] * len(blocks) if isinstance(widths, int) else [int(w) for w in widths]
    if len(stage_w) != len(blocks):
        raise ValueError(f"vgg-stages: expected {len(blocks)} stage widths, got {len(stage_w)}")
    config: list[int | str] = []
    for w, n in zip(stage_w, blocks):
        config += [w] * n + ["M"]
    return VGG(config, in_channels, num_classes, None, 1.0, input_size, classifier)
