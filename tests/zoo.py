"""Tiny hand-built models for the growth-engine tests.

Each `ZOO` entry is a factory returning ``(model, example_inputs)``. Factories are
deterministic (their own RNG fork, seed 0) and leave the global RNG untouched, so
tests can build the same model twice and compare. Every forward takes well under
10 ms on CPU.

`GOOD_MODELS` should be fully growable; `BAD_MODELS` exist to exercise refusals:

* ``mean_over_channels``: ``x.mean(dim=1)`` over a conv's channels;
* ``unknown_op``: ``torch.sort(x, dim=1).values`` on a conv output (no channel rule);
* ``data_dependent``: ``if x.sum() > 0:`` in forward (not fx-traceable);
* ``broadcast_mask``: a ``[B,1,H,W]`` sigmoid mask times a ``[B,C,H,W]`` feature map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Factory = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _cbr(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


# ----------------------------------------------------------------------------- good models


class VGGFlatten(nn.Module):
    """conv-BN-ReLU ×3 with a max-pool, flatten of [B,C,2,2] → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_cbr(3, 4), *_cbr(4, 5), nn.MaxPool2d(2), *_cbr(5, 6))
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(6 * 2 * 2, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(self.features(x)))))


class VGGGap(nn.Module):
    """conv stack → AdaptiveAvgPool2d(1) → Flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_cbr(3, 4), nn.MaxPool2d(2), *_cbr(4, 6), *_cbr(6, 5))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 conv + BN shortcut when stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + idt)


class ResNetBasic(nn.Module):
    """stem → 2 identity basic blocks → 1 downsampling block (1×1 shortcut) → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 4))
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 → 1×1 expand (×expansion) with an identity add."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + x)


class ResNetBottleneck(nn.Module):
    """stem (8 ch) → two bottlenecks with mid 2, expansion 4 → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 8))
        self.blocks = nn.Sequential(Bottleneck(8, 2), Bottleneck(8, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


class MobileNetV1Tiny(nn.Module):
    """stem → 2 depthwise-separable blocks (dw 3×3 groups=C, pw 1×1) → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 4))
        self.block1 = nn.Sequential(*_cbr(4, 4, groups=4), *_cbr(4, 6, k=1))
        self.block2 = nn.Sequential(*_cbr(6, 6, stride=2, groups=6), *_cbr(6, 8, k=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.block2(self.block1(self.stem(x))))))


class InvertedResidual(nn.Module):
    """1×1 expand → BN → ReLU6 → dw 3×3 → BN → ReLU6 → 1×1 linear projection → BN (+ x)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Conv2d(cin, hid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hid)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(hid, hid, 3, stride=stride, padding=1, groups=hid, bias=False)
        self.bn2 = nn.BatchNorm2d(hid)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(hid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.expand(x)))
        out = self.act2(self.bn2(self.dw(out)))
        out = self.bn3(self.project(out))
        return x + out if self.use_res else out


class MobileNetV2Tiny(nn.Module):
    """stem → inverted residual (with add) → inverted residual (stride 2, no add) → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 4))
        self.block1 = InvertedResidual(4, 4, expand=2)
        self.block2 = InvertedResidual(4, 6, expand=2, stride=2)
        self.block3 = InvertedResidual(6, 6, expand=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on flat [B, 6] inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPBN(nn.Module):
    """Linear-BN1d-ReLU ×2 → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 7),
            nn.BatchNorm1d(7),
            nn.ReLU(),
            nn.Linear(7, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Concat(nn.Module):
    """Two conv branches joined by torch.cat → conv consumer; branch `a` also feeds `conv_d`.

    y = conv_c(cat[a, b]) + conv_d(a), then global mean over (H, W) via ``mean(dim=(2, 3))``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 4))
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(3)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 5, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(5)
        self.relu_b = nn.ReLU()
        self.conv_c = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.conv_d = nn.Conv2d(3, 6, 1, bias=False)
        self.bn_y = nn.BatchNorm2d(6)
        self.relu_y = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        a = self.relu_a(self.bn_a(self.conv_a(s)))
        b = self.relu_b(self.bn_b(self.conv_b(s)))
        c = torch.cat([a, b], dim=1)
        y = self.relu_y(self.bn_y(self.conv_c(c) + self.conv_d(a)))
        return self.fc(y.mean(dim=(2, 3)))


