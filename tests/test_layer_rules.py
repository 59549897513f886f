"""One rule per layer type; a capture that survives stock transformer layers; heads, grouped convs,
per-sample ops and new blocks grow exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth
from zoo import ZOO, randomize_norm_stats

import firefly_descent as ff
from firefly_descent.analysis import Propagation
from firefly_descent.analysis.graph import Constraint, Member
from firefly_descent.analysis.rules import rule_for, unregister_rule
from firefly_descent.engine import check_attrs
from firefly_descent.plan import GroupChange, NewUnits, Plan, Split


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (1.0 + b.abs().max().item())


def _check_preserved(model: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> float:
    model.eval()
    ref.eval()
    with torch.no_grad():
        err = _rel_err(model(x), ref(x))
    assert err <= tol, err
    return err


# ---- a custom attention-like module, taught to the library from this file alone --------------------------
class TinyAttention(nn.Module):
    """Multi-head self-attention on [B, T, D] with its own parameters (not nn.MultiheadAttention)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.wq = nn.Parameter(torch.randn(inner, dim) / math.sqrt(dim))
        self.wk = nn.Parameter(torch.randn(inner, dim) / math.sqrt(dim))
        self.wv = nn.Parameter(torch.randn(inner, dim) / math.sqrt(dim))
        self.wo = nn.Parameter(torch.randn(dim, inner) / math.sqrt(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(w: torch.Tensor) -> torch.Tensor:
            return (x @ w.t()).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        att = torch.softmax(heads(self.wq) @ heads(self.wk).transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return (att @ heads(self.wv)).transpose(1, 2).reshape(b, t, -1) @ self.wo.t()


class TinyAttentionRule(ff.LayerRule):
    """Input units are read by wq/wk/wv; the heads are their own group (whole heads only); wo writes
    a new output group."""

    attrs = ("num_heads",)

    def propagate(self, a: Propagation, node, m: TinyAttention, name: str):
        lay, _ = a.layout_or_fixed(node.args[0])
        for p in ("wq", "wk", "wv"):
            a.add_members(lay[-1], f"{name}.{p}", 1, "consumer", "weight", name)
        heads = a.new_group(m.num_heads * m.head_dim, f"{name}.heads")
        for p in ("wq", "wk", "wv"):
            a.members[heads].append(Member(f"{name}.{p}", 0, "producer", "weight", name))
        a.members[heads].append(Member(f"{name}.wo", 1, "consumer", "weight", name))
        a.constraints[heads].append(Constraint("blocks", name, m.head_dim))
        out = a.new_group(m.wo.shape[0], name)
        a.members[out].append(Member(f"{name}.wo", 0, "producer", "weight", name))
        return list(lay[:-1]) + [((out, 1),)]

    def rederive(self, m: TinyAttention, before) -> None:
        m.num_heads = m.wq.shape[0] // m.head_dim

    def check(self, m: TinyAttention) -> bool:
        return m.wq.shape[0] == m.num_heads * m.head_dim == m.wo.shape[1]


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = TinyAttention(8, num_heads=2, head_dim=3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        return self.head(h.mean(dim=1))


@pytest.fixture
def tiny_attention_rule():
    ff.register_rule(TinyAttention, TinyAttentionRule())
    yield
    unregister_rule(TinyAttention)


def test_custom_attention_rule_grows_heads_exactly(tiny_attention_rule):
    torch.manual_seed(0)
    model, x = AttnNet(), torch.randn(2, 5, 6)
    graph = ff.analyze(model, x)
    assert graph["attn.heads"].growable and graph["embed"].growable  # attn's output joined the residual stream
    assert [c.kind for c in graph["attn.heads"].constraints] == ["blocks"]
    fresh = torch.randn(3, 5, 6)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"attn.heads": 3}, mode="zero")  # one new head, zero output projection
    assert model.attn.num_heads == 3 and check_attrs(model) == []
    _check_preserved(model, ref, fresh)
    ff.widen(model, x, {"attn.heads": 6, "embed": 2}, mode="split")  # copy two whole heads; split 2 channels
    assert model.attn.num_heads == 5 and model.attn.wo.shape == (10, 15)
    _check_preserved(model, ref, fresh)
    with pytest.raises(ff.ApproximationRequiredError, match="whole blocks"):
        ff.widen(model, x, {"attn.heads": 2}, mode="zero")  # not a whole head
    assert model.attn.num_heads == 5


def test_optimizer_state_kept_through_head_growth(tiny_attention_rule):
    torch.manual_seed(0)
    model, x = AttnNet(), torch.randn(2, 5, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).pow(2).mean().backward()
    opt.step()
    old_avg = opt.state[model.attn.wq]["exp_avg"].clone()
    old_step = opt.state[model.attn.wq]["step"].clone()
    ff.widen(model, x, {"attn.heads": 3}, mode="zero", optimizer=opt)
    state = opt.state[model.attn.wq]
    assert torch.equal(state["exp_avg"][:6], old_avg) and state["exp_avg"][6:].abs().max() == 0
    assert torch.equal(state["step"], old_step)
    assert opt.state[model.attn.wo]["exp_avg"].shape == (8, 9)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()  # one step runs with the remapped state
    assert model.attn.wo.grad[:, 6:].abs().sum() > 0  # the new head's output projection learns first
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    assert model.attn.wv.grad[6:].abs().sum() > 0  # then its values, through the now non-zero projection


def test_rules_are_one_registry():
    # built-ins are found through the same registry a user's rule goes into
    assert type(rule_for(nn.Linear(2, 2))).__name__ == "LinearRule"
    assert type(rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))).__name__ == "LinearRule"
    assert type(rule_for(nn.MultiheadAttention(4, 2))).__name__ == "MultiheadAttentionRule"
    assert rule_for(nn.Module()) is None


