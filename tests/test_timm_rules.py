"""timm models grow exactly (issue 23, items 1 and 5): ViT/DeiT heads (timm `Attention`, fused and manual
softmax), FFN width (`Mlp`) and the residual stream through the LayerNorm completion; Swin's window attention by
whole heads with its relative position bias table; MLP-Mixer's token and channel MLPs and its stream. What cannot
grow is refused with a reason naming the module. Tiny models built from configs on the CPU; nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.engine import check_attrs
from firefly_descent.errors import ApproximationRequiredError
from firefly_descent.methods import make_grower
from firefly_descent.plan import GroupChange, NewUnits, Plan

timm = pytest.importorskip("timm")
from timm.models.mlp_mixer import MlpMixer  # noqa: E402

torch.set_num_threads(1)


def _jitter(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Random gains and biases (and cls/pos embeddings), so a wrong row or column would show."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _vit(name: str = "vit_tiny_patch16_224", dtype: torch.dtype = torch.float32, fused: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                          num_classes=10)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return _jitter(m, dtype)


def _swin(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                          embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4, num_classes=10)
    return _jitter(m, dtype)


def _mixer(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return _jitter(MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32), dtype)


def _images(seed: int, n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _drift(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def _grow(model: nn.Module, x: torch.Tensor, sizes: dict[str, int]) -> nn.Module:
    """New units with random incoming and zero outgoing weights (the engine completes the stream)."""
    ref = copy.deepcopy(model)
    graph = ff.analyze(model, (x,))
    plan = Plan([GroupChange(graph[g], new=NewUnits(n, init="random")) for g, n in sizes.items()],
                input_shapes=[list(x.shape)])
    ff.apply(model, plan, example_inputs=(x,))
    assert check_attrs(model) == []
    return ref


TOL = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


# ---- ViT / DeiT ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype,tol", TOL)
def test_vit_heads_ffn_and_stream_grow_exactly(name, fused, dtype, tol):
    model = _vit(name, dtype, fused)
    x, fresh = _images(0, dtype=dtype), _images(1, 3, dtype)
    graph = ff.analyze(model, (x,))
    assert graph["blocks.0.attn.heads"].width == 4 and graph["blocks.0.attn.heads"].blocked is None
    assert graph["patch_embed.proj"].blocked is None and graph["blocks.1.mlp.fc1"].blocked is None
    members = {m.tensor for m in graph["patch_embed.proj"].members}
    assert {"cls_token", "pos_embed", "blocks.0.attn.proj.weight", "norm.weight"} <= members  # writers and norms
    ref = _grow(model, x, {"blocks.0.attn.heads": 2, "blocks.1.attn.heads": 1, "blocks.1.mlp.fc1": 8,
                           "patch_embed.proj": 8})
    assert _drift(model, ref, fresh) < tol
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.head_dim) == (6, 48, 8) and attn.qkv.in_features == 40
    assert model.blocks[1].attn.num_heads == 5 and model.blocks[1].mlp.fc1.out_features == 136
    assert model.cls_token.shape[-1] == 40 and model.pos_embed.shape[-1] == 40 and model.norm.weight.shape == (40,)
    assert model.head.in_features == 40
    if hasattr(model, "dist_token"):  # DeiT's distillation token is one more writer, and its head a reader
        assert model.dist_token.shape[-1] == 40 and model.head_dist.in_features == 40


def test_grown_vit_trains_and_new_heads_learn():
    model = _vit()
    x, y = _images(0, 8), torch.arange(8) % 10
    ref = _grow(model, x, {"blocks.0.attn.heads": 2, "patch_embed.proj": 4})
    assert _drift(model, ref, x) < 1e-5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    before = F.cross_entropy(model(x), y).item()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < before
    assert model.blocks[0].attn.proj.weight[:, 32:].abs().max() > 0  # the new heads' output columns learnt


# ---- Swin -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", TOL)
def test_swin_window_attention_heads_ffn_and_last_stream_grow_exactly(dtype, tol):
    model = _swin(dtype)
    x, fresh = _images(0, dtype=dtype), _images(1, 3, dtype)
    graph = ff.analyze(model, (x,))
    last = "layers.1.downsample.reduction"  # the last stage's stream: after the patch merging
    assert graph[last].blocked is None
    ref = _grow(model, x, {"layers.0.blocks.1.attn.heads": 2, "layers.1.blocks.0.attn.heads": 1,
                           "layers.0.blocks.0.mlp.fc1": 4, last: 4})
    assert _drift(model, ref, fresh) < tol
    attn = model.layers[0].blocks[1].attn  # a shifted window block: its mask expands over num_heads
    assert attn.num_heads == 4 and attn.relative_position_bias_table.shape[1] == 4 and attn.qkv.out_features == 96
    assert model.layers[1].blocks[0].attn.num_heads == 5 and model.head.fc.in_features == 36


@pytest.mark.parametrize("dtype,tol", TOL)
def test_swin_stream_before_a_patch_merging_grows_by_duplication_and_says_why_not_by_new_units(dtype, tol):
    """Patch merging (`reshape(B, H/2, 2, W/2, 2, C).permute(...).flatten(3)`) puts four copies of the stream's
    channels side by side: `reduction` reads four segments of the group, and its LayerNorm normalises them all."""
    model = _swin(dtype)
    x, fresh = _images(0, dtype=dtype), _images(1, 3, dtype)
    ref = copy.deepcopy(model)
    group = ff.analyze(model, (x,))["patch_embed.proj"]
    assert group.growable
    reads = [m.offset for m in group.members if m.tensor == "layers.1.downsample.reduction.weight"]
    assert sorted(reads) == [0, 16, 32, 48]
    with pytest.raises(ApproximationRequiredError, match="normalises its 16 units 4 times over"):
        ff.widen(model, (x,), {"patch_embed.proj": 4}, mode="zero")
    ff.widen(model, (x,), {"patch_embed.proj": 16}, mode="split")  # every channel duplicated once
    assert _drift(model, ref, fresh) < tol and check_attrs(model) == []
    assert model.layers[1].downsample.reduction.in_features == 128


@pytest.mark.parametrize("dtype,tol", TOL)
def test_convnext_stream_grows_by_duplication_through_layerscale_and_layernorm2d(dtype, tol):
    """timm's ConvNeXt: `gamma.reshape(1, -1, 1, 1)` is a per-channel multiplier of the block's `fc2` (LayerScale),
    and LayerNorm2d (a LayerNorm subclass that permutes around `F.layer_norm`) is traced into, so the stream is
    growable: exact by duplicating every channel, while new channels are refused (the depthwise conv's filters are
    not the mean's) by name; the MLPs grow exactly."""
    torch.manual_seed(0)
    model = _jitter(timm.create_model("convnext_atto", pretrained=False, num_classes=3), dtype)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    fresh = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = copy.deepcopy(model)
    graph = ff.analyze(model, (x,))
    assert [g.name for g in graph.groups.values() if not g.growable] == ["head.fc"]
    with pytest.raises(ApproximationRequiredError, match="stages.0.blocks.0.conv_dw.weight"):
        ff.widen(model, (x,), {"stem.0": 4}, mode="zero")
    ff.widen(model, (x,), {"stem.0": 40, "stages.0.blocks.0.mlp.fc1": 8}, mode="split")
    assert _drift(model, ref, fresh) < tol and check_attrs(model) == []
    assert model.stem[1].normalized_shape == (80,) and model.stages[0].blocks[1].gamma.shape == (80,)


def test_drop_path_in_training_mode_leaves_the_stream_growable():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10, drop_path_rate=0.1).train()
    graph = ff.analyze(model, (_images(0),))
    assert graph["patch_embed.proj"].growable, graph["patch_embed.proj"].blocked