class TransformerMLP(nn.Module):
    """x [B,T,D] + fc2(GELU(fc1(x))), mean over T, Linear head (no LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(x.mean(dim=1))


class GroupNormCNN(nn.Module):
    """conv → GroupNorm(2) → ReLU ×2 → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.GroupNorm(2, 6),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class LayerNormMLP(nn.Module):
    """Linear → LayerNorm → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv1dNet(nn.Module):
    """Conv1d-BN1d-ReLU ×2 on [B,1,40] (MNIST-1D-like) → flatten of [B,6,20] → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 4, 5, padding=2, bias=False),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm1d(6),
            nn.ReLU(),
        )
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(6 * 20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


# ----------------------------------------------------------------------------- bad models


class MeanOverChannels(nn.Module):
    """conv → ReLU → x.mean(dim=1) (over channels) → flatten → Linear: conv width must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.conv(x)).mean(dim=1)))


class UnknownOp(nn.Module):
    """conv → torch.sort over channels (no channel rule) → conv → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sort(self.conv1(x), dim=1).values
        return self.fc(self.flatten(self.pool(self.conv2(x))))


class DataDependent(nn.Module):
    """Python branch on a tensor value: fx tracing must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = self.relu(h)
        return self.fc2(h)


class BroadcastMask(nn.Module):
    """feature [B,C,H,W] × sigmoid(conv_mask(x)) [B,1,H,W]: the size-1 mask branch must not couple to C."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_f = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_f = nn.BatchNorm2d(4)
        self.relu_f = nn.ReLU()
        self.conv_mask = nn.Conv2d(3, 1, 3, padding=1)
        self.sigmoid = nn.Sigmoid()
        self.conv_out = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.relu_f(self.bn_f(self.conv_f(x)))
        mask = self.sigmoid(self.conv_mask(x))
        return self.fc(self.flatten(self.pool(self.conv_out(feat * mask))))


# ----------------------------------------------------------------------------- registry


def _seeded(build: Callable[[], nn.Module], *shape: int) -> Factory:
    """Wrap a constructor so model and inputs are deterministic without touching global RNG."""

    def factory() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
            x = torch.randn(*shape)
        return model, (x,)

    factory.__doc__ = build.__doc__
    return factory


ZOO: dict[str, Factory] = {
    "vgg_flatten": _seeded(VGGFlatten, 2, 3, 4, 4),
    "vgg_gap": _seeded(VGGGap, 2, 3, 6, 6),
    "resnet_basic": _seeded(ResNetBasic, 2, 3, 6, 6),
    "resnet_bottleneck": _seeded(ResNetBottleneck, 2, 3, 5, 5),
    "mobilenetv1": _seeded(MobileNetV1Tiny, 2, 3, 6, 6),
    "mobilenetv2": _seeded(MobileNetV2Tiny, 2, 3, 6, 6),
    "mlp": _seeded(MLP, 3, 6),
    "mlp_bn": _seeded(MLPBN, 3, 6),
    "concat": _seeded(Concat, 2, 3, 5, 5),
    "transformer_mlp": _seeded(TransformerMLP, 2, 5, 8),
    "groupnorm_cnn": _seeded(GroupNormCNN, 2, 3, 5, 5),
    "layernorm_mlp": _seeded(LayerNormMLP, 3, 6),
    "conv1d": _seeded(Conv1dNet, 2, 1, 40),
    "mean_over_channels": _seeded(MeanOverChannels, 2, 3, 4, 4),
    "unknown_op": _seeded(UnknownOp, 2, 3, 5, 5),
    "data_dependent": _seeded(DataDependent, 3, 6),
    "broadcast_mask": _seeded(BroadcastMask, 2, 3, 5, 5),
}

BAD_MODELS: frozenset[str] = frozenset(
    {"mean_over_channels", "unknown_op", "data_dependent", "broadcast_mask"}
)
"""Models that the analysis must refuse (wholly or for the named groups)."""

GOOD_MODELS: tuple[str, ...] = tuple(name for name in ZOO if name not in BAD_MODELS)
"""Models whose every group should be growable with exact function preservation."""

NOT_TRACEABLE: frozenset[str] = frozenset({"data_dependent"})
"""Models on which `torch.fx.symbolic_trace` / `torch.export` fail by design."""


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and every norm random affine parameters.

    Function-preservation tests need this: with default statistics (mean 0, var 1,
    γ=1, β=0) a wrong BatchNorm expansion can go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def jitter(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """`model` in `dtype` and eval mode with every parameter moved by N(0, 0.05²) noise: random gains and biases,
    so an expansion that takes a wrong row or column shows in the output (for models built from configs, whose
    norms start at 1 and 0)."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
