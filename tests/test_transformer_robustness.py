"""Robustness on stock transformers (issue 23, items 3 and 4): a module wrapped by `Then` keeps its
attributes reachable where its parent reads them, one depth candidate that cannot be inserted is dropped
with its reason rather than failing the step, and the analysis of Hugging Face models never raises an
internal error."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.layers import Then
from firefly_descent.methods import Firefly
from firefly_descent.methods.firefly.depth_candidates import build_depth_candidates


def _encoder(seed: int = 0, d: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are off for norm_first
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, norm_first=True, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2)


# ---- Then ------------------------------------------------------------------------------------------------
def test_then_reads_the_followed_modules_attributes_but_not_its_methods_or_private_names():
    first = nn.Linear(3, 4)
    then = Then(first, nn.ReLU())
    assert then.weight is first.weight and then.in_features == 3
    assert then[0] is first and len(then) == 2
    assert not hasattr(then, "reset_parameters")  # a method: Then must not pass for the Linear it wraps
    assert not hasattr(then, "_no_such") and not hasattr(then, "no_such")
    with pytest.raises(AttributeError, match="no_such"):
        _ = then.no_such
    nested = Then(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Identity())  # its "1" is not the wrapped one's
    assert isinstance(nested[1], nn.Identity) and len(nested) == 2


def test_then_survives_deepcopy_and_save_load():
    model = nn.Sequential(Then(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    twin = copy.deepcopy(model)
    assert twin[0].weight is not model[0].weight and torch.equal(twin[0].weight, model[0].weight)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded[0], Then) and loaded[0].out_features == 4
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(twin(x), model(x))


def test_stock_encoder_deepens_after_layers_0_exactly_and_trains():
    model = _encoder()
    x = torch.randn(3, 5, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    ff.deepen(model, x, after=["layers.0"])
    assert isinstance(model.layers[0], Then) and model.layers[0].self_attn is model.layers[0][0].self_attn
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() < 1e-5
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    new = model.layers[0][1]
    scale0 = new.scale.detach().clone()
    loss = model(x).pow(2).mean()
    loss.backward()
    assert new.scale.grad is not None and new.scale.grad.abs().item() > 0
    opt.step()
    assert not torch.equal(new.scale.detach(), scale0)
    assert torch.isfinite(model(x)).all()


# ---- one candidate never fails the step ----------------------------------------------------------------------
def _data(out: int = 3, n: int = 4) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 5, 4, generator=gen), torch.randn(16, 5, out, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("candidates", ["depth", "all"])
def test_firefly_grows_the_stock_encoder_with_depth_candidates(candidates):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _encoder(), nn.Linear(8, 3))
    report = Firefly(budget="params:2000", candidates=candidates, step_one_steps=5, seed=0).grow(
        model, _data(), F.mse_loss
    )
    blocks = report.extra["depth"]["blocks"]
    assert {b["after"] for b in blocks} == {"1.layers.0", "1.layers.1"}
    assert "skipped_candidates" not in report.extra
    assert any(b["kept"] for b in blocks)
    assert report.params_after > report.params_before


class _Tagged(nn.Linear):
    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self._tag = 2.0  # private: `Then` does not pass private names through


class _Reads(nn.Module):
    """A parent that reads a private attribute of its child `a`: a layer inserted after `a` breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _Tagged(4, 8)
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x)) * self.a._tag))


