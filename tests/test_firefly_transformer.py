"""Firefly on transformers: new whole heads and new encoder blocks are candidates, exact when switched off,
scored by the integrated gradient, applied exactly, and chosen only when a teacher needs them."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import firefly_descent as ff
from firefly_descent.budget import Candidate, count_params
from firefly_descent.engine import check_attrs
from firefly_descent.methods import Firefly
from firefly_descent.methods.firefly.candidates import block_size, build_width_candidates, splittable
from firefly_descent.methods.firefly.depth_candidates import build_depth_candidates
from firefly_descent.methods.firefly.scoring import candidate_scores, joint_scores
from firefly_descent.models.transformer import Transformer

HEADS = "blocks.0.attn.heads"


def _model(dtype=torch.float64, seed=0, **kw) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    args = dict(in_features=4, seq_len=5, num_classes=3, d_model=6, depth=1, num_heads=2, head_dim=2, mlp_hidden=4)
    args.update(kw)
    model = Transformer(**args).to(dtype).eval()
    return model, (torch.randn(3, 5, 4, dtype=dtype),)


def _heads_candidates(model, x, heads=2, splits=True, only_heads=False):
    graph = ff.analyze(model, *x)
    groups = [g for g in graph.growable() if block_size(g) is not None]
    if only_heads:
        groups = [g for g in groups if g.name == HEADS]
    count = {g.name: heads * block_size(g) if g.name == HEADS else 2 for g in groups}
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    return graph, build_width_candidates(model, graph, groups, count, splits, x, init, torch.Generator().manual_seed(0))


def _on_only(bank, key: str, units: range) -> None:
    """Every candidate off (alpha = 0) except `units` of gate `key` (at 1)."""
    bank.alpha = 0.0
    bank.reset(requires_grad=False)
    bank.gates[key][list(units)] = 1.0


def test_head_candidates_are_whole_heads_and_exact_at_zero():
    model, x = _model()
    graph, cands = _heads_candidates(model, x)
    assert block_size(graph[HEADS]) == 2
    assert block_size(graph["embed"]) == 1 and not splittable(graph["embed"])  # LayerNorm'd stream: new units only
    assert f"split:{HEADS}" not in cands.bank.gates and cands.bank.gates[f"new:{HEADS}"].numel() == 4
    assert cands.net.blocks[0].attn.num_heads == 4  # two whole candidate heads in the over-grown net
    fresh = torch.randn(4, 5, 4, dtype=torch.float64)
    cands.bank.alpha = 0.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() < 1e-12
    cands.bank.alpha = 1.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() > 1e-4


def test_selected_head_is_applied_exactly_and_optimizer_state_survives():
    model, x = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(*x).pow(2).mean().backward()
    opt.step()
    graph, cands = _heads_candidates(model, x)
    attn = model.blocks[0].attn
    old_avg, old_wo = opt.state[attn.wq]["exp_avg"].clone(), opt.state[attn.wo]["exp_avg"].clone()
    fresh = torch.randn(4, 5, 4, dtype=torch.float64)
    _on_only(cands.bank, f"new:{HEADS}", range(2, 4))  # head 1 alone, at full amplitude
    with torch.no_grad():
        target = cands.net(fresh)
    plan = Firefly()._materialize(graph, cands, None, [Candidate("head", HEADS, 1, -1.0, 2.0)], x)
    ff.apply(model, plan, opt, x)
    attn = model.blocks[0].attn
    assert attn.num_heads == 3 and check_attrs(model) == []
    with torch.no_grad():
        err = (model(fresh) - target).abs().max().item() / (1 + target.abs().max().item())
    assert err <= 1e-5
    state = opt.state[attn.wq]
    assert torch.equal(state["exp_avg"][:4], old_avg) and state["exp_avg"][4:].abs().max() == 0
    assert torch.equal(opt.state[attn.wo]["exp_avg"][:, :4], old_wo)
    opt.zero_grad()
    model(*x).pow(2).mean().backward()
    opt.step()  # trains on with the remapped state


def test_head_score_is_the_integrated_gradient_of_its_gate():
    model, x = _model()
    _, cands = _heads_candidates(model, x, heads=1, only_heads=True)
    gen = torch.Generator().manual_seed(1)
    xb = torch.randn(16, 5, 4, generator=gen, dtype=torch.float64)
    yb = torch.randint(0, 3, (16,), generator=gen)
    bank, key = cands.bank, f"new:{HEADS}"
    # the gradient of one gate over the head's units is the central difference of the loss
    bank.alpha = 0.5
    bank.reset(requires_grad=True)
    grad = torch.autograd.grad(F.cross_entropy(cands.net(xb), yb), bank.gates[key])[0].sum().item()
    vals = []
    for h in (1e-5, -1e-5):
        bank.reset(requires_grad=False)
        bank.gates[key] += h
        with torch.no_grad():
            vals.append(F.cross_entropy(cands.net(xb), yb).item())
    assert abs(grad - (vals[0] - vals[1]) / 2e-5) <= 1e-7 + 1e-5 * abs(grad)
    # with one candidate, the integrated score is the loss change of switching the head on
    f = Firefly(score_points=32)
    score = joint_scores(f.config, cands.net, bank, [(xb, yb)], F.cross_entropy)[key].sum().item()
    losses = []
    for alpha in (1.0, 0.0):
        bank.alpha = alpha
        with torch.no_grad():
            losses.append(F.cross_entropy(cands.net(xb), yb).item())
    change = losses[0] - losses[1]
    assert abs(change) > 1e-4 and abs(score - change) <= 1e-3 * abs(change)


def _vit(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(8, 4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8, num_classes=3)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model.to(dtype).eval()



def test_per_candidate_head_score_switches_the_whole_head_off():
    """Issue 26: on the per-candidate path a head is one candidate: its score is L(all on) - L(all on but the
    head's units off), the other heads and units left on."""
    model, x = _model()
    _, cands = _heads_candidates(model, x, heads=2)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))]
    bank, key = cands.bank, f"new:{HEADS}"
    f = Firefly(score_path="per-candidate", bn_mode="frozen")
    report = SimpleNamespace(extra={})
    scores = candidate_scores(f.config, cands.net, bank, data, F.cross_entropy, {key: 2}, report, {})
    assert scores[key].numel() == 2 and report.extra["score_path"]["rescored"] == sum(map(len, scores.values()))
    xb, yb = data[0]
    bank.alpha = 0.0
    with torch.no_grad():
        for head in (0, 1):
            bank.gates = {k: torch.ones_like(g) for k, g in bank.gates.items()}
            on = F.cross_entropy(cands.net(xb), yb).item()
            bank.gates[key][2 * head : 2 * head + 2] = 0.0
            change = on - F.cross_entropy(cands.net(xb), yb).item()
            assert abs(change) > 1e-6 and abs(scores[key][head].item() - change) < 1e-12