# ---- stock transformer layers -----------------------------------------------------------------------------
def _encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.Sequential(
        nn.Linear(5, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 3)
    )
    randomize_norm_stats(model, seed=1)
    return model.eval(), torch.randn(2, 7, 5)


def test_stock_transformer_encoder_is_captured_and_its_ffn_grows():
    model, x = _encoder()
    graph = ff.analyze(model, x)  # the symbolic trace fails inside the layer; the running capture takes over
    ffn = [g for g in graph.growable() if g.name.endswith("linear1")]
    assert len(ffn) == 2
    fresh = torch.randn(3, 7, 5)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {ffn[0].name: 5}, mode="split")
    ff.widen(model, x, {ffn[1].name: 7}, mode="zero")
    _check_preserved(model, ref, fresh)
    assert model[1].layers[1].linear1.out_features == 71


def test_post_norm_embedding_width_needs_opt_in_or_full_duplication():
    model, x = _encoder()  # stock post-norm layers: new units cannot be completed exactly
    graph = ff.analyze(model, x)
    embed = graph["0"]
    assert {c.kind for c in embed.constraints} == {"layernorm", "blocks"}
    with pytest.raises(ff.ApproximationRequiredError, match="post-norm block"):
        ff.widen(model, x, {"0": 8}, mode="zero")
    fresh = torch.randn(3, 7, 5)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"0": 32}, mode="split")  # every unit duplicated once: every head copied, exact
    attn = model[1].layers[0].self_attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (64, 8, 8) and check_attrs(model) == []
    _check_preserved(model, ref, fresh)
    ff.widen(model, x, {"0": 16}, mode="zero", approximate=True)  # two new heads: allowed when opted in
    assert model[1].layers[1].self_attn.num_heads == 10
    with torch.no_grad():
        assert torch.isfinite(model(fresh)).all()


