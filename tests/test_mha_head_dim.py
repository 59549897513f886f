"""Issue 23: the key/query and value expansions (head_dim) on torch's own nn.MultiheadAttention, whose heads tie
num_heads x head_dim to the stream it reads: one unit of `<attention>.head_dim` is one dim in every head of every
attention on that stream plus num_heads stream channels, completed by the stream's norm and then the head_dim
completion (query rows scaled, new key rows zero)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer

import firefly_descent as ff
from firefly_descent.engine import apply_undoable, check_attrs
from firefly_descent.errors import ApproximationRequiredError
from firefly_descent.methods import make_grower
from firefly_descent.models.transformer import Transformer
from firefly_descent.plan import GroupChange, NewUnits, Plan

torch.set_num_threads(1)


class Encoder(nn.Module):
    """nn.TransformerEncoder between two Linears (pre-norm or post-norm)."""

    def __init__(self, norm_first: bool, heads: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, heads, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.inp(x)).mean(1))


class Decoder(nn.Module):
    """Token embedding -> pre-norm nn.TransformerDecoder (self- and cross-attention to a projected memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.mem = nn.Linear(5, 8)
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(self.dec(self.tok(tokens), self.mem(memory)))


def _jitter(model: nn.Module) -> nn.Module:
    """Every parameter moved off its initial value (LayerNorm gains of 1, zero biases would hide mistakes)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.double().eval()


def _ours():
    return Transformer(in_features=4, seq_len=5, num_classes=3, d_model=8, depth=2, num_heads=2, mlp_hidden=4)


FAMILIES = {
    # (model, attention whose head_dim is named, input shape or a function of the seed)
    "ours": (_ours, "blocks.1.attn", (3, 5, 4)),
    "encoder-pre-norm": (lambda: Encoder(True), "enc.layers.0.self_attn", (3, 5, 4)),
    "decoder-pre-norm": (Decoder, "dec.layers.1.multihead_attn", lambda seed: (
        torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(seed)), _x((2, 6, 5), seed))),
    "torchvision-vit": (lambda: VisionTransformer(8, 4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=8,
                                                  num_classes=3), "encoder.layers.encoder_layer_1.self_attention",
                        (2, 3, 8, 8)),
    # torchvision's Swin: the last stage (a stage before a patch merging only duplicates, test below)
    "torchvision-swin": (lambda: SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                                 window_size=[2, 2], num_classes=3), "features.3.0.attn", (2, 3, 8, 8)),
}


def _attentions(model: nn.Module) -> list[nn.Module]:
    swin = "relative_position_bias_table"
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) or hasattr(m, swin)]


def _shape(m: nn.Module) -> tuple[int, int, int]:
    """(heads, head_dim, width) of an nn.MultiheadAttention or a torchvision Swin attention."""
    if isinstance(m, nn.MultiheadAttention):
        assert tuple(m.in_proj_weight.shape) == (3 * m.embed_dim, m.embed_dim)
        return m.num_heads, m.head_dim, m.embed_dim
    assert m.qkv.out_features == 3 * m.proj.in_features
    return m.num_heads, m.proj.in_features // m.num_heads, m.proj.in_features


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _inputs(shape, seed: int) -> tuple[torch.Tensor, ...]:
    return shape(seed) if callable(shape) else (_x(shape, seed),)


@pytest.mark.parametrize("mode", ["zero", "split"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_dim_of_stock_attention_grows_exactly_in_every_attention_on_the_stream(family, mode):
    build, attn, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = _jitter(build())
    x, fresh = _inputs(shape, 0), _inputs(shape, 1)
    with torch.no_grad():
        before = model(*fresh)
    named = _shape(model.get_submodule(attn))
    k = named[1] if mode == "split" else 3  # a split must duplicate every dim (the stream's LayerNorm)
    old = {id(m): _shape(m) for m in _attentions(model)}
    ff.widen(model, x, {f"{attn}.head_dim": k}, mode=mode)
    with torch.no_grad():
        drift = (model(*fresh) - before).abs().max().item()
    assert drift < 1e-10, drift
    assert check_attrs(model) == []
    grown = [m for m in _attentions(model) if _shape(m) != old[id(m)]]
    assert model.get_submodule(attn) in grown
    for m in grown:  # every attention on the stream: its heads kept, each k dims wider
        heads, hd, _ = old[id(m)]
        assert _shape(m) == (heads, hd + k, heads * (hd + k))
    if family != "torchvision-swin":  # one stream: every attention grew
        assert len(grown) == len(old)


def test_each_part_of_the_completion_is_needed():
    """Not exact by accident: nonzero new key rows, or the query rows' rescaling taken back, move the output."""
    torch.manual_seed(0)
    model = _jitter(_ours())
    x, fresh = _x((3, 5, 4), 0), _x((3, 5, 4), 1)
    with torch.no_grad():
        before = model(fresh)
    ff.widen(model, x, {"blocks.0.attn.head_dim": 2}, mode="zero")
    m = model.blocks[0].attn
    e, hd = m.embed_dim, m.head_dim
    new = [h * hd + j for h in range(m.num_heads) for j in (hd - 2, hd - 1)]
    old = [r for r in range(e) if r not in new]
    w = m.in_proj_weight
    assert w[e:2 * e][new].abs().max().item() == 0.0 and m.out_proj.weight[:, new].abs().max().item() == 0.0
    for edit in ("key", "query"):
        probe = copy.deepcopy(model)
        pw, pb = probe.blocks[0].attn.in_proj_weight, probe.blocks[0].attn.in_proj_bias
        with torch.no_grad():
            if edit == "key":
                pw[e:2 * e][new] = 0.5
            else:
                pw[:e][old] /= (hd / (hd - 2)) ** 0.5
                pb[:e][old] /= (hd / (hd - 2)) ** 0.5
            assert (probe(fresh) - before).abs().max().item() > 1e-4, edit


def test_grown_head_dims_learn_and_undo_restores_everything():
    torch.manual_seed(0)
    model = _jitter(_ours()).train()
    x, y = _x((8, 5, 4), 0), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    ref, ref_opt = copy.deepcopy(model), copy.deepcopy(opt.state_dict())

    def plan() -> Plan:
        graph = ff.analyze(model, x)
        return Plan([GroupChange(graph["blocks.0.attn.head_dim"], new=NewUnits(2, init="random"))],
                    input_shapes=[list(x.shape)])

    apply_undoable(model, plan(), opt, example_inputs=(x,))()  # grown, then taken back at once
    for a, b in zip(_attentions(model), _attentions(ref)):
        assert (a.embed_dim, a.num_heads, a.head_dim) == (b.embed_dim, b.num_heads, b.head_dim)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values()))
    assert all(torch.equal(s["exp_avg"], r["exp_avg"])
               for s, r in zip(opt.state_dict()["state"].values(), ref_opt["state"].values()))

    ff.apply(model, plan(), opt, example_inputs=(x,))
    m = model.blocks[0].attn
    assert (m.num_heads, m.head_dim, m.embed_dim) == (2, 6, 12)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if not losses:
            new_keys = [12 + h * 6 + j for h in range(2) for j in (4, 5)]
            assert m.in_proj_weight.grad[new_keys].abs().sum().item() > 0  # the new dims learn
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]