@pytest.mark.parametrize("kind", ["transformer", "vit", "stock"])
def test_new_block_candidate_is_exact_at_insertion_and_kept_as_trained(kind):
    if kind == "transformer":
        model, x = _model()
        after = "blocks.0"
    elif kind == "stock":  # our Transformer with nn.MultiheadAttention (heads tied to the stream)
        model, x = _model(head_dim=None, d_model=8)
        after = "blocks.0"
    else:
        model, x = _vit(), (torch.randn(3, 3, 8, 8, dtype=torch.float64),)
        after = "encoder.layers.encoder_layer_0"
    graph = ff.analyze(model, *x)
    depth = build_depth_candidates(model, graph, [after], x, 0.5, block="auto")
    assert depth.specs[0]["type"] == "copy" and depth.specs[0]["zero"]
    fresh = torch.randn_like(x[0])
    depth.bank.alpha = 0.0
    with torch.no_grad():
        assert (depth.net(fresh) - model(fresh)).abs().max().item() < 1e-12
    depth.bank.alpha = 1.0
    with torch.no_grad():
        target = depth.net(fresh)
    assert (target - model(fresh)).abs().max().item() > 1e-4
    # kept: the engine inserts a copy holding the trained values, the over-grown net's function at alpha = 1
    cand = Candidate("layer", after, 0, -1.0, 1.0)
    plan = Firefly()._materialize(graph, None, depth, [cand], x)
    ff.apply(model, plan, example_inputs=x, verify=False)
    assert count_params(model) - count_params(depth.net) == 0
    with torch.no_grad():
        assert (model(fresh) - target).abs().max().item() <= 1e-10


