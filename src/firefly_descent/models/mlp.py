"""Multi-layer perceptrons: the simplest width- and depth-growth testbeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import init_weights, make_activation

_NORMS = (None, "batch", "layer")


def _norm(kind: str | None, width: int) -> list[nn.Module]:
    if kind is None:
        return []
    if kind == "batch":
        return [nn.BatchNorm1d(width)]
    if kind == "layer":
        return [nn.LayerNorm(width)]
    raise ValueError(f"unknown norm {kind!r}; choose from {_NORMS}")


class MLP(nn.Module):
    """Flatten → (Linear → [norm] → act) × depth → Linear.

    Attributes: `flatten`, `features` (an `nn.Sequential` of the hidden layers),
    `classifier` (the output `nn.Linear`).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] | int = 256,
        num_classes: int = 10,
        depth: int | None = None,
        act: str = "relu",
        norm: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden, int):
            widths = [hidden] * (2 if depth is None else depth)
        else:
            widths = [int(h) for h in hidden]
            if depth is not None and depth != len(widths):
                raise ValueError(f"depth={depth} disagrees with len(hidden)={len(widths)}")
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {_NORMS}")
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        prev = in_features
        for w in widths:
            layers.append(nn.Linear(prev, w, bias=norm != "batch"))
            layers.extend(_norm(norm, w))
            layers.append(make_activation(act))
            prev = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.flatten(x)))


class ResidualBlock(nn.Module):
    """x + fc2(act([norm](fc1(x)))): a constant-width block that depth growth can insert.

    The norm (if any) sits on the hidden dimension so the residual stream itself
    carries no norm and stays easy to widen.
    """

    def __init__(self, width: int, hidden: int | None = None, act: str = "relu", norm: str | None = None):
        super().__init__()
        hidden = width if hidden is None else hidden
        self.fc1 = nn.Linear(width, hidden, bias=norm != "batch")
        norms = _norm(norm, hidden)
        self.norm = norms[0] if norms else nn.Identity()
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.norm(self.fc1(x))))


class ResidualMLP(nn.Module):
    """Flatten → stem Linear → act → `depth` residual blocks → Linear head.

    Attributes: `flatten`, `stem` (Linear + act), `blocks` (an `nn.Sequential` of
    `ResidualBlock`s, possibly empty), `classifier`.
    """

    def __init__(
        self,
        in_features: int = 784,
        width: int = 128,
        num_classes: int = 10,
        depth: int = 2,
        hidden: int | None = None,
        act: str = "relu",
        norm: str | None = None,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {_NORMS}")
        self.flatten = nn.Flatten(1)
        self.stem = nn.Sequential(nn.Linear(in_features, width), make_activation(act))
        self.blocks = nn.Sequential(*[ResidualBlock(width, hidden, act, norm) for _ in range(depth)])
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(self.flatten(x))))