def test_swin_before_a_patch_merging_grows_head_dim_by_duplication_only():
    torch.manual_seed(0)
    model = _jitter(FAMILIES["torchvision-swin"][0]())
    x, fresh = _x((2, 3, 8, 8), 0), _x((2, 3, 8, 8), 1)
    with torch.no_grad():
        before = model(fresh)
    with pytest.raises(ApproximationRequiredError, match="4 times over"):
        ff.widen(model, x, {"features.1.0.attn.head_dim": 2}, mode="zero")
    ff.widen(model, x, {"features.1.0.attn.head_dim": 4}, mode="split")  # every dim duplicated: exact
    with torch.no_grad():
        assert (model(fresh) - before).abs().max().item() < 1e-10
    assert _shape(model.features[1][0].attn) == (2, 8, 16) and check_attrs(model) == []


def test_what_cannot_grow_head_dim_says_why():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ApproximationRequiredError, match="post-norm block"):  # the stream's own limit
        ff.widen(Encoder(False), x, {"enc.layers.0.self_attn.head_dim": 2}, mode="zero")
    post, fresh = _jitter(Encoder(False)), _x((3, 5, 4), 1)  # there, duplicating every dim is exact
    with torch.no_grad():
        before = post(fresh)
    ff.widen(post, (_x((3, 5, 4), 0),), {"enc.layers.0.self_attn.head_dim": 4}, mode="split")
    with torch.no_grad():
        assert (post(fresh) - before).abs().max().item() < 1e-10
    assert post.enc.layers[1].self_attn.head_dim == 8 and check_attrs(post) == []

    class TwoHeadCounts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.a = nn.MultiheadAttention(8, 2, batch_first=True)
            self.b = nn.MultiheadAttention(8, 4, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = self.inp(t)
            h = h + self.a(h, h, h, need_weights=False)[0]
            h = h + self.b(h, h, h, need_weights=False)[0]
            return self.out(h.mean(1))

    graph = ff.analyze(TwoHeadCounts(), x)
    why = graph["a.head_dim"].blocked
    assert why is not None and "different head counts [2, 4]" in why[1]
    assert "different head counts [2, 4]" in graph["b.head_dim"].blocked[1]
    assert graph["inp"].growable  # whole heads (blocks of 4 channels) still grow the stream


def test_growers_leave_it_alone_unless_named_and_a_grown_model_reloads(tmp_path):
    torch.manual_seed(0)
    model = _ours()
    x, y = torch.randn(16, 5, 4), torch.randint(0, 3, (16,))
    graph = ff.analyze(model, x)
    name = "blocks.0.attn.head_dim"
    assert graph[name].growable and graph[name].on_request and graph["blocks.1.attn.head_dim"] is graph[name]
    plain = copy.deepcopy(model)
    make_grower("random", budget=0.3, seed=0).grow(plain, [(x, y)], F.cross_entropy)
    assert plain.blocks[0].attn.head_dim == 4  # left alone unless named
    report = make_grower("random", budget=0.3, seed=0, groups=[name]).grow(model, [(x, y)], F.cross_entropy)
    assert model.blocks[0].attn.head_dim > 4 and report.extra.get("skipped_groups", {}) == {}
    assert check_attrs(model) == []
    ff.save(model, str(tmp_path / "grown.pt"))
    loaded = ff.load(str(tmp_path / "grown.pt"), _ours)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert loaded.blocks[1].attn.head_dim == model.blocks[1].attn.head_dim and check_attrs(loaded) == []


class CrossAttention(nn.Module):
    """Tokens attend to a memory of another width (kdim = vdim = 6: separate q/k/v projection weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.ln, self.mem = nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(5, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h, mem = self.tok(tokens), torch.relu(self.mem(memory))
        return self.out(h + self.attn(self.ln(h), mem, mem, need_weights=False)[0])


def test_cross_attention_with_its_own_key_width_grows_heads_memory_and_head_dim_exactly():
    torch.manual_seed(0)
    model = _jitter(CrossAttention())
    gen = torch.Generator().manual_seed(3)
    x = (torch.randint(0, 11, (2, 4), generator=gen), torch.randn(2, 6, 5, dtype=torch.float64, generator=gen))
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"tok": 4}, mode="zero")  # one head more (the stream, by head_dim)
    ff.widen(model, x, {"mem": 3}, mode="zero")  # the memory: the key and value projections' columns
    ff.widen(model, x, {"attn.head_dim": 2}, mode="zero")
    m = model.attn
    assert (m.embed_dim, m.num_heads, m.head_dim, m.kdim, m.vdim) == (18, 3, 6, 9, 9) and check_attrs(model) == []
    assert tuple(m.k_proj_weight.shape) == (18, 9)
    with torch.no_grad():
        assert (model(*x) - ref(*x)).abs().max().item() < 1e-10


def test_swin_last_stage_grows_whole_heads_with_their_bias_columns():
    """A new head of torchvision's Swin is head_dim new stream channels: its bias table column is any value (the
    head's output columns are zero), so the LayerNorm'd stream's completion does not refuse it."""
    torch.manual_seed(0)
    model = _jitter(FAMILIES["torchvision-swin"][0]())
    x, fresh = _x((2, 3, 8, 8), 0), _x((2, 3, 8, 8), 1)
    with torch.no_grad():
        before = model(fresh)
    ff.widen(model, x, {"features.2.reduction": 8}, mode="zero")
    attn = model.features[3][0].attn
    assert (attn.num_heads, attn.relative_position_bias_table.shape[1]) == (3, 3) and check_attrs(model) == []
    with torch.no_grad():
        assert (model(fresh) - before).abs().max().item() < 1e-10