def test_a_depth_candidate_that_cannot_be_inserted_is_dropped_with_its_reason():
    torch.manual_seed(0)
    model = _Reads()
    x = torch.randn(6, 4)
    graph = ff.analyze(model, x)
    depth = build_depth_candidates(model, graph, ["a", "b.1", "nowhere"], (x,), init_scale=0.5, block="layer")
    assert depth.after == ["b.1"] and len(depth.layers) == 1
    assert set(depth.skipped) == {"a", "nowhere"}
    assert "nowhere" in depth.skipped["nowhere"] and "AttributeError" in depth.skipped["a"]
    depth.bank.alpha = 0.0
    with torch.no_grad():
        assert (depth.net(x) - model(x)).abs().max().item() < 1e-6
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(4)]
    grower = Firefly(budget="params:500", candidates="all", depth_after=["a", "b.1"], step_one_steps=5, seed=0)
    report = grower.grow(model, data, F.mse_loss)
    assert "AttributeError" in report.extra["skipped_candidates"]["new layer after a"]
    assert "skipped new layer after a" in str(report)
    assert [b["after"] for b in report.extra["depth"]["blocks"]] == ["b.1"]


# ---- the analysis never raises an internal error --------------------------------------------------------------
def _hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_language_models_analyse_and_blocked_groups_say_where(kind):
    model = _hf(kind)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = ff.analyze(model, ids)
    if kind == "gpt2":  # transformers' Conv1D has a rule (transformers_rules.py): the stream and the MLPs grow
        assert graph["transformer.wte"].blocked is None and graph["transformer.wte"].width == 32
        mlp = [g for g in graph.growable() if g.name.endswith("mlp.c_fc")]
        assert len(mlp) == 2 and all(g.width == 128 for g in mlp)
        assert graph["transformer.h.0.attn.heads"].growable  # GPT2Attention is kept whole (transformers_rules.py)
        assert graph["transformer.h.0.attn.head_dim"].on_request  # its head_dim grows when named (test_head_dim)
    for g in graph.groups.values():
        if g.blocked is None:
            continue
        kind_, why = g.blocked
        assert why and "analysis failed" not in why
        if kind_ == "UnsupportedOpError":  # an op: named with its module and the user's source line
            assert ".py:" in why and "<string>" not in why, why
    if kind == "llama":
        mlp = [g for g in graph.growable() if g.name.endswith("mlp.gate_proj")]
        assert len(mlp) == 2 and all(g.width == 64 for g in mlp)
        with torch.no_grad():
            before = model(ids).logits
        ff.widen(model, ids, {mlp[0].name: 8})
        assert model.model.layers[0].mlp.up_proj.out_features == 72
        with torch.no_grad():
            assert (model(ids).logits - before).abs().max().item() < 1e-5


def test_an_op_whose_rule_fails_blocks_its_groups_and_the_analysis_goes_on(monkeypatch):
    from firefly_descent.analysis import shapeops

    def broken(a, node):
        raise IndexError("list index out of range")

    monkeypatch.setitem(shapeops.FUNCTION_RULES, torch.tanh, broken)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))

    graph = ff.analyze(Net(), torch.randn(2, 4))
    kind, why = graph["a"].blocked
    assert kind == "UnsupportedOpError" and "function tanh" in why and "IndexError" in why
    assert "test_transformer_robustness.py:" in why and "torch.tanh" in why
    assert graph["b"].blocked is None and graph["b"].width == 5  # the rest is analysed as before


def test_cat_skips_a_legacy_empty_tensor():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(torch.cat([x.new_zeros(0), self.a(x)], dim=-1)))

    graph = ff.analyze(Net(), torch.randn(2, 4))
    assert graph["a"].blocked is None and graph["a"].width == 6


def test_a_tensor_method_that_returns_several_tensors_blocks_what_it_reads():
    """`x.tensor_split(2, dim=-1)`: no rule says which units each piece holds, so the group it reads is blocked;
    before, a tuple output silently dropped the group's layout (growable, wrong). `chunk` has a rule (a GLU's two
    halves become one group of row pairs: tests/test_layer_rules.py)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u, v = self.a(x).tensor_split(2, dim=-1)
            return self.b(u * torch.sigmoid(v))

    graph = ff.analyze(Net(), torch.randn(2, 4))
    kind, why = graph["a"].blocked
    assert kind == "UnsupportedOpError" and "method .tensor_split()" in why and "test_transformer_robustness.py:" in why
    assert [g.name for g in graph.growable()] == []