# ---- capture -------------------------------------------------------------------------------------------------
class ShapeBranches(nn.Module):
    """Control flow on shapes (runs with the example's shapes); no control flow on values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if h.shape[-1] > 4:
            h = F.avg_pool2d(h, 2)
        for _ in range(h.size(1) // 6):
            h = h + torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def test_shape_dependent_control_flow_grows():
    torch.manual_seed(0)
    model, x = ShapeBranches(), torch.randn(2, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)  # the plain symbolic trace cannot follow it
    graph = ff.analyze(model, x)
    assert graph["conv"].growable
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"conv": 3}, mode="split")
    _check_preserved(model, ref, torch.randn(3, 3, 8, 8))


def test_value_dependent_control_flow_refuses_in_one_line():
    model, x = ZOO["data_dependent"]()
    with pytest.raises(ff.DataDependentControlFlowError) as info:
        ff.analyze(model, x)
    assert "\n" not in str(info.value) and "zoo.py:" in str(info.value)


class Unrunnable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[torch.nonzero(x[:, 0] > 0).flatten().tolist()]  # needs the values of x


def test_capture_failure_is_one_line_naming_the_model():
    with pytest.raises(ff.GrowthError) as info:
        ff.analyze(Unrunnable(), torch.randn(3, 4))
    msg = str(info.value)
    assert "\n" not in msg and "Unrunnable" in msg


# ---- grouped convolutions, per-sample ops ------------------------------------------------------------------
class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = StochasticDepth(0.5, "row")
        self.b = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h + self.drop(self.g(h))
        return self.fc(self.b(h).mean(dim=(2, 3)))


def test_grouped_conv_grows_by_whole_groups():
    torch.manual_seed(0)
    model, x = GroupedNet(), torch.randn(2, 3, 6, 6)
    randomize_norm_stats(model, seed=2)
    graph = ff.analyze(model, x)
    group = graph["a.0"]  # stochastic depth and the grouped conv carry the units through
    assert group.growable and any(c.kind == "conv_groups" and c.channels_per_group == 4 for c in group.constraints)
    fresh = torch.randn(3, 3, 6, 6)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"a.0": 4}, mode="split")  # copy conv group 0
    ff.widen(model, x, {"a.0": 8}, mode="zero")  # two new conv groups
    assert (model.g[0].groups, model.g[0].in_channels, model.g[0].out_channels) == (5, 20, 20)
    assert check_attrs(model) == []
    _check_preserved(model, ref, fresh)
    with pytest.raises(ff.ApproximationRequiredError, match="whole blocks"):
        ff.widen(model, x, {"a.0": 2}, mode="zero")
    # a split of a whole group out of order would mix groups: refused too
    g = ff.analyze(model, x)["a.0"]
    plan = Plan([GroupChange(g, splits=[Split(u) for u in (1, 0, 2, 3)])], input_shapes=[list(x.shape)])
    with pytest.raises(ff.ApproximationRequiredError):
        ff.apply(model, plan, example_inputs=x)


# ---- new blocks ---------------------------------------------------------------------------------------------
class PreNormBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class PreNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.Sequential(PreNormBlock(8), PreNormBlock(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


def test_new_block_with_zero_residual_outputs_is_exact_and_trains(tmp_path):
    torch.manual_seed(0)
    model, x = PreNormNet(), torch.randn(2, 6, 5)
    randomize_norm_stats(model, seed=4)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plan = ff.add_blocks(model, x, ["blocks.1"], optimizer=opt)
    assert plan.layers[0].spec["zero"] == ["attn.out_proj.bias", "attn.out_proj.weight", "mlp.2.bias", "mlp.2.weight"]
    new = model.blocks[1][1]
    assert isinstance(new, PreNormBlock) and new.attn.in_proj_weight.abs().sum() > 0  # q/k/v kept, not dead
    _check_preserved(model, ref, torch.randn(3, 6, 5))
    model.train()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    assert new.attn.out_proj.weight.grad.abs().sum() > 0 and new.mlp[2].weight.grad.abs().sum() > 0
    opt.step()
    # the new block is in the growth history: a checkpoint rebuilds it
    ff.save(model, str(tmp_path / "m.pt"))
    back = ff.load(str(tmp_path / "m.pt"), build=lambda: PreNormNet())
    model.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_added_heads_in_a_custom_model_keep_new_units_listed(tiny_attention_rule):
    # a plan with explicit new-unit values on the heads group lands them on q, k and v
    torch.manual_seed(0)
    model, x = AttnNet(), torch.randn(2, 5, 6)
    g = ff.analyze(model, x)["attn.heads"]
    q = torch.randn(3, 1, 8)  # [count, *one unit's slice]
    plan = Plan([GroupChange(g, new=NewUnits(3, incoming={"attn.wq": q}))], input_shapes=[list(x.shape)])
    ref = copy.deepcopy(model)
    ff.apply(model, plan, example_inputs=x)
    assert torch.equal(model.attn.wq[6:].detach(), q[:, 0]) and model.attn.wo[:, 6:].abs().max() == 0
    _check_preserved(model, ref, torch.randn(3, 5, 6))


class Seq2Seq(nn.Module):
    """Token embedding -> pre-norm decoder with cross-attention to a projected memory -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 16)
        self.mem = nn.Linear(5, 16)
        layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 1)
        self.out = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(self.dec(self.tok(tokens), self.mem(memory)))