# ---- MLP-Mixer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", TOL)
def test_mixer_token_and_channel_mlps_grow_exactly_and_its_stream_only_by_duplication(dtype, tol):
    model = _mixer(dtype)
    x, fresh = _images(0, dtype=dtype), _images(1, 3, dtype)
    graph = ff.analyze(model, (x,))
    tokens = graph["blocks.0.mlp_tokens.fc2"]  # the token MLP's output is the tokens: fixed by the input size
    assert tokens.blocked is not None and "fixed-width" in tokens.blocked[1]
    ref = _grow(model, x, {"blocks.0.mlp_tokens.fc1": 3, "blocks.1.mlp_channels.fc1": 8})
    assert _drift(model, ref, fresh) < tol
    assert model.blocks[0].mlp_tokens.fc1.out_features == 19 and model.blocks[0].mlp_tokens.fc1.in_features == 16
    # new stream channels would pass through the token MLP (zero in, its output on zeros out): refused by name
    with pytest.raises(ApproximationRequiredError, match="'blocks.0.mlp_tokens.fc1' \\(token mixing\\)"):
        ff.widen(model, (x,), {"stem.proj": 4}, mode="zero")
    assert _drift(model, ref, fresh) < tol  # untouched
    ff.widen(model, (x,), {"stem.proj": 32}, mode="split")  # every channel duplicated once: exact
    assert _drift(model, ref, fresh) < tol and model.norm.normalized_shape == (64,) and check_attrs(model) == []