def test_new_block_copied_from_a_block_that_gains_a_head_keeps_its_trained_function():
    model, x = _model()
    graph, cands = _heads_candidates(model, x)
    depth = build_depth_candidates(model, graph, ["blocks.0"], x, 0.5, block="auto")
    z = torch.randn(4, 5, 6, dtype=torch.float64)
    depth.bank.alpha = 1.0
    with torch.no_grad():
        target = depth.layers[0](z)
    kept = [Candidate("head", HEADS, 0, -1.0, 2.0), Candidate("layer", "blocks.0", 0, -1.0, 1.0)]
    ff.apply(model, Firefly()._materialize(graph, cands, depth, kept, x), example_inputs=x, verify=False)
    source, new = model.blocks[0]
    assert source.attn.num_heads == new.attn.num_heads == 3  # the copy was made after the head was added
    with torch.no_grad():
        assert (new(z) - target).abs().max().item() <= 1e-10  # its new head is silent, the rest as trained


def test_post_norm_stock_encoder_layer_is_not_a_block_candidate():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=False)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(layer), nn.Linear(8, 3)).eval()
    graph = ff.analyze(model, torch.randn(2, 5, 4))
    from firefly_descent.methods.firefly.depth_candidates import depth_block_spec

    assert depth_block_spec(graph, model, "1.0", "auto")["type"] != "copy"  # its copy would renormalise


# ---- choices under a teacher ---------------------------------------------------------------------------------
def _teacher_data(teacher: nn.Module, n: int = 8, batch: int = 64, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 5, 4, generator=gen) for _ in range(n)]
    with torch.no_grad():
        return [(x, teacher(x)) for x in xs]


def _student(seed: int = 0) -> nn.Module:
    model, _ = _model(torch.float32, seed=seed, num_heads=1, mlp_hidden=8)
    return model


def _grow(student: nn.Module, data: list, budget: str, **kw) -> tuple[dict[str, int], Firefly]:
    """Grow with every kind of candidate competing; returns what was added (heads, MLP units, blocks)."""
    before = count_params(student)
    heads, hidden = student.blocks[0].attn.num_heads, student.blocks[0].mlp.fc1.out_features
    grower = Firefly(budget=budget, candidates="all", step_one_steps=60, seed=0, **kw)
    grower.grow(student, data, F.mse_loss)
    assert count_params(student) - before <= float(budget.split(":")[1])  # the params budget, exactly
    pool = {k: sum(c.kind == k for c in grower.last_scores) for k in ("head", "new", "split", "layer")}
    assert all(pool.values()), pool  # heads, new units, splits and a block all competed
    block = student.blocks[0]
    added = isinstance(block, nn.Sequential)
    block = block[0] if added else block
    return {
        "heads": block.attn.num_heads - heads,
        "units": block.mlp.fc1.out_features - hidden,
        "blocks": int(added),
    }, grower


def test_heads_are_chosen_when_the_teacher_needs_more_heads():
    student = _student()
    teacher = copy.deepcopy(student)  # a teacher with two more heads of large output, applied through the engine itself
    graph = ff.analyze(teacher, torch.randn(2, 5, 4))
    torch.manual_seed(3)
    out = torch.randn(6, 4) * 1.5
    from firefly_descent.plan import GroupChange, NewUnits, Plan

    change = GroupChange(
        graph[HEADS],
        new=NewUnits(
            4,
            incoming={f"blocks.0.attn.w{p}": torch.randn(4, 1, 6) * 1.5 for p in "qkv"},
            outgoing={"blocks.0.attn.wo": out.t().unsqueeze(-1)},
        ),
    )
    ff.apply(teacher, Plan([change], function_preserving=False), verify=False)
    one_head = copy.deepcopy(student)
    ff.widen(one_head, torch.randn(2, 5, 4), {HEADS: 2}, mode="zero")  # head_dim = 2 new units
    added, grower = _grow(student, _teacher_data(teacher), "params:120", new_units=4)
    assert added["heads"] >= 1 and added["blocks"] == 0, added
    head = next(c for c in grower.last_scores if c.kind == "head" and c.group == HEADS)
    assert head.cost == count_params(one_head) - count_params(_student())  # a whole head's parameters