def test_embedding_and_cross_attention_decoder_grow_exactly():
    torch.manual_seed(0)
    model = Seq2Seq()
    randomize_norm_stats(model, seed=3)
    model.eval()
    x = (torch.randint(0, 11, (2, 4)), torch.randn(2, 6, 5))
    graph = ff.analyze(model, x)
    stream = graph["tok"]  # cross-attention ties the memory projection to the token stream
    assert any(m.tensor == "mem.weight" and m.role == "producer" for m in stream.members)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"tok": 16, "dec.layers.0.linear1": 4}, mode="split")
    assert model.tok.embedding_dim == 32 and model.dec.layers[0].multihead_attn.num_heads == 4
    assert check_attrs(model) == []
    fresh = (torch.randint(0, 11, (3, 4)), torch.randn(3, 6, 5))
    with torch.no_grad():
        assert _rel_err(model(*fresh), ref(*fresh)) <= 1e-5


class BrokenRule(ff.LayerRule):
    def propagate(self, a, node, m, name):
        raise IndexError("tuple index out of range")


def test_a_failing_rule_blocks_what_it_touches_with_one_line():
    ff.register_rule(TinyAttention, BrokenRule())
    try:  # an internal error never escapes: the groups the node reads are blocked, the reason names it
        graph = ff.analyze(AttnNet(), torch.randn(2, 5, 6))
        reasons = [g.blocked[1] for g in graph.groups.values() if g.blocked and "IndexError" in g.blocked[1]]
        assert reasons and all("\n" not in r and "attn" in r for r in reasons)
    finally:
        unregister_rule(TinyAttention)


class PairLinear(nn.Module):
    """A linear map whose outputs come in pairs (say, complex numbers): it grows by whole pairs."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def test_declarative_module_rule_with_blocks():
    model = nn.Sequential(nn.Linear(3, 4), PairLinear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(5, 3)
    ff.register_module_rule(
        PairLinear,
        ff.ModuleRule(
            consumes=[(0, -1, [("weight", 1)])], produces=[(None, -1, [("weight", 0)])], blocks=[(None, -1, 2)]
        ),
    )
    try:
        assert [c.kind for c in ff.analyze(model, x)["1"].constraints] == ["blocks"]
        with pytest.raises(ff.ApproximationRequiredError, match="blocks of 2"):
            ff.widen(model, x, {"1": 1}, mode="zero")
        ref = copy.deepcopy(model)
        ff.widen(model, x, {"1": 4}, mode="split")
        assert model[1].weight.shape == (10, 4)
        _check_preserved(model, ref, torch.randn(7, 3))
    finally:
        unregister_rule(PairLinear)


class GLU(nn.Module):
    """A gated FFN written with `chunk` (or `split`): fc1's rows are the value half and the gate half."""

    def __init__(self, how: str = "chunk", norm: bool = False) -> None:
        super().__init__()
        self.how = how
        self.inp = nn.Linear(5, 8)
        self.fc1 = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(6) if norm else nn.Identity()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.inp(x))
        value, gate = h.chunk(2, dim=-1) if self.how == "chunk" else torch.split(h, h.shape[-1] // 2, dim=-1)
        return self.fc2(self.norm(value * F.silu(gate)))


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_a_glu_written_with_chunk_grows_by_pairs_of_rows_exactly(how):
    torch.manual_seed(0)
    model = GLU(how).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    group = ff.analyze(model, x)["fc1"]
    assert group.growable and group.width == 6
    assert sorted((m.tensor, m.offset) for m in group.producers()) == [
        ("fc1.bias", 0), ("fc1.bias", 6), ("fc1.weight", 0), ("fc1.weight", 6)]
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"fc1": 3}, mode="zero")  # new pairs of rows, zero outgoing columns
    ff.widen(model, x, {"fc1": 2}, mode="split")
    assert (model.fc1.out_features, model.fc2.in_features) == (22, 11) and check_attrs(model) == []
    assert _check_preserved(model, ref, torch.randn(6, 5, dtype=torch.float64), tol=1e-12) <= 1e-12
    value, gate = model.fc1.weight.detach().chunk(2)  # a new unit's value and gate rows sit in the same slot
    assert value[6:9].abs().sum() > 0 and gate[6:9].abs().sum() > 0


