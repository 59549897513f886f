"""Widening the model width of a LayerNorm/RMSNorm residual stream exactly (issue 23, item 1): the writers' new
rows are the mean (LayerNorm) or zero (RMSNorm), each norm's old gains are scaled by sqrt(d/(d+n)) and its eps
by d/(d+n), completed by the engine from the constraint's registered completion, with no `approximate=True`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.budget import Candidate
from firefly_descent.engine import apply_undoable, check_attrs
from firefly_descent.methods import Firefly, make_grower
from firefly_descent.methods.firefly.candidates import block_size, build_width_candidates, splittable
from firefly_descent.plan import GroupChange, NewUnits, Plan, Split

V, T = 11, 5


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.ln1, self.ln2 = norm(d), norm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PreNormLM(nn.Module):
    """Token embedding + a learned position parameter, pre-norm blocks, a final norm (or none: the head then
    reads the raw stream) and a head."""

    def __init__(self, d: int = 8, heads: int = 2, depth: int = 2, norm: type[nn.Module] = nn.LayerNorm,
                 final_norm: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.randn(1, T, d))
        self.blocks = nn.ModuleList(Block(d, heads, 2 * d, norm) for _ in range(depth))
        self.norm = norm(d) if final_norm else nn.Identity()
        self.head = nn.Linear(d, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def _randomised(model: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Random gains and biases everywhere (not the init's ones and zeros), so a wrong rescale shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def _lm(**kw) -> nn.Module:
    torch.manual_seed(0)
    return _randomised(PreNormLM(**kw))


def _tokens(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _drift(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    ya, yb = getattr(ya, "logits", ya), getattr(yb, "logits", yb)
    return (ya - yb).abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_prenorm_layernorm_stream_widens_exactly(dtype, tol):
    model = _randomised(PreNormLM(), dtype)
    x, fresh = _tokens(0), _tokens(1, 4)
    group = ff.analyze(model, (x,))["emb"]
    assert {c.kind for c in group.constraints} == {"layernorm", "blocks"}
    assert block_size(group) == 4 and not splittable(group)
    ref, keys = copy.deepcopy(model), list(model.state_dict())
    ff.widen(model, (x,), {"emb": 8}, mode="zero")  # two new heads' worth of stream units, exact
    assert _drift(model, ref, fresh) < tol
    assert list(model.state_dict()) == keys and check_attrs(model) == []
    ln, old = model.blocks[0].ln1, ref.blocks[0].ln1
    assert ln.normalized_shape == (16,) and model.blocks[0].attn.num_heads == 4
    assert ln.eps == pytest.approx(old.eps * 8 / 16)
    torch.testing.assert_close(ln.weight[:8], old.weight * 0.5 ** 0.5)
    assert ln.bias[8:].abs().max() == 0
    # every writer's new rows are the mean of its old ones: the stream's new units are the mean of the old
    torch.testing.assert_close(model.emb.weight[:, 8:], model.emb.weight[:, :8].mean(1, keepdim=True).expand(-1, 8))
    torch.testing.assert_close(model.pos[..., 8:], model.pos[..., :8].mean(-1, keepdim=True).expand(-1, -1, 8))
    fc2 = model.blocks[1].fc2.weight
    torch.testing.assert_close(fc2[8:], fc2[:8].mean(0, keepdim=True).expand(8, -1))


def test_readers_of_the_normalised_stream_take_any_columns_and_raw_readers_the_plans():
    model = _lm(final_norm=False)  # the head reads the raw stream
    x, fresh = _tokens(0), _tokens(1, 4)
    group = ff.analyze(model, (x,))["emb"]
    gen = torch.Generator().manual_seed(3)
    normed = {f"blocks.{i}.fc1.weight": torch.randn(4, 16, 1, generator=gen, dtype=torch.float64) for i in (0, 1)}
    raw = {"head.weight": torch.randn(4, V, 1, generator=gen, dtype=torch.float64)}
    ref = copy.deepcopy(model)
    plan = Plan([GroupChange(group, new=NewUnits(4, outgoing={**normed, **raw}))], input_shapes=[[3, T]])
    # readers behind a norm see exact zeros on the new units: random columns there keep the function
    ff.apply(model, Plan([GroupChange(group, new=NewUnits(4, outgoing=normed))]), example_inputs=(x,))
    assert _drift(model, ref, fresh) < 1e-12
    assert model.blocks[0].fc1.weight[:, 8:].abs().min() > 0 and model.head.weight[:, 8:].abs().max() == 0
    # a raw reader's new columns are the plan's outgoing weights (the amplitude): zero at amplitude 0
    for amp, moved in ((0.0, False), (1.0, True)):
        m = copy.deepcopy(ref)
        p = plan.scaled(amp)
        p.function_preserving = not moved
        ff.apply(m, p, example_inputs=(x,))
        assert (_drift(m, ref, fresh) > 1e-3) == moved


def test_stock_encoder_norm_first_widens_exactly_and_post_norm_is_refused_by_name():
    def encoder(norm_first: bool) -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        model = nn.Sequential(nn.Linear(5, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                              nn.Linear(16, 3))
        return _randomised(model)

    x, fresh = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    model = encoder(norm_first=True)
    ref = copy.deepcopy(model)
    ff.widen(model, (x,), {"0": 8}, mode="zero")
    assert model[1].layers[1].self_attn.num_heads == 3 and check_attrs(model) == []
    assert _drift(model, ref, fresh) < 1e-12
    post = encoder(norm_first=False)
    before = copy.deepcopy(post.state_dict())
    with pytest.raises(ff.ApproximationRequiredError, match=r"'1\.layers\.0\.norm1'.*post-norm block '1\.layers\.0'"):
        ff.widen(post, (x,), {"0": 8}, mode="zero")
    assert all(torch.equal(v, post.state_dict()[k]) for k, v in before.items())  # untouched


def test_rmsnorm_stream_widens_exactly_and_sets_a_default_eps():
    model = _lm(norm=nn.RMSNorm)
    assert model.blocks[0].ln1.eps is None
    x, fresh = _tokens(0), _tokens(1, 4)
    assert {c.kind for c in ff.analyze(model, (x,))["emb"].constraints} == {"rmsnorm", "blocks"}
    ref = copy.deepcopy(model)
    ff.widen(model, (x,), {"emb": 4}, mode="zero")
    assert _drift(model, ref, fresh) < 1e-12
    assert model.blocks[0].ln1.eps == pytest.approx(torch.finfo(torch.float64).eps * 8 / 12)
    assert model.emb.weight[:, 8:].abs().max() == 0 and model.blocks[0].fc2.weight[8:].abs().max() == 0


def test_partial_splits_are_refused_and_whole_duplication_stays_exact():
    model = _lm()
    x, fresh = _tokens(0), _tokens(1, 4)
    with pytest.raises(ff.ApproximationRequiredError, match="duplicating only some of its units"):
        ff.widen(model, (x,), {"emb": 4}, mode="split")
    ref = copy.deepcopy(model)
    ff.widen(model, (x,), {"emb": 8}, mode="split")  # every unit once: every head copied
    assert _drift(model, ref, fresh) < 1e-12
    group = ff.analyze(model, (x,))["emb"]  # every unit duplicated and a new head inserted mid-stream at once
    plan = Plan([GroupChange(group, splits=[Split(i) for i in range(16)], new=NewUnits(8, positions=[4] * 8))])
    ff.apply(model, plan, example_inputs=(x,))
    assert _drift(model, ref, fresh) < 1e-12 and model.blocks[0].ln1.normalized_shape == (40,)


def test_widened_stream_trains_with_remapped_state_and_undo_restores_exactly():
    torch.manual_seed(0)
    model = _randomised(PreNormLM(), torch.float32)
    x, y = _tokens(0, 8), _tokens(5, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))

    loss().backward()
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    ln = model.blocks[0].ln1
    eps, shape = ln.eps, ln.normalized_shape
    group = ff.analyze(model, (x,))["emb"]
    plan = Plan([GroupChange(group, new=NewUnits(4, init="random"))], input_shapes=[[8, T]])
    undo = apply_undoable(model, plan, opt, (x,))
    assert ln.eps != eps and ln.normalized_shape == (12,)
    undo()
    assert ln.eps == eps and ln.normalized_shape == shape and model.blocks[0].attn.num_heads == 2
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(opt.state[p]["exp_avg"], state[n]) for n, p in model.named_parameters())
    assert check_attrs(model) == []

    ff.apply(model, plan, opt, (x,))
    for p in model.parameters():  # optimizer state follows every resized parameter
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
    assert opt.state[model.emb.weight]["exp_avg"][:, 8:].abs().max() == 0
    before = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < before
    assert model.emb.weight.grad[:, 8:].abs().max() > 0  # the new units learn


def test_firefly_proposes_stream_heads_exact_when_off_and_applies_them_exactly():
    model, x, fresh = _lm(), (_tokens(0),), _tokens(1, 4)
    graph = ff.analyze(model, x)
    stream = graph["emb"]
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    groups = [g for g in graph.growable() if block_size(g) is not None]
    assert stream in groups
    cands = build_width_candidates(model, graph, groups, {g.name: 8 if g is stream else 2 for g in groups}, True, x,
                                   init, torch.Generator().manual_seed(0))
    assert "split:emb" not in cands.bank.gates
    # the engine makes new stream units the mean of the old (zero after the norm); the candidates' incoming rows
    # are offsets on that mean, gated with the unit, for every producer of the stream
    producers = {m.tensor for m in stream.members if m.role == "producer" and m.kind == "weight"}
    assert {k.partition("@")[0] for k in cands.new_in["emb"]} == producers and "emb.weight" in cands.new_in["emb"]
    assert {"blocks.0.attn.in_proj_weight@0", "blocks.0.attn.in_proj_weight@16"} <= set(cands.new_in["emb"])
    cands.bank.alpha = 0.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() < 1e-12  # every candidate off: f exactly
    cands.bank.alpha = 0.0
    cands.bank.reset(requires_grad=False)
    # the stream's pool is one candidate: its units move the norms' statistics of every unit, so a subset of
    # it would not compute what the over-grown copy does (its other units still there at the mean)
    assert cands.blocks["emb"] == 8 and cands.blocks["blocks.0.fc1"] == 1
    cands.bank.gates["new:emb"][:] = 1.0  # the stream's pool on, together with an FFN unit's candidate
    cands.bank.gates["new:blocks.0.fc1"][0] = 1.0
    with torch.no_grad():
        target = cands.net(fresh)
    assert (target - model(fresh)).abs().max().item() > 1e-3  # the stream candidate changes the function
    kept = [Candidate("head", "emb", 0, -1.0, 8.0), Candidate("new", "blocks.0.fc1", 0, -1.0, 1.0)]
    plan = Firefly()._materialize(graph, cands, None, kept, x)
    off = copy.deepcopy(model)
    ff.apply(off, plan.scaled(0.0), example_inputs=x)  # exact at zero amplitude
    assert off.blocks[0].attn.num_heads == 4 and _drift(off, model, fresh) < 1e-12
    ff.apply(model, plan, example_inputs=x, verify=False)
    with torch.no_grad():
        assert (model(fresh) - target).abs().max().item() < 1e-10  # what the over-grown copy computed


def test_a_firefly_step_grows_the_stream():
    torch.manual_seed(0)
    teacher, model = PreNormLM(d=16, heads=4).eval(), PreNormLM().eval()
    tokens = torch.randint(0, V, (64, T))
    with torch.no_grad():
        labels = teacher(tokens).argmax(-1)
    data = [(tokens[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))

    grower = make_grower("firefly", budget="ratio:0.5", per_group=True, seed=0)
    report = grower.grow(model, data, loss_fn, example_inputs=(tokens[:4],))
    assert "emb" not in report.extra.get("skipped_groups", {})
    assert report.extra["pool"]["emb"]["splits"] == 0 and report.extra["pool"]["emb"]["new"] % 4 == 0
    assert model.emb.embedding_dim == 12 and model.blocks[0].attn.num_heads == 3 and check_attrs(model) == []
    assert report.safety.outcome in ("accepted", "shrunk")


def test_a_grown_stream_saves_and_replays_with_its_rescaled_eps(tmp_path):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return PreNormLM(norm=nn.RMSNorm).double().eval()

    model = _randomised(build())
    x, fresh = _tokens(0), _tokens(1, 4)
    ff.widen(model, (x,), {"emb": 4}, mode="zero")
    ff.widen(model, (x,), {"emb": 4}, mode="zero")
    ff.save(model, str(tmp_path / "grown.pt"))
    back = ff.load(str(tmp_path / "grown.pt"), build)
    assert back.blocks[1].ln2.eps == model.blocks[1].ln2.eps and back.emb.embedding_dim == 16
    assert _drift(back, model, fresh) == 0.0


def test_a_kept_block_copy_widens_with_the_stream_as_the_grown_blocks_do():
    from firefly_descent.methods.firefly.depth import _widen_copy

    model, x = _lm(), (_tokens(0),)
    stream = ff.analyze(model, x)["emb"]
    source = copy.deepcopy(model.blocks[0])
    changes = [GroupChange(stream, new=NewUnits(4))]
    widened = _widen_copy(source, "blocks.0", source.state_dict(), changes)
    ff.apply(model, Plan(changes), example_inputs=x)
    grown = model.blocks[0].state_dict()
    assert widened.keys() == grown.keys()
    for k, v in grown.items():  # the copy's norms rescaled and its writers' new rows the mean, like block 0's
        torch.testing.assert_close(widened[k], v, rtol=0, atol=1e-12)


class _FlatNorm(nn.Module):
    """A LayerNorm over a conv's flattened output: each channel is 16 positions of the normalised dim."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4 * 16)
        self.o = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.ln(self.c(x).flatten(1)))


