"""Property test: random small conv graphs (chains, residual adds, concatenations, depthwise convs,
flatten -> linear) stay function-preserving under random growth of any group."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import randomize_norm_stats

import firefly_descent as ff

BLOCKS = ("conv", "residual", "concat", "depthwise")


class RandomNet(nn.Module):
    def __init__(self, blocks: list[str], width: int, flatten: bool) -> None:
        super().__init__()
        self.kinds = blocks
        self.stem = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        c = width
        for kind in blocks:
            if kind == "conv":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c + 1, 3, padding=1), nn.BatchNorm2d(c + 1), nn.ReLU()))
                c += 1
            elif kind == "residual":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)))
            elif kind == "concat":
                self.blocks.append(nn.ModuleList([nn.Conv2d(c, 2, 1), nn.Conv2d(c, 3, 3, padding=1)]))
                c = 5
            else:
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU()))
        self.flatten = flatten
        self.head = nn.Linear(c * (4 if flatten else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = torch.relu(x + block(x))
            elif kind == "concat":
                x = torch.cat([block[0](x), block[1](x)], dim=1)
            else:
                x = block(x)
        if self.flatten:
            x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        else:
            x = x.mean(dim=(2, 3))
        return self.head(x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    width=st.integers(2, 4),
    flatten=st.booleans(),
    k=st.integers(1, 4),
    mode=st.sampled_from(["split", "zero"]),
    pick=st.integers(0, 100),
    seed=st.integers(0, 1000),
)
def test_random_graphs_grow_exactly(blocks, width, flatten, k, mode, pick, seed):
    torch.manual_seed(seed)
    model = RandomNet(blocks, width, flatten)
    randomize_norm_stats(model, seed=seed)
    model.eval()
    x = torch.randn(2, 2, 6, 6)
    growable = ff.analyze(model, x).growable()
    assert growable
    group = growable[pick % len(growable)]
    ref = copy.deepcopy(model)
    ff.widen(model, x, {group.name: k}, mode=mode)
    assert ff.analyze(model, x)[group.name].width == group.width + k
    fresh = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        assert (model(fresh) - ref(fresh)).abs().max().item() <= 1e-5
