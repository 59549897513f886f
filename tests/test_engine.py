"""Growth engine: analysis finds the right groups, growth preserves the function, edits are clean."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import GOOD_MODELS, ZOO, randomize_norm_stats

import firefly_descent as ff
from firefly_descent.engine import check_attrs
from firefly_descent.plan import GroupChange, NewUnits, Plan, Split


def _flat(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _cases():
    for name in GOOD_MODELS:
        model, x = ZOO[name]()
        for g in ff.analyze(model, x).growable():
            yield name, g.name


def _sizes(group, k_kind):
    """k in {1, 3, width}, adapted to GroupNorm (whole groups) and LayerNorm (duplicate all)."""
    k = {"1": 1, "3": 3, "width": group.width}[k_kind]
    for c in group.constraints:
        if c.kind == "groupnorm":
            k = c.channels_per_group * max(1, k // c.channels_per_group)
        if c.kind == "layernorm":
            k = group.width
    return k


@pytest.mark.parametrize("name,group_name", list(_cases()))
@pytest.mark.parametrize("mode", ["split", "zero"])
def test_growth_preserves_function(name, group_name, mode):
    torch.manual_seed(1)
    for k_kind in ("1", "3", "width"):
        model, x = ZOO[name]()
        randomize_norm_stats(model, seed=3)
        group = ff.analyze(model, x)[group_name]
        k = _sizes(group, k_kind)
        fresh = tuple(torch.randn_like(t) for t in x)  # not the tracing input
        reference = copy.deepcopy(model)
        keys = list(model.state_dict())
        ff.widen(model, x, {group_name: k}, mode=mode)
        assert ff.analyze(model, x)[group_name].width == group.width + k
        assert list(model.state_dict()) == keys
        assert check_attrs(model) == []
        for train in (False, True):
            reference.train(train)
            model.train(train)
            with torch.no_grad():
                err = (_flat(model(*fresh)) - _flat(reference(*fresh))).abs().max().item()
            assert err <= 1e-5, (name, group_name, mode, k, train, err)


@pytest.mark.parametrize("name", ["resnet_basic", "concat", "vgg_flatten", "mobilenetv2"])
def test_float64_is_exact(name):
    model, x = ZOO[name]()
    randomize_norm_stats(model, seed=5)
    model.double().eval()
    x = tuple(t.double() for t in x)
    ref = copy.deepcopy(model)
    graph = ff.analyze(model, x)
    ff.widen(model, x, {g.name: 2 for g in graph.growable()}, mode="split")
    with torch.no_grad():
        assert (_flat(model(*x)) - _flat(ref(*x))).abs().max().item() < 1e-12


def test_analysis_finds_coupled_layers():
    model, x = ZOO["resnet_basic"]()
    groups = ff.analyze(model, x).groups
    # the stem and every block's second conv feeding the identity add form one group
    stage = next(g for g in groups.values() if any(m.tensor.startswith("layer1.1.conv2") for m in g.members))
    producers = {m.module for m in stage.members if m.role == "producer"}
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= producers
    flat = ZOO["vgg_flatten"]
    model, x = flat()
    g = ff.analyze(model, x)["features.7"]
    consumer = next(m for m in g.members if m.role == "consumer")
    assert (consumer.tensor, consumer.dim, consumer.inner) == ("fc1.weight", 1, 4)
    model, x = ZOO["mobilenetv1"]()
    graph = ff.analyze(model, x)
    assert any(m.role == "passthrough" for g in graph.groups.values() for m in g.members)


def test_concat_consumer_offsets():
    model, x = ZOO["concat"]()
    graph = ff.analyze(model, x)
    offsets = sorted(
        (m.offset, g.name)
        for g in graph.groups.values()
        for m in g.members
        if m.tensor == "conv_c.weight" and m.dim == 1
    )
    assert len(offsets) == 2 and offsets[0][0] == 0 and offsets[1][0] > 0


def test_broadcast_mask_does_not_tie_groups():
    model, x = ZOO["broadcast_mask"]()
    graph = ff.analyze(model, x)
    assert graph["conv_f"].growable
    assert not graph["conv_mask"].growable
    ff.widen(model, x, {"conv_f": 2})


@pytest.mark.parametrize(
    "bad,group,error,needle",
    [
        ("unknown_op", "conv1", ff.UnsupportedOpError, "sort"),
        ("mean_over_channels", "conv", ff.ReductionOverGrownDimError, "mean over dim 1"),
        ("mlp", "net.4", ff.FrozenGroupError, "model output"),
    ],
)
def test_refusals_leave_model_untouched(bad, group, error, needle):
    model, x = ZOO[bad]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    with pytest.raises(error) as info:
        ff.widen(model, x, {group: 2}, optimizer=opt)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p for g in opt.param_groups for p in g["params"]] == params


def test_unknown_op_names_source_line():
    model, x = ZOO["unknown_op"]()
    reason = ff.analyze(model, x)["conv1"].blocked[1]
    assert "zoo.py:" in reason and "torch.sort" in reason


def test_layernorm_partial_split_needs_opt_in():
    model, x = ZOO["layernorm_mlp"]()
    with pytest.raises(ff.ApproximationRequiredError, match="duplicating only some"):
        ff.widen(model, x, {"net.0": 2})
    ff.widen(model, x, {"net.0": 2}, approximate=True)  # opted in: allowed, not exact
    assert ff.analyze(model, x)["net.0"].width == 10


def test_data_dependent_control_flow():
    model, x = ZOO["data_dependent"]()
    with pytest.raises(ff.DataDependentControlFlowError, match="branches on tensor values"):
        ff.analyze(model, x)


def test_failed_verification_rolls_back_model_and_optimizer():
    model, x = ZOO["vgg_gap"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(*x).sum()
    loss.backward()
    opt.step()
    graph = ff.analyze(model, x)
    g = graph["features.0"]
    w = model.features[0].weight
    big = Split(0, directions={"features.0.weight": torch.ones_like(w[0:1]) * 10.0}, eps=1.0)
    plan = Plan([GroupChange(g, splits=[big])], function_preserving=True)
    params = {k: v for k, v in model.named_parameters()}
    state = {k: {n: t.clone() for n, t in opt.state[p].items()} for k, p in params.items()}
    with pytest.raises(ff.VerificationError, match="restored"):
        ff.apply(model, plan, optimizer=opt, example_inputs=x)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert model.features[0].out_channels == 4 and check_attrs(model) == []
    for k, p in params.items():
        assert all(torch.equal(state[k][n], t) for n, t in opt.state[p].items())
    assert ff.growth_history(model) == []


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_optimizer_state_remapped(opt_name):
    torch.manual_seed(0)
    model, x = ZOO["mlp"]()
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    }[opt_name]
    opt = make(model.parameters())
    target = torch.randint(0, 3, (x[0].shape[0],))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(*x), target).backward()
        opt.step()
    w_old = model.net[0].weight
    st_old = {k: v.clone() for k, v in opt.state[w_old].items()}
    ff.widen(model, x, {"net.0": 3}, mode="zero", optimizer=opt)
    w_new = model.net[0].weight
    assert w_new is not w_old and any(p is w_new for p in opt.param_groups[0]["params"])
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    st_new = opt.state[w_new]
    key = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    width = w_old.shape[0]
    assert torch.equal(st_new[key][:width], st_old[key])
    assert torch.count_nonzero(st_new[key][width:]) == 0
    if opt_name != "sgd":
        assert torch.equal(st_new["step"], st_old["step"])
    # the grown model trains and its new units receive gradient
    out_w = model.net[2].weight
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(*x), target).backward()
        opt.step()
    assert out_w.grad is not None and out_w.grad[:, width:].abs().sum() > 0
    assert model.net[2].weight[:, width:].abs().sum() > 0


def test_deepen_is_identity_and_trains():
    model, x = ZOO["resnet_basic"]()
    randomize_norm_stats(model, seed=2)
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n_params = len(list(model.parameters()))
    ff.deepen(model, x, after=["layer1.0", "layer2"], optimizer=opt)
    model.eval()
    fresh = tuple(torch.randn_like(t) for t in x)
    with torch.no_grad():
        assert torch.equal(model(*fresh), ref(*fresh))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) > n_params
    model.train()
    model(*x).sum().backward()
    scale = model.layer1[0][1].scale
    assert scale.grad is not None and scale.grad.abs() > 0


def test_net2net_identity_layer_after_relu():
    model, x = ZOO["vgg_gap"]()
    ref = copy.deepcopy(model).eval()
    ff.deepen(model, x, after=["features.2"], kind="identity")
    model.eval()
    with torch.no_grad():
        assert (model(*x) - ref(*x)).abs().max() < 1e-6
    assert isinstance(model.features[2][1][0], nn.Conv2d)


def test_save_load_replays_width_and_depth(tmp_path):
    model, x = ZOO["resnet_bottleneck"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    graph = ff.analyze(model, x)
    first = graph.growable()[0].name
    ff.widen(model, x, {first: 3}, mode="zero", optimizer=opt)
    ff.deepen(model, x, after=[next(iter(ff.analyze(model, x).boundaries))], optimizer=opt)
    ff.widen(model, x, {g.name: 1 for g in ff.analyze(model, x).growable()}, optimizer=opt)
    for p in model.parameters():  # weights that differ from any fresh init
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "grown.pt"
    ff.save(model, str(path))
    loaded = ff.load(str(path), build=lambda: ZOO["resnet_bottleneck"]()[0])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(*x), loaded(*x))
    assert len(ff.growth_history(loaded)) == 3
    raw = torch.load(str(path), weights_only=True)
    assert set(raw) >= {"state_dict", "history"}


def test_load_from_shapes_without_history(tmp_path):
    model, x = ZOO["mlp"]()
    ff.widen(model, x, {"net.0": 4})
    path = tmp_path / "w.pt"
    ff.save(model, str(path))
    raw = torch.load(str(path), weights_only=True)
    raw["history"] = []
    torch.save(raw, str(path))
    loaded = ff.load(str(path), build=lambda: ZOO["mlp"]()[0])
    with torch.no_grad():
        assert torch.equal(model(*x), loaded(*x))


def test_plan_is_serialisable_and_explains(tmp_path):
    model, x = ZOO["mlp"]()
    graph = ff.analyze(model, x)
    g = graph["net.0"]
    plan = Plan(
        [
            GroupChange(
                g,
                splits=[Split(1, {"net.0.weight": torch.randn(1, 6)}, eps=0.1)],
                new=NewUnits(2, incoming={"net.0.weight": torch.randn(2, 1, 6)}),
            )
        ],
        function_preserving=False,
    )
    text = plan.explain()
    assert "net.0" in text and "split 1" in text and "new 2" in text
    path = tmp_path / "plan.pt"
    plan.save(str(path))
    again = Plan.load(str(path))
    assert again.explain() == text
    assert Plan.from_bytes(plan.to_bytes()).explain() == text
    ref = copy.deepcopy(model)
    ff.apply(model, plan, example_inputs=x)
    ff.apply(ref, again, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(model(*x), ref(*x))


def test_split_direction_and_new_unit_values_land_where_planned():
    model, x = ZOO["mlp"]()
    g = ff.analyze(model, x)["net.0"]
    w = model.net[0].weight.detach().clone()
    w2 = model.net[2].weight.detach().clone()
    d = torch.randn(1, w.shape[1])
    inc, out = torch.randn(1, 1, w.shape[1]), torch.randn(1, w2.shape[0], 1)
    plan = Plan(
        [
            GroupChange(
                g,
                splits=[Split(2, {"net.0.weight": d}, eps=0.5)],
                new=NewUnits(1, incoming={"net.0.weight": inc}, outgoing={"net.2.weight": out}),
            )
        ],
        function_preserving=False,
    )
    ff.apply(model, plan, example_inputs=x)
    W, W2 = model.net[0].weight, model.net[2].weight
    width = w.shape[0]
    assert torch.allclose(W[2], w[2] + 0.5 * d[0]) and torch.allclose(W[width], w[2] - 0.5 * d[0])
    assert torch.equal(W[width + 1], inc[0, 0])
    assert torch.allclose(W2[:, 2], w2[:, 2] / 2) and torch.allclose(W2[:, width], w2[:, 2] / 2)
    assert torch.equal(W2[:, width + 1], out[0, :, 0])


def test_grown_model_exports_and_compiles_cleanly():
    model, x = ZOO["resnet_basic"]()
    ff.widen(model, x, {g.name: 2 for g in ff.analyze(model, x).growable()})
    ff.deepen(model, x, after=["layer1.0"])
    model.eval()
    assert not any("parametrizations" in k for k in model.state_dict())
    assert not model._forward_hooks and not model._forward_pre_hooks
    exported = torch.export.export(model, x)
    with torch.no_grad():
        assert torch.allclose(exported.module()(*x), model(*x), atol=1e-6)


class ScaledLinear(nn.Module):
    """An opaque module (functional forward) the analysis has no rule for until one is registered."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.gain = nn.Parameter(torch.ones(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) * self.gain


class OpaqueNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.mid = ScaledLinear(6, 7)
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.mid(torch.relu(self.fc1(x)))))


def test_registered_module_rule_grows_an_opaque_module():
    x = (torch.randn(3, 5),)
    model = OpaqueNet()
    # without a rule the functional linear is unknown: fc1's units are blocked at that op
    assert not ff.analyze(model, x)["fc1"].growable

    def rederive(m: ScaledLinear) -> None:
        m.n_out, m.n_in = m.weight.shape

    ff.register_module_rule(
        ScaledLinear,
        ff.ModuleRule(
            consumes=[(0, -1, [("weight", 1)])], produces=[(None, -1, [("weight", 0), ("gain", 0)])], rederive=rederive
        ),
    )
    try:
        graph = ff.analyze(model, x)
        assert graph["fc1"].growable and graph["mid"].growable
        ref = copy.deepcopy(model)
        ff.widen(model, x, {"fc1": 2, "mid": 3})
        assert model.mid.weight.shape == (10, 8) and model.mid.n_out == 10
        fresh = torch.randn(4, 5)
        with torch.no_grad():
            assert (model(fresh) - ref(fresh)).abs().max() < 1e-6
    finally:
        from firefly_descent.analysis.propagate import MODULE_RULES

        MODULE_RULES.pop(ScaledLinear, None)


def test_excluded_module_freezes_only_its_groups():
    model, x = ZOO["resnet_basic"]()
    graph = ff.analyze(model, x, exclude=["layer2"])
    blocked = [g for g in graph.groups.values() if g.blocked and "excluded" in g.blocked[1]]
    assert blocked and any(g.growable for g in graph.groups.values())
    with pytest.raises(ff.FrozenGroupError, match="excluded"):
        blocked[0].check_growable()
