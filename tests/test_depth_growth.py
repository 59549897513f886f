"""Depth candidates of the model's own kind compete with width candidates on one budget scale:
blocks are exact at insertion, their costs are what they add, selection keeps depth exactly when it
pays per unit of budget, and the shallow-start models build the paper's layouts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.analysis import meta_copy
from firefly_descent.budget import Budget, Candidate, count_flops, count_params, select, unit_param_cost
from firefly_descent.engine import apply
from firefly_descent.layers import build_body
from firefly_descent.methods import Firefly
from firefly_descent.methods.firefly.depth_candidates import build_depth_candidates, depth_block_spec
from firefly_descent.methods.firefly.descent import _widen_body, default_depth_boundaries
from firefly_descent.models import build_model
from firefly_descent.plan import GroupChange, NewLayer, NewUnits, Plan, Split

X = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mobilenet":
        return build_model("mobilenetv1-stages", widths=4, num_classes=3).eval()
    if name == "vgg":
        return build_model("vgg-stages", widths=4, blocks=(1, 1, 1), input_size=16, num_classes=3).eval()
    return build_model("resnet20", width=4, num_classes=3).eval()


def _randomize(module: nn.Module, seed: int = 1) -> None:
    """Non-trivial weights and BatchNorm statistics (gains positive, so narrow layers stay alive), so an
    exactness check cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen) + 0.1)
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)


AUTO = {"mobilenet": "dwsep", "resnet": "basic_block", "vgg": "conv_bn_act"}


@pytest.mark.parametrize("name", ["mobilenet", "resnet", "vgg"])
def test_auto_block_is_the_models_own_kind_and_exact_at_zero(name):
    model = _tiny(name)
    graph = ff.analyze(model, X)
    after = default_depth_boundaries(graph, model)
    assert after
    kinds = {depth_block_spec(graph, model, a)["type"] for a in after}
    assert AUTO[name] in kinds
    depth = build_depth_candidates(model, graph, after, X, init_scale=0.5, block="auto")
    for layer in depth.layers:
        _randomize(layer.body)
    depth.bank.alpha = 0.0
    with torch.no_grad():
        assert torch.equal(depth.net(*X), model(*X))
    depth.bank.alpha = 1.0
    with torch.no_grad():
        assert (depth.net(*X) - model(*X)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["dwsep", "basic_block", "conv_bn_act"])
def test_each_block_kind_is_exact_through_the_engine(kind):
    model = _tiny("mobilenet")
    _randomize(model)
    graph = ff.analyze(model, X)
    spec = depth_block_spec(graph, model, "features.1", kind)
    body = build_body(spec)
    _randomize(body)
    before = model(*X)
    plan = Plan(layers=[NewLayer("features.1", "residual", spec, body.state_dict(), 0.0)], function_preserving=True)
    apply(model, plan, example_inputs=X)  # the engine verifies the output is unchanged
    assert torch.allclose(model(*X), before, atol=1e-6)
    with torch.no_grad():
        model.features[1][1].scale.fill_(1.0)
    assert (model(*X) - before).abs().max() > 1e-3


@pytest.mark.parametrize("currency", ["params", "flops", "units"])
@pytest.mark.parametrize("name", ["mobilenet", "resnet", "vgg"])
def test_layer_costs_equal_what_the_layer_adds(name, currency):
    model = _tiny(name)
    graph = ff.analyze(model, X)
    after = default_depth_boundaries(graph, model)[:3]
    depth = build_depth_candidates(model, graph, after, X, init_scale=0.0, block="auto")
    amount = {"params": "params:1000", "flops": "flops:1e6", "units": "units:8"}[currency]
    costs = Firefly(budget=amount)._layer_costs(model, X, graph, depth)
    for a, spec, cost in zip(after, depth.specs, costs):
        grown = copy.deepcopy(model)
        apply(grown, Plan(layers=[NewLayer(a, "residual", spec)], function_preserving=False), verify=False)
        added = count_params(grown) - count_params(model)
        if currency == "params":
            assert cost == added
        elif currency == "flops":
            assert cost == count_flops(grown, X) - count_flops(model, X)
        else:  # as many units of the group it sits on as cost the same parameters
            assert cost == pytest.approx(added / unit_param_cost(graph[graph.boundaries[a].group], model))