# ---- refusals -------------------------------------------------------------------------------------------------
def test_head_dim_under_qk_norm_and_scale_norm_are_refused_with_the_reason_naming_the_module():
    from timm.layers import Attention

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10, qk_norm=True)
    x = _images(0)
    hd = ff.analyze(model, (x,))["blocks.0.attn.head_dim"]
    assert hd.blocked[0] == "FrozenGroupError" and "'blocks.0.attn' does not grow head_dim" in hd.blocked[1]
    assert "qk_norm" in hd.blocked[1]
    with pytest.raises(Exception, match="does not grow head_dim"):
        ff.widen(model, (x,), {"blocks.0.attn.head_dim": 1}, mode="zero")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.attn = Attention(16, num_heads=2, scale_norm=True, norm_layer=nn.LayerNorm)
            self.out = nn.Linear(16, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(self.inp(t)))

    graph = ff.analyze(Net(), (torch.randn(2, 5, 8),))
    assert "attn.heads" not in graph.groups
    blocked = graph["inp"].blocked
    assert blocked is not None and "'attn' has scale_norm" in blocked[1]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_layerscale_stream_grows_exactly_with_its_writers_weighted(dtype, tol):
    """LayerScale multiplies each branch's output per unit: the completion gives the branch's projection the mean
    of its old rows times their gammas, and the new gammas 1, so the product is still the mean of the old units."""
    torch.manual_seed(0)
    model = _jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                      embed_dim=32, depth=2, num_heads=4, num_classes=10, init_values=0.1), dtype)
    x, fresh = _images(0, dtype=dtype), _images(1, 3, dtype)
    ref = _grow(model, x, {"blocks.0.attn.heads": 2, "blocks.0.mlp.fc1": 4})
    assert _drift(model, ref, fresh) < tol
    gamma, proj = model.blocks[1].ls2.gamma.detach().clone(), model.blocks[1].mlp.fc2.weight.detach().clone()
    ff.widen(model, (x,), {"patch_embed.proj": 4}, mode="zero")
    assert _drift(model, ref, fresh) < tol and check_attrs(model) == []
    assert torch.equal(model.blocks[1].ls2.gamma[32:], torch.ones(4, dtype=dtype))
    weighted = (proj * gamma[:, None]).mean(0)
    assert torch.allclose(model.blocks[1].mlp.fc2.weight[32:], weighted.expand(4, -1), atol=tol)
    assert not torch.allclose(weighted, proj.mean(0), atol=1e-4)  # the plain mean would not be exact


