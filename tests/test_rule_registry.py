"""The rule registry owns all layer knowledge (issue 22 item 1, issue 25 item 3).

- A new layer type is one rule in one file: `ScaledLinear` below is taught to the library by the one rule
  class and `register_rule` call in this file, and then grows under the analysis, the engine, Firefly, GradMax,
  splitting (exact and fast) and TINY.
- Functional activations (`F.relu`, `x.relu()`) are found by data flow, so every grower grows a model written
  with them exactly as the same model written with `nn.ReLU` modules: same decisions, same weights.
- The rules' unfolding (`unfold_input`, `output_rows`, `run_with`) is the layer's own arithmetic.

Tolerances: function preservation 1e-5 (float32); TINY's hook loss vs the engine's grown model 1e-10 (float64);
unfolding vs the layer's forward 1e-10 (float64); functional vs module: bit-identical (the same ops run).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import wrap_torch_function
from zoo import randomize_norm_stats

import firefly_descent as ff
from firefly_descent.analysis import LayerRule, register_rule, rule_for, unregister_rule
from firefly_descent.analysis.activations import (
    Activation,
    activation_of,
    activation_of_function,
    register_activation,
    unregister_activation,
)
from firefly_descent.analysis.graph import Member
from firefly_descent.analysis.rules import batchnorms, with_bias_column
from firefly_descent.methods import make_grower
from firefly_descent.methods.baselines import TINY, GradMax, SplittingExact
from firefly_descent.methods.firefly import Firefly
from firefly_descent.models._common import make_activation

pytestmark = pytest.mark.usefixtures("raw_plans")  # plans as decided, no safeguard (tests/conftest.py)


# ---- the one rule of a new layer type -------------------------------------------------------------------
class ScaledLinear(nn.Module):
    """A layer the library has never seen: its own parameters and forward, y = scale · (x Wᵀ + b)."""

    def __init__(self, d_in: int, d_out: int, scale: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(d_out))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(x, self.weight, self.bias)


class ScaledLinearRule(LayerRule):
    """Everything the library needs to know about ScaledLinear."""

    linear_map = True

    def propagate(self, a, node, m, name):  # analysis: weight dim 1 reads the input's units, dim 0 starts a group
        lay, s = a.layout_or_fixed(node.args[0])
        a.add_members(lay[-1], f"{name}.weight", 1, "consumer", "weight", name)
        g = a.new_group(m.weight.shape[0], name)
        a.members[g] += [Member(f"{name}.weight", 0, "producer", "weight", name),
                         Member(f"{name}.bias", 0, "producer", "bias", name)]
        a.channel_dims[g].append((node.name, len(s) - 1))
        return list(lay[:-1]) + [((g, 1),)]

    def unfold_reason(self, m):  # the methods: its weight multiplies its (scaled) input row by row
        return None

    def unfold_input(self, m, x):
        return m.scale * with_bias_column(x.reshape(-1, x.shape[-1]), m)

    def output_rows(self, m, y):
        return y.reshape(-1, y.shape[-1])

    def run_with(self, m, x, weight, bias):
        return m.scale * F.linear(x, weight, bias)


@pytest.fixture()
def scaled_linear():
    register_rule(ScaledLinear, ScaledLinearRule())
    yield
    unregister_rule(ScaledLinear)


def _scaled_mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(6, 8), nn.ReLU(), ScaledLinear(8, 7), nn.ReLU(), ScaledLinear(7, 3)).to(dtype)


def _batches(shape, classes=3, n=3, bs=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((bs, *shape), generator=g, dtype=dtype), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def _out(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x)


def test_new_layer_type_analysis_and_engine(scaled_linear):
    model, x = _scaled_mlp(), torch.randn(5, 6)
    graph = ff.analyze(model, (x,))
    assert sorted(g.name for g in graph.growable()) == ["0", "2"]
    before = _out(model, x)
    ff.widen(model, (x,), {"0": 3, "2": 2}, mode="split")
    ff.widen(model, (x,), {"0": 2}, mode="zero")
    assert [tuple(model[i].weight.shape) for i in (0, 2, 4)] == [(13, 6), (9, 13), (3, 9)]
    assert (_out(model, x) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["gradmax", "splitting-exact", "splitting-fast"])
def test_new_layer_type_grows_under_baselines(scaled_linear, method):
    model, data = _scaled_mlp(), _batches((6,))
    x = data[0][0]
    before = _out(model, x)
    kwargs = {"incoming_std": 0.0} if method == "gradmax" else {"eps": 0.0}
    report = make_grower(method, budget=0.5, seed=0, **kwargs).grow(model, data, F.cross_entropy)
    assert report.extra.get("skipped_groups", {}) == {}
    grown = {**report.units_split, **report.units_added}
    assert sum(grown.values()) > 0 and set(grown) <= {"0", "2"}
    assert (_out(model, x) - before).abs().max() <= 1e-5  # function-preserving variant


def test_new_layer_type_splitting_matrix_follows_its_unfold(scaled_linear):
    """ScaledLinear(W, b, s) computes what nn.Linear(sW, sb) computes, so its splitting matrices (second
    derivatives in its own weights θ, through the rule's unfold s·[x, 1]) are s² times the Linear's."""
    model = _scaled_mlp(torch.float64)
    twin = nn.Sequential(*[nn.Linear(m.weight.shape[1], m.weight.shape[0]).double() if isinstance(m, ScaledLinear)
                           else m for m in model])
    with torch.no_grad():
        for m, t in zip(model, twin):
            if isinstance(m, ScaledLinear):
                t.weight.copy_(m.scale * m.weight)
                t.bias.copy_(m.scale * m.bias)
    data = _batches((6,), dtype=torch.float64, n=2)
    S = SplittingExact(batches=None).matrices(model, data, F.cross_entropy)
    S_twin = SplittingExact(batches=None).matrices(twin, data, F.cross_entropy)
    assert set(S) == set(S_twin) == {"0", "2"}
    for n in S:
        assert torch.allclose(S[n], 0.25 * S_twin[n], rtol=1e-10, atol=1e-12 * float(S[n].abs().max()))
    M = GradMax(batches=None).matrices(model, data, F.cross_entropy)
    assert set(M) == {"0", "2"} and all(float(m.abs().max()) > 0 for m in M.values())


def test_new_layer_type_grows_under_tiny_exactly(scaled_linear):
    """TINY's line search runs the new neurons through the rule's `run_with` (hooks); the loss it reports is
    exactly that of the model the engine builds."""
    model, data = _scaled_mlp(torch.float64), _batches((6,), dtype=torch.float64, bs=48)
    report = TINY(budget="units:3", batches=None).grow(model, data, F.cross_entropy)
    assert report.extra.get("skipped_groups", {}) == {}
    assert sum(report.units_added.values()) == 3 and report.extra["gamma"]
    last = list(report.extra["gamma"])[-1]
    assert report.loss_after == pytest.approx(report.extra["line_loss"][last], abs=1e-10)
    assert report.loss_after < report.loss_before


def test_new_layer_type_grows_under_firefly(scaled_linear):
    model, data = _scaled_mlp(), _batches((6,), n=4)
    params = sum(p.numel() for p in model.parameters())
    report = Firefly(budget=0.5, step_one_steps=3, score_batches=1, seed=0, cost_limit=None).grow(
        model, data, F.cross_entropy)
    assert sum(report.units_added.values()) > 0
    assert sum(p.numel() for p in model.parameters()) > params
    assert ff.analyze(model, (data[0][0],)).groups["0"].width == model[0].weight.shape[0]


# ---- the rules' unfolding is the layer's arithmetic ------------------------------------------------------
@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(5, 4), (3, 2, 5)),
    (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (2, 3, 11)),
    (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 3, 7, 6)),
    (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2)), (2, 2, 5, 6, 5)),
    (nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5)),
])
def test_unfold_rows_and_run_with_match_forward(layer, shape):
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    rule = rule_for(layer)
    assert rule.unfold_reason(layer) is None
    X, Y = rule.unfold_input(layer, x), rule.output_rows(layer, layer(x))
    theta = layer.weight.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        theta = torch.cat([theta, layer.bias[:, None]], 1)
    pred = torch.einsum("ncd,cd->nc", X, theta) if rule.per_channel(layer) else X @ theta.T
    assert torch.allclose(pred, Y, atol=1e-10)
    w2 = torch.randn_like(layer.weight)
    b2 = None if layer.bias is None else torch.randn_like(layer.bias)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(w2)
        if b2 is not None:
            ref.bias.copy_(b2)
    assert torch.allclose(rule.run_with(layer, x, w2, b2), ref(x), atol=1e-10)


def test_registry_answers():
    assert activation_of(nn.ReLU6()).relu_like and activation_of(nn.ReLU()).relu_like
    assert not activation_of(nn.GELU()).relu_like and activation_of(nn.GELU()).depth_host
    assert activation_of_function(F.relu) is activation_of_function(torch.relu) is activation_of(nn.ReLU())
    assert activation_of_function(torch.Tensor.relu).name == "relu" and activation_of(nn.Linear(2, 2)) is None
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.GroupNorm(1, 2),
                        nn.BatchNorm1d(2, track_running_stats=False))
    assert batchnorms(net) == [net[1], net[3]] and batchnorms(net, tracking=True) == [net[1]]
    assert rule_for(nn.Conv2d(3, 3, 3, groups=3)).per_channel(nn.Conv2d(3, 3, 3, groups=3))
    assert rule_for(nn.Conv2d(4, 4, 3, groups=2)).unfold_reason(nn.Conv2d(4, 4, 3, groups=2)) is not None


# ---- a new activation is one call ------------------------------------------------------------------------
@wrap_torch_function(lambda x: (x,))  # dispatches __torch_function__, so the probe sees the call
def lecun_tanh(x: torch.Tensor) -> torch.Tensor:
    return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class LeCunTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lecun_tanh(x)


def test_new_activation_is_one_call():
    register_activation(Activation("lecun_tanh", lecun_tanh, LeCunTanh, depth_host=True))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), make_activation("lecun_tanh"), nn.Linear(8, 3))
        fun = FunctionalHead()
        fun.load_state_dict(model.state_dict())
        data = _batches((6,))
        for net in (model, fun):
            assert [g.name for g in ff.analyze(net, (data[0][0],)).growable()] == ["0"]
            for method in ("splitting-exact", "gradmax"):
                report = make_grower(method, budget=0.5, seed=0).grow(copy.deepcopy(net), data, F.cross_entropy)
                assert report.extra.get("skipped_groups", {}) == {}
                assert sum(report.units_added.values()) + sum(report.units_split.values()) > 0
    finally:
        unregister_activation("lecun_tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("lecun_tanh")


class FunctionalHead(nn.Sequential):
    """Linear -> lecun_tanh (a function call) -> Linear, with the Sequential's parameter names."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.Identity(), nn.Linear(8, 3))

    def forward(self, x):
        return self[2](lecun_tanh(self[0](x)))


# ---- functional activations grow exactly as modules -----------------------------------------------------
class MLPModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # act2 is in-place: the probe clones its input before the call overwrites it
        self.fc1, self.act1, self.fc2, self.act2, self.fc3 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(
            inplace=True), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class MLPFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNNModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU()
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(x.flatten(1))


class CNNFunctional(CNNModules):
    def forward(self, x):
        x = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))).relu()
        return self.fc(x.flatten(1))


