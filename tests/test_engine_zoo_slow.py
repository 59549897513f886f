"""Slower tier: torchvision architectures (random weights, 64x64 inputs) analysed and grown exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from zoo import randomize_norm_stats

import firefly_descent as ff

MODELS = ["vgg11_bn", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_grows_function_preserving(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    randomize_norm_stats(model, seed=0)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    graph = ff.analyze(model, x)
    growable = graph.growable()
    assert len(growable) >= len(graph.groups) - 1  # only the classifier output is frozen
    sample = [growable[0], growable[len(growable) // 2], growable[-1]]
    ref = copy.deepcopy(model)
    ff.widen(model, x, {sample[0].name: 3, sample[1].name: 1}, mode="split")
    ff.widen(model, x, {sample[2].name: 2}, mode="zero")
    fresh = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y, y0 = model(fresh), ref(fresh)
    assert (y - y0).abs().max().item() <= 1e-5 * (1 + y0.abs().max().item())
    widths = ff.analyze(model, x).widths()
    assert widths[sample[0].name] == sample[0].width + 3