def test_firefly_over_grown_copy_keeps_a_layerscale_stream_exact_and_applies_what_it_scored():
    """Firefly's over-grown copy re-derives the stream's new rows from the old ones while it trains; under
    LayerScale it weights them by the gammas as the engine's completion does, so the copy is exact with every
    gate off, and a kept stream candidate is applied as the copy computed it."""
    from firefly_descent.budget import Candidate
    from firefly_descent.methods.firefly import Firefly
    from firefly_descent.methods.firefly.candidates import build_width_candidates

    torch.manual_seed(0)
    model = _jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                      embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3,
                                      init_values=0.1), torch.float64)
    x = (torch.randn(2, 3, 16, 16, dtype=torch.float64),)
    fresh = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    graph = ff.analyze(model, x)
    stream = graph["patch_embed.proj"]
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    cands = build_width_candidates(model, graph, [stream], {stream.name: 4}, True, x, init,
                                   torch.Generator().manual_seed(0))
    assert cands.blocks[stream.name] == 4  # the whole pool is one candidate
    cands.bank.alpha = 0.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() < 1e-12
    key = f"new:{stream.name}"
    cands.bank.reset(requires_grad=False)  # alpha stays 0: only this candidate's gates on, at full amplitude
    cands.bank.gates[key][:] = 1.0
    with torch.no_grad():
        target = cands.net(fresh)
    assert (target - model(fresh)).abs().max().item() > 1e-6
    plan = Firefly()._materialize(graph, cands, None, [Candidate("head", stream.name, 0, -1.0, 4.0)], x)
    ff.apply(model, plan, example_inputs=x)
    with torch.no_grad():
        assert (model(fresh) - target).abs().max().item() < 1e-10
    assert check_attrs(model) == []


def test_rules_load_only_once_timm_is_imported():
    import subprocess
    import sys

    code = ("import sys, torch, firefly_descent as ff; ff.analyze(torch.nn.Linear(2, 2), (torch.randn(1, 2),)); "
            "print('timm' in sys.modules, 'firefly_descent.analysis.timm_rules' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---- Firefly ---------------------------------------------------------------------------------------------------
def _trained_on_red_tops(model: nn.Module, size: int) -> tuple[torch.Tensor, list, tuple, float]:
    """A few Adam steps on a task a tiny model learns (class 1: a bright red top half); the images, the 3 training
    batches, the held-out batch and its loss after training (eval mode)."""
    x = torch.randn(64, 3, size, size) * 0.3
    y = torch.arange(64) % 2
    x[y == 1, 0, : size // 2] += 1.0
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    held = (x[48:], y[48:])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return x, data, held, F.cross_entropy(model(held[0]), held[1]).item()


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_a_firefly_step_on_a_tiny_vit_keeps_the_held_out_loss(init_values):
    """One budget over heads, the FFN and the stream, with and without LayerScale (`init_values`)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                              depth=1, num_heads=2, mlp_ratio=2.0, num_classes=2, init_values=init_values)
    x, data, held, before = _trained_on_red_tops(model, 16)
    grower = make_grower("firefly", budget="ratio:0.5", per_group=True, seed=0)
    report = grower.grow(model, data, F.cross_entropy, example_inputs=(x[:4],))
    pool = report.extra["pool"]
    assert {"blocks.0.attn.heads", "blocks.0.mlp.fc1", "patch_embed.proj"} <= set(pool)  # one budget
    assert report.safety.outcome in ("accepted", "shrunk", "rolled-back")
    if report.safety.outcome != "rolled-back":  # grown: the heads still match qkv (check_attrs) and the stream
        assert model.cls_token.shape[-1] == model.patch_embed.proj.out_channels == model.norm.normalized_shape[0]
    assert check_attrs(model) == []
    with torch.no_grad():
        after = F.cross_entropy(model(held[0]), held[1]).item()
    assert after <= before + 1e-4


# ---- EVA ------------------------------------------------------------------------------------------------------
def _eva(dtype: torch.dtype = torch.float64, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=14, embed_dim=16,
                          depth=2, num_heads=2, num_classes=3, **kw)
    return _jitter(m, dtype)


def _eva_images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_eva02_grows_whole_heads_with_its_stream_and_its_glu_ffn_exactly():
    """EvaAttention reshapes its output to its input's width, so a new head is head_dim new stream channels; its
    rotary embeddings act on each head's dims, so head_dim says why it does not grow; its FFN is a GLU (`chunk`)."""
    model, x, fresh = _eva(), _eva_images(0), _eva_images(1)
    graph = ff.analyze(model, (x,))
    why = graph["blocks.0.attn.head_dim"].blocked
    assert why is not None and "rotary embeddings" in why[1]
    ref = _grow(model, x, {"patch_embed.proj": 8, "blocks.0.mlp.fc1": 4})  # one head more in every block
    assert _drift(model, ref, fresh) < 1e-12
    attn = model.blocks[1].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features) == (3, 8, 72)
    assert (model.blocks[0].mlp.fc1.out_features, model.blocks[0].mlp.fc2.in_features) == (92, 46)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_eva_head_dim_grows_exactly_with_its_stream(fused, init_values):
    """Without rotary embeddings `<attention>.head_dim` grows one dim in every head of both blocks (and the stream
    by num_heads), through LayerScale gammas too; the scale follows the new head_dim."""
    model = _eva(use_rot_pos_emb=False, qkv_fused=fused, init_values=init_values)
    x, fresh = _eva_images(0), _eva_images(1)
    ref = copy.deepcopy(model)
    ff.widen(model, (x,), {"blocks.0.attn.head_dim": 3}, mode="zero")
    assert _drift(model, ref, fresh) < 1e-12 and check_attrs(model) == []
    for blk in model.blocks:
        assert (blk.attn.num_heads, blk.attn.head_dim) == (2, 11) and blk.attn.scale == pytest.approx(11 ** -0.5)
    assert model.patch_embed.proj.out_channels == 22


def test_a_firefly_step_on_a_tiny_eva02_grows_its_stream_and_glu_and_keeps_the_held_out_loss():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=14, embed_dim=16,
                              depth=1, num_heads=2, num_classes=2)
    x, data, held, before = _trained_on_red_tops(model, 28)
    report = make_grower("firefly", budget="ratio:0.5", seed=0).grow(model, data, F.cross_entropy,
                                                                     example_inputs=(x[:4],))
    assert {"patch_embed.proj", "blocks.0.mlp.fc1"} <= set(report.extra["pool"])  # the stream and the GLU
    assert report.extra.get("skipped_groups", {}) == {} and check_attrs(model) == []
    with torch.no_grad():
        after = F.cross_entropy(model(held[0]), held[1]).item()
    assert after <= before + 1e-4