GROWERS = {
    "gradmax": {},
    "splitting-exact": {},
    "splitting-fast": {},
    "tiny": {"batches": 2},
    "net2net": {},
    "random": {},
    "firefly": {"step_one_steps": 2, "score_batches": 1, "cost_limit": None},
}


@pytest.mark.parametrize("pair", ["mlp", "cnn"])
@pytest.mark.parametrize("method", list(GROWERS))
def test_functional_activations_grow_as_modules(pair, method):
    mod_cls, fun_cls, shape = {"mlp": (MLPModules, MLPFunctional, (6,)),
                               "cnn": (CNNModules, CNNFunctional, (3, 4, 4))}[pair]
    torch.manual_seed(0)
    a = randomize_norm_stats(mod_cls())
    b = fun_cls()
    b.load_state_dict(a.state_dict())
    data = _batches(shape, n=3, bs=16)
    reports = []
    for model in (a, b):
        grower = make_grower(method, budget=0.5, seed=3, **GROWERS[method])
        reports.append(grower.grow(model, data, F.cross_entropy))
    ra, rb = reports
    assert (ra.units_added, ra.units_split) == (rb.units_added, rb.units_split)
    assert sum(ra.units_added.values()) + sum(ra.units_split.values()) > 0
    assert ra.extra.get("skipped_groups", {}) == rb.extra.get("skipped_groups", {})
    assert ra.extra.get("skipped_groups", {}) == {}  # every hidden group is grown or scored by the method
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
