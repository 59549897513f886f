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


def _vit() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


BEYOND_CNNS = {
    "vit": (_vit, (2, 3, 32, 32)),
    "swin_t": (lambda: torchvision.models.swin_t(weights=None, num_classes=10), (1, 3, 64, 64)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None, num_classes=10), (1, 3, 64, 64)),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(weights=None, num_classes=10), (2, 3, 64, 64)),
}


def _randomize(model: torch.nn.Module) -> None:
    """Random norm statistics, and random weights where torchvision initialises zeros (ViT's head), so a
    wrong expansion shows in the output."""
    randomize_norm_stats(model, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _exact_size(group: ff.analysis.Group) -> int:
    """The smallest change each of the group's constraints takes exactly."""
    if any(c.kind == "layernorm" for c in group.constraints):
        return group.width  # duplicate every unit once
    return max([1] + [c.channels_per_group for c in group.constraints])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BEYOND_CNNS))
def test_models_beyond_cnns_grow_or_refuse_in_one_line(name):
    build, shape = BEYOND_CNNS[name]
    torch.manual_seed(0)
    model = build()
    _randomize(model)
    model.eval()
    x = torch.randn(*shape)
    graph = ff.analyze(model, x)  # never an exception from inside torch
    for g in graph.groups.values():
        assert g.growable or "\n" not in g.blocked[1]
    growable = graph.growable()
    assert len(growable) >= len(graph.groups) // 2, [g.blocked for g in graph.groups.values() if g.blocked]
    sample = [growable[0], growable[len(growable) // 2], growable[-1]]
    ref = copy.deepcopy(model)
    ff.widen(model, x, {g.name: _exact_size(g) for g in sample}, mode="split")
    fresh = torch.randn(*shape)
    with torch.no_grad():
        y, y0 = model(fresh), ref(fresh)
    assert (y - y0).abs().max().item() <= 1e-5 * (1 + y0.abs().max().item())
    assert ff.engine.check_attrs(model) == []


@pytest.mark.slow
def test_vit_embedding_heads_mlp_and_depth_grow_exactly():
    torch.manual_seed(0)
    model = _vit()
    _randomize(model)
    model.eval()
    x, fresh = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    embed = ff.analyze(model, x)["conv_proj"]
    members = {(m.tensor, m.dim) for m in embed.members}
    assert {("class_token", 2), ("encoder.pos_embedding", 2)} <= members
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ff.ApproximationRequiredError, match="duplicating only some"):
        ff.widen(model, x, {"conv_proj": 8}, mode="split", optimizer=opt)
    ff.widen(model, x, {"conv_proj": 16}, mode="split", optimizer=opt)  # twice the width: every head copied
    attn = model.encoder.layers.encoder_layer_0.self_attention
    assert model.hidden_dim == 32 and (attn.embed_dim, attn.num_heads) == (32, 4)
    ff.widen(model, x, {"conv_proj": 8}, mode="zero", optimizer=opt)  # a new head: the stream's mean, norms rescaled
    attn = model.encoder.layers.encoder_layer_0.self_attention
    assert model.hidden_dim == 40 and (attn.embed_dim, attn.num_heads) == (40, 5)
    ff.widen(model, x, {"encoder.layers.encoder_layer_1.mlp.0": 5}, mode="zero", optimizer=opt)
    ff.add_blocks(model, x, ["encoder.layers.encoder_layer_1"], optimizer=opt)
    with torch.no_grad():
        y, y0 = model(fresh), ref(fresh)
    assert (y - y0).abs().max().item() <= 1e-5 * (1 + y0.abs().max().item())
    model.train()
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    opt.step()  # the grown model trains with the remapped optimizer
    assert torch.isfinite(model(fresh)).all()


@pytest.mark.slow
def test_swin_window_attention_grows_by_whole_heads():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=10)
    _randomize(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)  # one column per head: a wrong copy shows in the output
    model.eval()
    x, fresh = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    stage = ff.analyze(model, x)["features.0.0"]
    assert any(m.tensor == "features.1.0.attn.relative_position_bias_table" and m.per == 32 for m in stage.members)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"features.0.0": 96}, mode="split")  # every head of stage 1 copied
    attn = model.features[1][0].attn
    assert attn.num_heads == 6 and attn.relative_position_bias_table.shape[1] == 6
    with torch.no_grad():
        y, y0 = model(fresh), ref(fresh)
    assert (y - y0).abs().max().item() <= 1e-5 * (1 + y0.abs().max().item())
    assert ff.engine.check_attrs(model) == []