# ---- BEiT -----------------------------------------------------------------------------------------------------
def _beit(**kw) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=16, depth=2,
                          num_heads=2, num_classes=3, **kw)
    return _jitter(m, torch.float64)


def test_beit_grows_whole_heads_with_their_bias_columns_head_dim_and_ffn_exactly():
    """BEiT's attention reshapes its output to its input's width (heads tied to the stream, as EVA's) and adds a
    relative position bias with one column per head; it keeps no head_dim, only `scale`, which follows it."""
    model, x, fresh = _beit(), _images(0, dtype=torch.float64), _images(1, dtype=torch.float64)
    ref = _grow(model, x, {"patch_embed.proj": 8, "blocks.1.mlp.fc1": 4})  # a head more in every block
    attn = model.blocks[1].attn
    assert (attn.num_heads, attn.relative_position_bias_table.shape[1], attn.qkv.out_features) == (3, 3, 72)
    ff.widen(model, (x,), {"blocks.0.attn.head_dim": 3}, mode="zero")
    assert attn.scale == pytest.approx(11 ** -0.5) and attn.qkv.out_features == 99 and check_attrs(model) == []
    assert _drift(model, ref, fresh) < 1e-12


def test_beit_with_a_bias_shared_by_every_block_refuses_new_heads_with_the_reason():
    graph = ff.analyze(_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=False), (_images(0, dtype=torch.float64),))
    why = graph["patch_embed.proj"].blocked
    assert why is not None and "shared by every block" in why[1] and graph["blocks.0.mlp.fc1"].growable