def test_a_block_is_chosen_when_the_teacher_is_one_block_deeper():
    student = _student()
    teacher = copy.deepcopy(student)
    new = copy.deepcopy(teacher.blocks[0])  # a second block like the first, its residual outputs doubled
    with torch.no_grad():
        for p in (new.attn.wo, new.attn.bo, new.mlp.fc2.weight, new.mlp.fc2.bias):
            p.mul_(2.0)
    teacher.blocks.append(new)
    added, grower = _grow(student, _teacher_data(teacher), "params:400", new_units=4)
    assert added["blocks"] == 1, added
    block = next(c for c in grower.last_scores if c.kind == "layer")
    assert block.cost == sum(p.numel() for p in teacher.blocks[1].parameters())  # a whole block's parameters


def test_a_copied_blocks_step_one_rate_is_relative_to_its_weights():
    """Step one's rate on a copied block's weights is `lr` × the RMS of the source weight each copies (the
    width candidates' relative units): a transformer's ~0.02 weights are not moved by absolute 0.03 steps."""
    model, x = _model()
    graph = ff.analyze(model, *x)
    depth = build_depth_candidates(model, graph, ["blocks.0"], x, 0.01, block="auto")
    scales = depth.lr_scales()
    own = dict(model.blocks[0].named_parameters())
    trainables = depth.trainables()
    assert trainables and all(id(p) in scales for p in trainables)  # every trainable of the copy, gated ones too
    rms = {n: float(q.pow(2).mean().sqrt()) for n, q in own.items()}
    fallback = sum(v for v in rms.values() if v > 0) / sum(v > 0 for v in rms.values())
    for name, p in depth.layers[0].named_parameters():
        ref = rms[name.replace(".parametrizations.", ".").removesuffix(".original")]
        assert scales[id(p)] == pytest.approx(ref if ref > 0 else fallback)  # a zero bias: the block's mean RMS


def test_trimming_to_the_exact_budget_refills_what_a_dropped_block_freed():
    """Greedy selection by per-candidate cost keeps a block and hidden units of the block it copies; the copy
    widens with them, so the exact increase is over the budget. Trimming drops the worst-ranked until it fits,
    the block with them; the budget that freed is refilled with the next-best candidates that fit."""
    from firefly_descent.methods.firefly.depth import exact_added_params

    model, x = _model(torch.float32, mlp_hidden=8)
    graph = ff.analyze(model, *x)
    depth = build_depth_candidates(model, graph, ["blocks.0"], x, 0.01, block="auto")
    hidden = "blocks.0.mlp.fc1"
    one = copy.deepcopy(model)
    ff.widen(one, x, {hidden: 1}, mode="zero")
    unit = count_params(one) - count_params(model)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    limit = block + 4 * unit
    units = [Candidate("new", hidden, j, -1.0 + 0.01 * j, float(unit)) for j in range(12)]
    layer = Candidate("layer", "blocks.0", 0, -0.5 * block / unit, float(block))  # ranked after every unit
    greedy = [*units[:4], layer]
    assert exact_added_params(model, graph, depth, greedy) > limit  # the copy takes the 4 units too
    kept = Firefly(budget=f"params:{limit}")._fit_params(model, graph, depth, greedy, None, [*units, layer])
    assert layer not in kept and 12 * unit <= limit
    assert sorted(c.index for c in kept) == list(range(12))  # refilled with every unit that fits, best first
    assert exact_added_params(model, graph, depth, kept) == 12 * unit