def test_what_a_split_cannot_cut_says_why():
    x = torch.randn(4, 5)
    normed = ff.analyze(GLU(norm=True), x)  # a norm over gated units: the mean of rows is not the mean of units
    assert normed["fc1"].growable
    with pytest.raises(ff.ApproximationRequiredError, match="combines several rows"):
        ff.widen(GLU(norm=True), x, {"fc1": 2}, mode="zero")

    class Shared(nn.Module):  # the stream is read by fc before it is cut: its units cannot become two groups
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.fc, self.out = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(4, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = self.inp(t)
            a, b = (h + self.fc(h)).chunk(2, dim=-1)
            return self.out(a * b)

    why = ff.analyze(Shared(), x)["inp"].blocked
    assert why is not None and "splits a grown dim through units other layers already share" in why[1]

    class Literal(GLU):  # a literal size would cut a grown dim into more parts than the forward unpacks
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            value, gate = torch.split(self.fc1(self.inp(t)), 6, dim=-1)
            return self.fc2(value * F.silu(gate))

    why = ff.analyze(Literal(), x)["fc1"].blocked
    assert why is not None and "parts of a fixed size" in why[1]


class ConvGLU(nn.Module):
    """A conformer-style conv module: pointwise conv to 2C channels, GLU over them, depthwise conv, BatchNorm."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.pw1, self.glu = nn.Conv1d(4, 12, 1), nn.GLU(dim=1)
        self.dw, self.bn, self.pw2 = nn.Conv1d(6, 6, 3, padding=1, groups=6), nn.BatchNorm1d(6), nn.Conv1d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pw1(x), dim=1) if self.functional else self.glu(self.pw1(x))
        return self.pw2(torch.relu(self.bn(self.dw(h))))


@pytest.mark.parametrize("functional", [False, True])
def test_glu_grows_by_pairs_of_channels_through_a_depthwise_conv(functional):
    torch.manual_seed(0)
    model = randomize_norm_stats(ConvGLU(functional)).double().eval()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ff.widen(model, x, {"pw1": 2}, mode="zero")
    ff.widen(model, x, {"pw1": 3}, mode="split")
    assert (model.pw1.out_channels, model.dw.groups, model.pw2.in_channels) == (22, 11, 11)
    assert check_attrs(model) == []
    assert _check_preserved(model, ref, torch.randn(3, 4, 7, dtype=torch.float64), tol=1e-12) <= 1e-12


def test_firefly_candidates_on_a_glu_apply_as_the_over_grown_copy_computed():
    """A GLU unit is a pair of fc1 rows: Firefly's new units and splits carry trained rows at both offsets, exact
    when off, and the engine applies the kept ones as the over-grown copy computed them."""
    from firefly_descent.budget import Candidate
    from firefly_descent.methods import Firefly
    from firefly_descent.methods.firefly.candidates import build_width_candidates

    torch.manual_seed(0)
    model = GLU().double().eval()
    x, fresh = (torch.randn(4, 5, dtype=torch.float64),), torch.randn(6, 5, dtype=torch.float64)
    graph = ff.analyze(model, *x)
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    cands = build_width_candidates(model, graph, [graph["fc1"]], {"fc1": 2}, True, x, init,
                                   torch.Generator().manual_seed(0))
    assert sorted(cands.new_in["fc1"]) == ["fc1.weight@0", "fc1.weight@6"]  # value and gate rows
    cands.bank.alpha = 0.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() < 1e-12
    cands.bank.gates["new:fc1"][:] = 1.0
    cands.bank.gates["split:fc1"][:2] = 1.0
    with torch.no_grad():
        target = cands.net(fresh)
    assert (target - model(fresh)).abs().max().item() > 1e-3
    kept = [Candidate(kind, "fc1", j, -1.0, 1.0) for kind in ("new", "split") for j in range(2)]
    ff.apply(model, Firefly()._materialize(graph, cands, None, kept, x), example_inputs=x, verify=False)
    with torch.no_grad():
        assert (model(fresh) - target).abs().max().item() < 1e-10