def test_a_norm_over_positions_its_writer_does_not_write_whole_stays_refused():
    """The conv writes one value per channel and position, so no completion of its rows makes a new channel's 16
    positions the norm's mean over all 64: refused, not made exact by accident (a unit as wide as the norm's
    positions, as nn.MultiheadAttention's head_dim, is completed over all of them)."""
    with pytest.raises(ff.ApproximationRequiredError, match="normalises 64 units"):
        ff.widen(_FlatNorm(), torch.randn(2, 3, 4, 4), {"c": 2}, mode="zero")


class _ActOnStream(nn.Module):
    """LayerNorm'd streams with an activation on their raw units: a residual writer through GELU
    (`z + gelu(W LN z)`), or a stream that starts as `relu(embedding)`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb, self.ln, self.sq = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.ln2, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "writer":
            z = self.emb(x)
            z = z + F.gelu(self.sq(self.ln(z)))
        else:
            z = torch.relu(self.emb(x))
            z = z + self.sq(self.ln(z))
        return self.head(self.ln2(z))


@pytest.mark.parametrize(("kind", "act"), [("writer", "gelu"), ("start", "relu")])
def test_an_activation_on_a_normalised_streams_raw_units_refuses_new_units_with_the_reason(kind, act):
    """The completion makes a new unit the mean of the old ones; an activation on the raw units breaks that (the
    engine's check caught it as 'outputs moved', and random growth and Firefly failed with that). Now the
    analysis says why, growers skip the group, and duplicating every unit stays exact."""
    torch.manual_seed(0)
    model = _ActOnStream(kind).double().eval()
    x, fresh = torch.randn(4, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    g = ff.analyze(model, x)["emb"]
    assert "nonlinear" in [c.kind for c in g.constraints]
    with pytest.raises(ff.ApproximationRequiredError, match=f"an activation acts on its raw units \\({act} at"):
        ff.widen(copy.deepcopy(model), x, {"emb": 2}, mode="zero")
    dup = copy.deepcopy(model)
    ff.widen(dup, x, {"emb": 8}, mode="split")  # every unit once: exact
    assert _drift(dup, model, fresh) < 1e-12 and dup.emb.out_features == 16
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(6)]
    report = make_grower("random").grow(copy.deepcopy(model), data, F.cross_entropy)
    assert report.outcome == "empty" and "an activation acts on its raw units" in report.extra["skipped_groups"]["emb"]
    with pytest.raises(ff.GrowthError, match="an activation acts on its raw units"):
        make_grower("firefly").grow(copy.deepcopy(model), data, F.cross_entropy)