def test_widened_block_acts_on_the_grown_group_as_before():
    """A kept block on a group that also grows is widened with the same unit changes: the model grown by
    both in one plan computes what the model with the block did."""
    model = _tiny("mobilenet")
    _randomize(model)
    graph = ff.analyze(model, X)
    spec = depth_block_spec(graph, model, "features.1", "dwsep")
    body = build_body(spec)
    _randomize(body, seed=2)
    params = {k: v.clone() for k, v in body.state_dict().items()}
    with_block = copy.deepcopy(model)
    apply(with_block, Plan(layers=[NewLayer("features.1", "residual", spec, params, 0.7)], function_preserving=False))
    target = with_block(*X)
    group = graph[graph.boundaries["features.1"].group]
    change = GroupChange(group, splits=[Split(0), Split(2)], new=NewUnits(2, incoming={}, outgoing={}))
    wide_spec, wide_params = _widen_body(spec, params, change)
    assert wide_spec["channels"] == spec["channels"] + 4
    layer = NewLayer("features.1", "residual", wide_spec, wide_params, 0.7)
    apply(model, Plan([change], [layer], function_preserving=False), verify=False)
    assert torch.allclose(model(*X), target, atol=1e-5)


def test_selection_ranks_layers_and_units_per_unit_of_budget():
    """A layer worth 10 units' loss decrease at the price of 8 units is kept before them; at the price of
    12 it is not: loss decrease per unit of budget, whatever the currency (width-only stays a sort)."""
    units = [Candidate("new", "g", i, -1.0, 1.0) for i in range(10)]
    for cost, chosen in ((8.0, True), (12.0, False)):
        layer = Candidate("layer", "b", 0, -10.0, cost)
        kept = select([*units, layer], Budget("units", 10), [])
        assert (layer in kept) is chosen
        assert sum(c.cost for c in kept) <= 10
    width = [Candidate("new", "g", i, -float(i), 1.0) for i in range(6)]
    assert [c.index for c in select(width, Budget("units", 3), [])] == [5, 4, 3]


class _Student(nn.Module):
    """x -> head(relu(W x)), with room for a residual layer after `act` (a Sequential element)."""

    def __init__(self, d_in: int = 6, hidden: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _teacher_data(teacher: nn.Module, n: int = 8, batch: int = 128, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 6, generator=gen) for _ in range(n)]
    with torch.no_grad():
        return [(x, teacher(x)) for x in xs]


def _grow(student: nn.Module, data: list, budget: str) -> tuple[dict, Firefly]:
    grower = Firefly(budget=budget, candidates="all", new_units=4, step_one_steps=60, seed=0)
    report = grower.grow(student, data, F.mse_loss)
    return report.extra["depth"], grower


def test_depth_is_chosen_when_the_teacher_needs_one_more_layer():
    torch.manual_seed(0)
    student = _Student()
    teacher = copy.deepcopy(student)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 4) * 1.5)
        layer.bias.copy_(torch.randn(4))
    teacher.body.append(nn.Sequential(layer, nn.ReLU()))  # z -> relu(A relu(W x)): a second layer
    teacher.body[2] = _ResidualOf(teacher.body[2], 2.0)
    depth, grower = _grow(student, _teacher_data(teacher), "params:60")
    kept = [b for b in depth["blocks"] if b["kept"]]
    assert kept and kept[0]["after"] == "body.1"
    assert depth["depth_share"] > 0
    best_layer = min(b["score_per_cost"] for b in depth["blocks"])
    assert best_layer < depth["best_width_score_per_cost"]  # chosen because it pays more per parameter
    assert count_params(student) - 6 * 4 - 4 - 4 * 3 - 3 <= 60


class _ResidualOf(nn.Module):
    def __init__(self, body: nn.Module, scale: float) -> None:
        super().__init__()
        self.body, self.scale = body, scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.scale * self.body(z)


def test_depth_is_not_chosen_when_the_teacher_needs_only_width():
    torch.manual_seed(0)
    teacher = _Student(hidden=8)
    student = _Student(hidden=4)
    with torch.no_grad():  # the student is the teacher without its last four hidden units
        student.body[0].weight.copy_(teacher.body[0].weight[:4])
        student.body[0].bias.copy_(teacher.body[0].bias[:4])
        student.head.weight.copy_(teacher.head.weight[:, :4])
        student.head.bias.copy_(teacher.head.bias)
        teacher.head.weight[:, 4:] *= 3.0
    p0 = count_params(student)
    depth, _ = _grow(student, _teacher_data(teacher), "params:60")
    assert not any(b["kept"] for b in depth["blocks"])
    assert depth["depth_share"] == 0.0
    assert 0 < count_params(student) - p0 <= 60


def test_params_budget_is_respected_exactly_on_mobilenet():
    model = _tiny("mobilenet")
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(6)]
    p0 = count_params(model)
    report = Firefly(budget="params:400", candidates="all", step_one_steps=3, cost_limit=None).grow(
        model, data, F.cross_entropy
    )
    assert 0 < count_params(model) - p0 <= 400
    blocks = report.extra["depth"]["blocks"]
    assert {b["type"] for b in blocks} >= {"dwsep"}
    assert all(b["cost"] > 0 for b in blocks)


