"""A plan's cost from the analysis and the plan (cost.plan_cost) equals growing a meta copy and counting
(cost._measured_plan_cost, the old way) on every zoo model, and a growth step counts FLOPs once."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from zoo import ZOO

import firefly_descent as ff
from firefly_descent import cost
from firefly_descent.budget import Budget, count_flops, group_unit_costs
from firefly_descent.methods import Firefly
from firefly_descent.methods.firefly.depth_candidates import build_depth_candidates
from firefly_descent.methods.firefly.descent import default_depth_boundaries
from firefly_descent.models import build_model
from firefly_descent.plan import GroupChange, NewLayer, NewUnits, Plan, Split

# VGG, ResNet, MobileNet, MLP and the transformer MLP of the zoo, with every other growable model
COSTED = [
    "vgg_flatten",
    "vgg_gap",
    "resnet_basic",
    "resnet_bottleneck",
    "mobilenetv1",
    "mobilenetv2",
    "mlp",
    "mlp_bn",
    "concat",
    "transformer_mlp",
    "conv1d",
]


def _exact(model, plan, x, graph=None):
    got = cost.plan_cost(model, plan, x, graph)
    want = cost._measured_plan_cost(model, plan, x)
    assert not got.measured
    assert (got.params, got.flops) == (want.params, want.flops)
    return got


@pytest.mark.parametrize("name", COSTED)
def test_unit_costs_equal_the_measured_ones(name):
    model, x = ZOO[name]()
    graph = ff.analyze(model, x)
    groups = graph.growable()
    assert groups
    for g in groups:
        one = _exact(model, Plan([GroupChange(g, new=NewUnits(1))], function_preserving=False), x)
        assert one.params > 0
        # several units at once, splits and new units, and every group together (cross terms between groups)
        _exact(model, Plan([GroupChange(g, splits=[Split(0)], new=NewUnits(3))], function_preserving=False), x)
    _exact(model, Plan([GroupChange(g, new=NewUnits(2)) for g in groups], function_preserving=False), x)
    flops = group_unit_costs(Budget("flops", 1.0), groups, model, x)
    assert all(v >= 1 for v in flops.values())
    assert any(v > 1 for v in flops.values())


def _stages(name):
    torch.manual_seed(0)
    if name == "mobilenet":
        return build_model("mobilenetv1-stages", widths=4, num_classes=3).eval()
    if name == "vgg":
        return build_model("vgg-stages", widths=4, blocks=(1, 1, 1), input_size=16, num_classes=3).eval()
    return build_model("resnet20", width=4, num_classes=3).eval()


@pytest.mark.parametrize("name", ["mobilenet", "resnet", "vgg"])
def test_layer_and_widened_layer_costs_equal_the_measured_ones(name):
    model, x = _stages(name), (torch.randn(2, 3, 16, 16),)
    graph = ff.analyze(model, x)
    after = default_depth_boundaries(graph, model)[:3]
    depth = build_depth_candidates(model, graph, after, x, init_scale=0.0, block="auto")
    for a, spec in zip(after, depth.specs):
        got = _exact(model, Plan(layers=[NewLayer(a, "residual", spec)], function_preserving=False), x)
        assert got.flops > 0 and got.params > 0
        group = graph[graph.boundaries[a].group]
        wide = dict(spec)
        key = "channels" if "channels" in spec else "features"
        wide[key] = int(spec[key]) + 2
        plan = Plan([GroupChange(group, new=NewUnits(2))], [NewLayer(a, "residual", wide)], function_preserving=False)
        _exact(model, plan, x, graph)


@pytest.mark.parametrize("head_dim", [None, 4])
def test_transformer_block_copies_and_widths(head_dim):
    """A copied block costs what the block costs, with HeadAttention and with nn.MultiheadAttention (counted
    on its regular path, not the fused inference kernel); a new hidden unit's attention-free FLOPs have no
    weight to scale by, so that cost is measured the old way, with the old numbers."""
    torch.manual_seed(0)
    model = build_model(
        "transformer",
        in_channels=3,
        num_classes=3,
        d_model=8,
        depth=2,
        num_heads=2,
        patch_size=4,
        input_size=8,
        head_dim=head_dim,
    ).eval()
    x = (torch.randn(2, 3, 8, 8),)
    graph = ff.analyze(model, x)
    copy = Plan(layers=[NewLayer("blocks.0", "copy", {"type": "copy"})], function_preserving=False)
    hidden = Plan([GroupChange(graph["blocks.0.mlp.fc1"], new=NewUnits(3))], function_preserving=False)
    for plan, analytic in ((copy, True), (hidden, False)):
        got = cost.plan_cost(model, plan, x)
        want = cost._measured_plan_cost(model, plan, x)
        assert got.measured is not analytic
        assert (got.params, got.flops) == (want.params, want.flops) and got.params > 0 and got.flops > 0


def test_profile_total_is_count_flops_and_is_cached_while_the_structure_holds():
    model, x = ZOO["resnet_basic"]()
    cost._CACHE.pop(model, None)
    n = cost.MEASUREMENTS["profiles"]
    profile = cost.flop_profile(model, x)
    assert profile.total == count_flops(model, x) == sum(profile.by_param.values()) + profile.free
    assert profile.modules["layer1.0"] == profile.by_param["layer1.0.conv1.weight"] * 2
    with torch.no_grad():
        model.fc.weight.mul_(2)  # values do not matter
    assert cost.flop_profile(model, x) is profile and cost.MEASUREMENTS["profiles"] == n + 1
    graph = ff.analyze(model, x)
    ff.apply(model, Plan([GroupChange(graph.growable()[0], new=NewUnits(1))], function_preserving=False))
    assert cost.flop_profile(model, x).total == count_flops(model, x) > profile.total
    assert cost.MEASUREMENTS["profiles"] == n + 2


def test_a_default_firefly_step_counts_flops_once_and_grows_no_copy(monkeypatch):
    """Every FLOP count of a default Firefly step: the model once (its FLOPs before; after, only when the
    step is kept), the over-grown network once to size the samples; no meta copy grown, no count in the
    loop. Before: 5 FLOP measurements (8 entries into count_flops)."""
    gen = torch.Generator().manual_seed(0)
    model = build_model("vgg11", in_channels=1, num_classes=10, widths=4, input_size=16)
    data = [(torch.randn(16, 1, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(12)]
    counts = []
    enter = FlopCounterMode.__enter__
    monkeypatch.setattr(FlopCounterMode, "__enter__", lambda self: counts.append(1) or enter(self))
    profiled = []
    measure = cost._measure
    monkeypatch.setattr(cost, "_measure", lambda m, run: profiled.append(m) or measure(m, run))
    engine_apply = sys.modules["firefly_descent.engine.apply"]
    applies = []
    real_apply = engine_apply._apply
    monkeypatch.setattr(engine_apply, "_apply", lambda m, *a: applies.append(m) or real_apply(m, *a))
    metas = cost.MEASUREMENTS["meta_applies"]
    grower = Firefly()
    grower.epoch_batches = 12
    report = grower.grow(model, data, F.cross_entropy)
    assert report.outcome == "accepted"
    assert profiled == [model, model]  # before, and after the kept step
    assert len(counts) == 3  # those two and the over-grown network
    # the over-grown network (built with the engine on a copy) and the real apply: no meta copy grown
    assert len(applies) == 2 and applies[1] is model
    assert not any(p.is_meta for m in applies for p in m.parameters())
    assert cost.MEASUREMENTS["meta_applies"] == metas
    assert report.flops_after == count_flops(model, data[0][0][:1]) > report.flops_before
    assert cost.flop_profile(model, data[0][0][:4]).total == report.flops_after and len(profiled) == 2


def test_flop_and_param_budgets_with_depth_grow_no_meta_copy():
    gen = torch.Generator().manual_seed(0)
    model = _stages("vgg")
    data = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(8)]
    metas0 = cost.MEASUREMENTS["meta_applies"]
    for budget in ("flops:200000", "params:600"):
        Firefly(budget=budget, candidates="all", step_one_steps=2, cost_limit=None).grow(model, data, F.cross_entropy)
    assert cost.MEASUREMENTS["meta_applies"] == metas0


def test_the_check_reuses_a_pass_it_already_ran_with_the_same_numbers(monkeypatch):
    """On a model without BatchNorm the refresh after growth changes nothing, so eval mode is the pass the
    check just ran: it is answered from the memo, and every number is what a fresh pass gives."""
    from firefly_descent.methods import safety

    def step(memo: bool, **safeguard):
        if not memo:
            monkeypatch.setattr(safety, "_MEMO", type("NoMemo", (), {"setdefault": lambda self, m, d: {}})())
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model("mlp", in_features=10, num_classes=3, hidden=(8, 8))
        data = [(torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(12)]
        safety.FORWARDS.update(measured=0, reused=0)
        grower = Firefly().set_safeguard(**safeguard)
        grower.epoch_batches = 12
        report = grower.grow(model, data, F.cross_entropy)
        return report, dict(safety.FORWARDS)

    report, forwards = step(memo=True, predicted_mode=True)
    fresh, fresh_forwards = step(memo=False, predicted_mode=True)
    assert report.outcome == fresh.outcome == "accepted"
    assert report.safety.heldout_before == fresh.safety.heldout_before
    assert report.safety.heldout_after == fresh.safety.heldout_after
    assert report.safety.trials == fresh.safety.trials
    assert (report.loss_before, report.loss_after) == (fresh.loss_before, fresh.loss_after)
    assert forwards == {"measured": 6, "reused": 1}
    assert fresh_forwards == {"measured": 7, "reused": 0}
    # by default the eval pass with the old statistics (read by no decision) is not run: one pass fewer,
    # the same decision and the same train- and eval-mode numbers
    default, default_forwards = step(memo=True)
    assert default_forwards == {"measured": 6, "reused": 0}
    assert default.safety.trials[0]["eval_stale"] is None and "eval_stale" not in default.safety.heldout_after
    assert default.safety.heldout_after == {k: report.safety.heldout_after[k] for k in ("eval", "train")}
    assert default.params_after == report.params_after and default.outcome == report.outcome


def test_fused_attention_kernels_are_counted_as_their_products():
    """nn.MultiheadAttention's inference fast path and the CPU's fused scaled-dot-product kernel (Hugging Face
    models, F.scaled_dot_product_attention) cost what their matrix products do, not 0."""
    from torch import nn

    layer = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    ).eval()
    L, d, f = 8, 16, 32  # tokens, width (2 heads of 8), MLP
    products = 2 * L * d * 3 * d + 2 * L * d * d + 2 * 2 * L * L * d + 2 * 2 * L * d * f  # qkv, out, attention, MLP
    assert count_flops(layer, (torch.randn(1, L, d),)) == products
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    counts = {}
    for impl in ("sdpa", "eager"):
        cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8)
        cfg._attn_implementation = impl
        counts[impl] = cost.flop_profile(transformers.GPT2LMHeadModel(cfg), (torch.randint(0, 20, (1, 8)),)).total
    assert counts["sdpa"] == counts["eager"] > 0
