"""The DARTS search space as a model family, the engine's NewBranch entry and Firefly cell growth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.errors import PlanError
from firefly_descent.methods.cellsearch import (
    FireflyCells,
    branch_plan,
    build_overgrown,
    candidate_edges,
    integrated_scores,
    minimal_genotype,
    random_genotype,
)
from firefly_descent.models import build_model
from firefly_descent.models.darts import DartsNetwork, count_parameters
from firefly_descent.models.genotype import GENOTYPES, PRIMITIVES, Genotype, GenotypeError, load_genotype
from firefly_descent.plan import NewBranch, Plan


def _warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give every BatchNorm running statistics of `x` (random-like, not the fresh 0/1)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _tiny(genotype: object = "darts_v2", dtype: torch.dtype = torch.float32) -> DartsNetwork:
    torch.manual_seed(0)
    return DartsNetwork(genotype, C=4, layers=3, num_classes=3, in_channels=1, input_size=8).to(dtype)


# ---- genotypes -------------------------------------------------------------------------------------


def test_genotype_json_and_darts_literal_round_trip(tmp_path):
    import random

    grown = Genotype.from_edges([("sep_conv_3x3", 1, 2), ("skip_connect", 0, 2), ("avg_pool_3x3", 2, 3)],
                                [("max_pool_3x3", 0, 2), ("dil_conv_5x5", 2, 3)])
    assert grown.normal_nodes == [2, 2, 3]  # not the two-per-node layout: nodes are explicit
    for g in [GENOTYPES["darts_v1"], GENOTYPES["darts_v2"], random_genotype(random.Random(3)), grown]:
        again = Genotype.from_json(g.to_json())
        assert again == g
        assert again.edges("normal") == g.edges("normal") and again.edges("reduce") == g.edges("reduce")
    v2 = GENOTYPES["darts_v2"]
    literal = v2.to_darts()
    assert "normal_concat=range(2, 6)" in literal
    assert Genotype.parse(literal) == v2
    path = tmp_path / "g.json"
    path.write_text(v2.to_json())
    assert load_genotype(str(path)) == v2
    assert json.loads(path.read_text())["normal"][0] == ["sep_conv_3x3", 0]
    with pytest.raises(GenotypeError, match="unknown operation 'conv_7x7'"):
        Genotype.from_dict({"normal": [["conv_7x7", 0], ["skip_connect", 1]], "normal_concat": [2],
                            "reduce": [], "reduce_concat": []})
    with pytest.raises(GenotypeError, match="earlier node"):
        Genotype.from_edges([("skip_connect", 3, 2)], [])
    with pytest.raises(GenotypeError, match="neither a published name"):
        load_genotype("no_such_genotype")


def test_darts_v2_parameter_count_matches_published_3_3m():
    model = DartsNetwork("darts_v2", C=36, layers=20, num_classes=10, auxiliary=True)
    n = count_parameters(model)  # DARTS reports the size without the auxiliary head
    assert abs(n - 3.3e6) / 3.3e6 <= 0.02, n
    assert n == 3_349_342  # the DARTS code's "param size = 3.349342MB"
    assert count_parameters(model, auxiliary=True) > n + 400_000
    assert count_parameters(DartsNetwork("darts_v2", C=36, layers=20, auxiliary=False), auxiliary=True) == n


def test_darts_eval_model_builds_from_a_path_and_trains_with_aux_and_drop_path(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text(GENOTYPES["darts_v1"].to_json())
    torch.manual_seed(0)
    model = build_model("darts-eval", genotype=str(path), C=4, layers=5, in_channels=1, input_size=16,
                        num_classes=3, drop_path_prob=0.2)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    model.train()
    out = model(x)
    aux = model.auxiliary_loss(y, F.cross_entropy)
    assert out.shape == (8, 3) and aux is not None and aux.item() > 0
    (F.cross_entropy(out, y) + aux).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "auxiliary" in n)
    model.eval()
    assert model.auxiliary_loss(y, F.cross_entropy) is None
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # drop-path is off in eval mode
    assert model.genotype() == GENOTYPES["darts_v1"]


# ---- the engine: new branches ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_operation_added_as_a_branch_at_zero_preserves_the_function(mode):
    model = _tiny()
    x = torch.randn(6, 1, 8, 8)
    _warm_bn(model, x)
    getattr(model, mode)()
    with torch.no_grad():
        before = model(x)
    cands = [c for c in candidate_edges(model, max_in_degree=None) if c.source in (0, 2)]
    ops_seen = {(c.op, c.kind) for c in cands}
    assert {op for op, _ in ops_seen} == set(PRIMITIVES) - {"none"}
    n_before = sum(len(n.edges) for c in model.cells for n in c.nodes)
    ff.apply(model, branch_plan(model, cands, 0.0), example_inputs=x[:2])
    assert sum(len(n.edges) for c in model.cells for n in c.nodes) > n_before
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-5


def test_new_branch_refusal_rollback_and_replay(tmp_path):
    model = _tiny("darts_v1")
    x = torch.randn(4, 1, 8, 8)
    _warm_bn(model, x)
    with pytest.raises(PlanError, match="does not sum branches"):
        ff.apply(model, Plan(branches=[NewBranch("cells.0.preprocess1", {"type": "darts_op", "op": "skip_connect",
                                                                         "channels": 4}, {}, {}, 0.0)]))
    good = NewBranch("cells.0.nodes.1", {"type": "darts_op", "op": "avg_pool_3x3", "channels": 4},
                     {"source": 2, "op": "avg_pool_3x3"}, {}, 0.5)
    bad = NewBranch("cells.0.nodes.1", {"type": "darts_op", "op": "sep_conv_3x3", "channels": 7},
                    {"source": 0, "op": "sep_conv_3x3"}, {}, 0.5)  # wrong width: fails when run
    n = len(model.cells[0].nodes[1].edges)
    with pytest.raises(ff.errors.VerificationError):
        ff.apply(model, Plan(branches=[good, bad], function_preserving=False), example_inputs=x)
    assert len(model.cells[0].nodes[1].edges) == n and len(model.cells[0].nodes[1].sources) == n
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ff.apply(model, Plan(branches=[good], function_preserving=False), opt, example_inputs=x)
    new = model.cells[0].nodes[1].edges[-1]
    assert any(p is new.scale for g in opt.param_groups for p in g["params"])
    assert ("avg_pool_3x3", 2, 3) in model.cells[0].edges()
    model.eval()
    with torch.no_grad():
        out = model(x)
    ff.save(model, str(tmp_path / "m.pt"))
    again = ff.load(str(tmp_path / "m.pt"), build=lambda: _tiny("darts_v1")).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_analysis_sees_the_cell_network_and_widening_is_exact():
    model = _tiny("darts_v2", torch.float64)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    _warm_bn(model, x)
    graph = ff.analyze(model, x)
    growable = [g for g in graph.groups.values() if g.growable]
    assert growable
    with torch.no_grad():
        before = model(x)
    target = max(growable, key=lambda g: len(g.members))
    ff.widen(model, x, {target.name: 2}, mode="split")
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-10


# ---- Firefly cell growth -----------------------------------------------------------------------------


def test_integrated_gradient_score_equals_finite_difference_loss_change():
    model = _tiny(minimal_genotype(2), torch.float64)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    _warm_bn(model, x)
    cands = candidate_edges(model, ops=("avg_pool_3x3", "dil_conv_3x3"))
    over = build_overgrown(model, cands, 0.0, x[:2])
    net, sc = over.net.eval(), over.scales
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max().item() <= 1e-10  # every candidate switched on at eps = 0

    def loss_change(on: dict[int, float]) -> float:
        with torch.no_grad():
            sc.eps.zero_()
            loss0 = F.cross_entropy(net(x), y).item()
            for c, e in on.items():
                sc.eps[c] = e
            return F.cross_entropy(net(x), y).item() - loss0

    one = len(cands) - 1
    delta = loss_change({one: 0.05})
    score = integrated_scores(over, [(x, y)], F.cross_entropy, points=64)
    assert abs(score[one].item() - delta) <= 0.02 * abs(delta) + 1e-7, cands[one]
    others = torch.cat([score[:one], score[one + 1:]])
    assert others.abs().max().item() <= 1e-3 * abs(delta) + 1e-8  # eps = 0: a zero path
    # several candidates on the diagonal path: the scores add up to the total loss change
    on = {0: 0.05, len(cands) // 2: -0.04, one: 0.03}
    delta = loss_change(on)
    score = integrated_scores(over, [(x, y)], F.cross_entropy, points=64)
    assert abs(sum(score[c].item() for c in on) - delta) <= 0.02 * abs(delta) + 1e-7


def test_firefly_cell_growth_keeps_best_edges_and_lowers_the_loss():
    torch.manual_seed(1)
    model = DartsNetwork(minimal_genotype(4), C=4, layers=3, num_classes=3, in_channels=1, input_size=8)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(5):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    grower = FireflyCells(budget=0.5, max_edges=3, ops=("skip_connect", "avg_pool_3x3", "sep_conv_3x3"), points=2,
                          kinds=("edges",), rank="score")
    edges_before = {k: list(c.edges()) for k, c in enumerate(model.cells)}
    report = grower.grow(model, loader, F.cross_entropy, optimizer=opt)
    assert 1 <= len(report.kept) <= 3
    assert report.params_after - report.params_before <= 0.5 * report.params_before
    assert report.loss_after < report.loss_before  # the kept edges' trained values lower the loss
    kept = sorted(report.scores.items(), key=lambda kv: kv[1])
    assert report.scores[report.kept[0]] == kept[0][1]  # the best-scoring candidate is kept
    for k, c in enumerate(model.cells):  # shared across all cells of a type
        assert len(c.edges()) >= len(edges_before[k])
    cells = [c for c in model.cells if c.reduction]
    assert all(c.edges() == cells[0].edges() for c in cells)
    assert all(len(n.sources) <= 2 for c in model.cells for n in c.nodes)
    g = model.genotype()
    model.train()  # the grown network trains
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert DartsNetwork(g, C=4, layers=3, num_classes=3, in_channels=1, input_size=8).genotype() == g


def test_candidate_costs_equal_the_measured_growth_in_params_and_flops():
    from firefly_descent.budget import count_flops
    from firefly_descent.methods.cellsearch import candidate_cost

    model = _tiny(minimal_genotype(3))
    x = torch.zeros(1, 1, 8, 8)
    cands = [c for c in candidate_edges(model) if c.op in ("sep_conv_3x3", "dil_conv_5x5", "skip_connect")]
    for cand in [cands[0], cands[len(cands) // 2], cands[-1]]:
        grown = _tiny(minimal_genotype(3))
        p0, f0 = sum(p.numel() for p in grown.parameters()), count_flops(grown, x)
        ff.apply(grown, branch_plan(grown, [cand], 0.0), example_inputs=torch.randn(2, 1, 8, 8))
        assert sum(p.numel() for p in grown.parameters()) - p0 == candidate_cost(model, cand, "params")
        assert count_flops(grown, x) - f0 == candidate_cost(model, cand, "flops"), cand


def test_candidate_edges_respect_in_degree_and_distinct_inputs():
    model = _tiny(minimal_genotype(3))
    every = candidate_edges(model, max_in_degree=None)
    distinct = candidate_edges(model, max_in_degree=None, distinct_inputs=True)
    # minimal cell: node i reads i-1; a second op on that pair is a candidate only without distinct_inputs
    assert any(c.source == c.node - 1 for c in every)
    assert not any(c.source == c.node - 1 for c in distinct)
    assert len(every) - len(distinct) == 2 * 3 * 6  # per cell type and node, the 6 other ops on the existing pair
    assert candidate_edges(model, max_in_degree=1) == []