def test_new_layer_after_a_parameter_free_module_takes_the_models_device():
    model = _tiny("vgg")
    meta = meta_copy(model)
    graph = ff.analyze(model, X)
    relu = next(a for a in default_depth_boundaries(graph, model) if isinstance(model.get_submodule(a), nn.ReLU))
    spec = depth_block_spec(graph, model, relu)
    apply(meta, Plan(layers=[NewLayer(relu, "residual", spec)], function_preserving=False), verify=False, record=False)
    assert all(p.is_meta for p in meta.parameters())


def test_shallow_start_models_build_the_paper_layouts():
    full = build_model("mobilenetv1-stages", blocks=(1, 2, 2, 6, 2))
    assert count_params(full) == count_params(build_model("mobilenetv1"))
    vgg = build_model("vgg-stages", blocks=(2, 2, 4, 4, 4), widths=16)
    assert count_params(vgg) == count_params(build_model("vgg19", widths=16))
    shallow = build_model("mobilenetv1-stages", widths=8)
    assert len(shallow.features) == 5
    with pytest.raises(ValueError, match="blocks"):
        build_model("mobilenetv1-stages", blocks=(1, 1))


def _with_inserted_block() -> tuple[nn.Module, tuple, list]:
    torch.manual_seed(0)
    model = _tiny("mobilenet")
    _randomize(model)
    graph = ff.analyze(model, X)
    spec = depth_block_spec(graph, model, "features.1", "dwsep")
    body = build_body(spec)
    _randomize(body, seed=3)
    plan = Plan(layers=[NewLayer("features.1", "residual", spec, body.state_dict(), 0.5)], function_preserving=False)
    apply(model, plan)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(3)
    ]
    return model, tuple(t.double() for t in X), data


def _spy(grower: Firefly) -> dict:
    captured: dict = {}
    original = grower._materialize

    def spy(graph, width_c, depth_c, kept, xx):
        captured["cands"], captured["kept"] = width_c, kept
        captured["plan"] = original(graph, width_c, depth_c, kept, xx)
        return captured["plan"]

    grower._materialize = spy
    return captured


def test_stage_with_an_inserted_block_still_widens_exactly():
    """After a dwsep block is inserted, its pointwise conv reads and writes the stage's group; Firefly still
    splits that group, and the model it materialises equals the over-grown net with the unselected off."""
    model, x, data = _with_inserted_block()
    grower = Firefly(budget=0.5, candidates="splits", step_one_steps=5, score_batches=2, seed=3, bn_mode="frozen")
    grower.set_safeguard(check=False, calibrate_new_bn=False, refresh_bn=False)
    captured = _spy(grower)
    report = grower.grow(model, data, F.cross_entropy)
    stage = "features.1.0.pw_conv"
    assert report.extra["pool"][stage]["splits"] > 0
    cands, kept = captured["cands"], captured["kept"]
    assert any(c.group == stage for c in kept)
    bank = cands.bank
    bank.alpha = 0.0
    bank.reset(requires_grad=False)
    for c in kept:  # gate multiplier = 0 + 1 for kept candidates, 0 for the rest
        bank.gates[f"{c.kind}:{c.group}"][c.index] = 1.0
    fresh = tuple(torch.randn_like(t) for t in x)
    with torch.no_grad():
        assert (cands.net(*fresh) - model(*fresh)).abs().max().item() < 1e-9


def test_stage_with_an_inserted_block_gets_new_units_exactly_at_zero_amplitude():
    model, x, data = _with_inserted_block()
    before = copy.deepcopy(model)
    grower = Firefly(budget="units:1000", candidates="width", allow_increase=True, step_one_steps=3, score_batches=1)
    grower.set_safeguard(check=False, calibrate_new_bn=False, refresh_bn=False)
    captured = _spy(grower)
    grower.grow(model, data, F.cross_entropy)
    plan = captured["plan"]
    assert any(c.group.name == "features.1.0.pw_conv" and c.added for c in plan.changes)
    apply(before, plan.scaled(0.0), example_inputs=x)  # verified exact by the engine, directions and all


def test_exact_params_trims_a_width_selection_to_the_budget():
    """Greedy costs ignore the cross terms of two adjacent groups growing together; exact_params trims the
    selection until the measured parameter increase fits, and leaves width-only selection alone by default."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(4)]
    added = {}
    for exact in (None, True):
        model = _tiny("vgg")
        p0 = count_params(model)
        Firefly(budget="params:2000", candidates="width", exact_params=exact, step_one_steps=3, cost_limit=None,
                allow_increase=True).grow(model, data, F.cross_entropy)
        added[exact] = count_params(model) - p0
    assert added[True] <= 2000 < added[None]
