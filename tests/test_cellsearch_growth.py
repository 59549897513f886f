"""Firefly cell growth with three kinds of candidates: new edges, wider cells, new (residual) cells."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.errors import VerificationError
from firefly_descent.methods.cellsearch import FireflyCells, minimal_genotype
from firefly_descent.methods.cellsearch.firefly_cells import (
    CellCandidate,
    WidenCandidate,
    build_overgrown,
    build_overgrown_cells,
    build_widened,
    cell_layer_spec,
    integrated_scores,
    widen_plan,
)
from firefly_descent.methods.cellsearch.space import EdgeCandidate, candidate_edges, cells_of
from firefly_descent.models.darts import DartsNetwork, cell_paths
from firefly_descent.plan import NewLayer, Plan
from firefly_descent.search.config import ConfigError, load_search_config


def _tiny(dtype=torch.float32, steps=2, seed=0):
    torch.manual_seed(seed)
    model = DartsNetwork(minimal_genotype(steps), C=4, layers=3, num_classes=3, in_channels=1, input_size=8)
    model = model.to(dtype)
    x = torch.randn(16, 1, 8, 8, dtype=dtype)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # running statistics = the batch's, so eval mode is a live network, not a near-constant one
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval(), x


def _widths(model, kind):
    """Every BatchNorm width inside the cells of one type, per cell (factorized-reduce halves summed)."""
    out = []
    for _path, cell in cells_of(model, kind):
        out.append({m.num_features for _, m in cell.named_modules() if isinstance(m, nn.BatchNorm2d)})
    return out


@pytest.mark.parametrize("kind", ["normal", "reduce"])
def test_widening_a_cell_type_is_exact_and_keeps_one_width_per_cell(kind):
    model, x = _tiny(torch.float64)
    before_c = [c.channels for _, c in cells_of(model, kind)]
    with torch.no_grad():
        before = model(x)
    ff.apply(model, widen_plan(model, kind, 0.5, x[:2]), example_inputs=x[:2])
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-10  # new units: zero outgoing weights
    after_c = [c.channels for _, c in cells_of(model, kind)]
    assert after_c == [c + max(2, round(0.5 * c)) for c in before_c]
    for widths, c in zip(_widths(model, kind), after_c):
        assert widths == {c}  # every node, input and operation of the cell has the new width
    other = "reduce" if kind == "normal" else "normal"
    assert all(len(w) == 1 for w in _widths(model, other))
    # new edges (C -> C operations) still fit the widened cells: the over-grown network is exact
    cands = [c for c in candidate_edges(model) if c.kind == kind and c.op in ("sep_conv_3x3", "skip_connect")]
    over = build_overgrown(model, cands, 0.0, x[:2])
    with torch.no_grad():
        assert (over.net.eval()(x) - model(x)).abs().max().item() <= 1e-10


def test_new_residual_cell_is_identity_at_insertion_and_joins_the_normal_type():
    model, x = _tiny(torch.float64)
    geno = model.genotype()
    with torch.no_grad():
        before = model(x)
    layer = NewLayer("cells.0", "residual", cell_layer_spec(model, "cells.0"), {}, 0.0)
    ff.apply(model, Plan(layers=[layer]), example_inputs=x[:2])
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-12
    assert [p for p, _, _ in cell_paths(model)] == ["cells.0.0", "cells.0.1.body.cell", "cells.1", "cells.2"]
    assert model.genotype() == geno
    assert len(cells_of(model, "normal")) == 2  # a new edge of the normal type goes into it too
    graph = ff.analyze(model, x[:2])  # the analysis sees through the inserted cell
    assert any(m.tensor.startswith("cells.0.1.body.cell.") for g in graph.groups.values() if g.growable
               for m in g.members)


def test_engine_inserts_after_a_two_input_module_and_rolls_back_a_bad_layer():
    model, x = _tiny(torch.float64)
    with torch.no_grad():
        before = model(x)
    bad = cell_layer_spec(model, "cells.0") | {"c_out": 7}  # a residual cell that cannot add to its input
    with pytest.raises(VerificationError):
        ff.apply(model, Plan(layers=[NewLayer("cells.0", "residual", bad, {}, 0.0)]), example_inputs=x[:2])
    assert type(model.cells[0]).__name__ == "Cell"
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_pad_rule_carries_channels_through_a_spatial_pad_and_blocks_a_channel_pad():
    class Spatial(nn.Module):
        def __init__(self, pad):
            super().__init__()
            self.a, self.b, self.pad = nn.Conv2d(2, 4, 1), nn.Conv2d(4 + sum(pad[4:]), 3, 1), pad

        def forward(self, x):
            return self.b(F.pad(self.a(x), self.pad))

    x = torch.randn(2, 2, 5, 5)
    spatial = ff.analyze(Spatial((0, 1, 0, 1)), x)
    g = next(g for g in spatial.groups.values() if any(m.tensor == "a.weight" for m in g.members))
    assert g.growable and any(m.tensor == "b.weight" and m.role == "consumer" for m in g.members)
    channel = ff.analyze(Spatial((0, 0, 0, 0, 0, 1)), x)
    g = next(g for g in channel.groups.values() if any(m.tensor == "a.weight" for m in g.members))
    assert not g.growable and "pads a grown dim" in g.blocked[1]


def test_widen_score_equals_the_finite_difference_loss_change():
    model, x = _tiny(torch.float64)
    y = torch.randint(0, 3, (16,))
    plan = widen_plan(model, "normal", 0.5, x[:2])
    over, masks = build_widened(model, plan, x[:2])
    net = over.net.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, m in masks.items():
            mod, _, attr = name.rpartition(".")
            orig = net.get_submodule(mod).parametrizations[attr].original
            orig[m] = 0.05 * torch.randn(int(m.sum()), dtype=orig.dtype)
        over.scales.eps.fill_(0.0)
        off = F.cross_entropy(net(x), y).item()
        assert abs(off - F.cross_entropy(model(x), y).item()) <= 1e-12  # no new entry: the old network
        over.scales.eps.fill_(1.0)
        delta = F.cross_entropy(net(x), y).item() - off
    score = integrated_scores(over, [(x, y)], F.cross_entropy, points=64)
    assert abs(delta) > 1e-4
    assert abs(score[0].item() - delta) <= 0.02 * abs(delta)


def test_new_cell_score_equals_the_finite_difference_loss_change():
    model, x = _tiny(torch.float64)
    y = torch.randint(0, 3, (16,))
    over = build_overgrown_cells(model, [CellCandidate("cells.0")], 0.0, x[:2])
    net = over.net.eval()
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max().item() <= 1e-12
        base = F.cross_entropy(net(x), y).item()
        over.scales.eps.fill_(0.3)
        delta = F.cross_entropy(net(x), y).item() - base
    score = integrated_scores(over, [(x, y)], F.cross_entropy, points=64)
    assert abs(delta) > 1e-5
    assert abs(score[0].item() - delta) <= 0.02 * abs(delta)


def test_one_selection_across_kinds_ranks_by_score_per_cost_and_respects_conflicts_and_budget():
    model, _ = _tiny()
    e_norm = EdgeCandidate("normal", "sep_conv_3x3", 0, 2)
    e_red = EdgeCandidate("reduce", "avg_pool_3x3", 0, 3)
    w_norm, w_red, cell = WidenCandidate("normal"), WidenCandidate("reduce"), CellCandidate("cells.0")
    cands = [e_norm, e_red, w_norm, w_red, cell]
    size = sum(p.numel() for p in model.parameters())
    costs = [400.0, 2.0, 250.0, 900.0, 600.0]
    scores = torch.tensor([-0.04, -0.001, -0.03, -0.05, -0.002])
    grower = FireflyCells(budget=0.5, rank="efficiency", max_cells=2)
    kept = [cands[i] for i in grower.select(model, cands, scores, costs)]
    # per cost: e_red 5e-4, w_norm 1.2e-4, e_norm 1e-4, w_red 5.6e-5, cell 3e-6; w_norm blocks normal edges
    # and new cells, and one type widens per round, so only e_red and w_norm are kept
    assert kept == [e_red, w_norm]
    by_score = [cands[i] for i in FireflyCells(budget=10_000, rank="score").select(model, cands, scores, costs)]
    assert by_score == [w_red, e_norm, cell]  # w_red blocks w_norm and reduce edges
    tight = FireflyCells(budget=500, rank="score").select(model, cands, scores, costs)
    assert sum(costs[i] for i in tight) <= 500 and [cands[i] for i in tight] == [e_norm, e_red]
    assert sum(costs[i] for i in grower.select(model, cands, scores, costs)) <= 0.5 * size
    none = FireflyCells(budget=10_000, max_cells=0).select(model, [cell], torch.tensor([-1.0]), [1.0])
    assert none == []


@pytest.mark.parametrize("kinds", [("widen",), ("cells",)])
def test_grow_with_one_kind_commits_through_the_safeguard_and_the_network_still_trains(kinds, tmp_path):
    model, x = _tiny()
    torch.manual_seed(1)
    xs, ys = torch.randn(96, 1, 8, 8), torch.randint(0, 3, (96,))
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 96, 16)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grower = FireflyCells(kinds=kinds, budget=0.9, step_one_batches=2, score_batches=2, points=2,
                          safeguard={"check": True, "tolerance": 1.0})
    report = grower.grow(model, loader, F.cross_entropy, optimizer=opt)
    assert report.outcome in ("accepted", "shrunk", "rolled-back")
    assert all(("widen" in k) if kinds == ("widen",) else ("cell-after" in k) for k in report.kept + report.undone)
    if report.kept:
        assert report.params_after > report.params_before
        assert report.params_after - report.params_before <= 0.9 * report.params_before
    # whatever was kept: every cell of a type has one width and the normal cells share one genotype
    for kind in ("normal", "reduce"):
        assert all(len(w) == 1 for w in _widths(model, kind))
        cells = [c for _, c in cells_of(model, kind)]
        assert all(c.edges() == cells[0].edges() for c in cells)
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(xs[:16]), ys[:16]).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    ff.save(model, str(tmp_path / "m.pt"))  # the growth history replays: same network
    again = ff.load(str(tmp_path / "m.pt"), build=lambda: _tiny()[0]).eval()
    with torch.no_grad():
        assert torch.allclose(again(x), out, atol=1e-6)


def test_all_kinds_over_rounds_keep_the_genotype_shared_and_edges_fit_widened_cells():
    model, x = _tiny()
    torch.manual_seed(2)
    xs, ys = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    # round 1: force a widening of the normal cells and a new cell is refused alongside it
    FireflyCells(kinds=("widen",), budget=0.9, step_one_batches=2, score_batches=2, points=2,
                 safeguard={"check": False}).grow(model, loader, F.cross_entropy)
    ff.apply(model, Plan(layers=[NewLayer("cells.0", "residual", cell_layer_spec(model, "cells.0"), {}, 0.0)]),
             example_inputs=x[:2])
    grower = FireflyCells(kinds=("edges", "widen", "cells"), budget=0.9, step_one_batches=2, score_batches=2,
                          points=2, safeguard={"check": False}, rank="score", max_cells=3)
    for _ in range(2):
        report = grower.grow(model, loader, F.cross_entropy)
        assert report.candidates > 0
    normal = [c for _, c in cells_of(model, "normal")]
    assert len(normal) >= 2 and all(c.edges() == normal[0].edges() for c in normal)
    assert all(len(w) == 1 for k in ("normal", "reduce") for w in _widths(model, k))
    g = model.genotype()
    evaluated = DartsNetwork(g, C=4, layers=3, num_classes=3, in_channels=1, input_size=8).eval()
    with torch.no_grad():
        assert evaluated(x).shape == (16, 3) and torch.isfinite(model(x)).all()


def test_bad_growth_options_are_refused_in_one_line():
    for kw, msg in [({"kinds": ["edges", "deeper"]}, "kinds"), ({"rank": "best"}, "rank"), ({"widen": 0}, "widen"),
                    ({"max_cells": -1}, "max_cells")]:
        with pytest.raises(ValueError, match=msg):
            FireflyCells(**kw)
    base = {"method": {"name": "firefly", "kwargs": {"rounds": 1}}, "budget": {"epochs": 2}}
    for kw, key in [({"kinds": ["wider"]}, "kinds"), ({"kinds": []}, "kinds"), ({"rank": "x"}, "rank"),
                    ({"widen": -1}, "widen"), ({"max_cells": 1.5}, "max_cells"),
                    ({"safeguard": {"chek": True}}, "safeguard"), ({"safeguard": 3}, "safeguard")]:
        cfg = copy.deepcopy(base)
        cfg["method"]["kwargs"].update(kw)
        with pytest.raises(ConfigError, match=f"method.kwargs.{key}") as e:
            load_search_config(cfg)
        assert "\n" not in str(e.value)
    ok = copy.deepcopy(base)
    ok["method"]["kwargs"].update({"kinds": ["edges", "cells"], "rank": "score", "widen": 0.25, "max_cells": 1,
                                   "safeguard": {"check": False}})
    assert load_search_config(ok).method.kwargs["kinds"] == ["edges", "cells"]


def test_search_with_wider_and_new_cells_resumes_to_the_same_result(tmp_path, monkeypatch):
    import json

    from firefly_descent.search import runner

    method = {"name": "firefly", "kwargs": {"rounds": 1, "ops": ["skip_connect", "avg_pool_3x3"], "points": 2,
                                            "score_batches": 1, "step_one_batches": 2, "budget": 0.9,
                                            "kinds": ["widen", "cells"], "safeguard": {"check": False}}}
    cfg = {"space": {"C": 4, "layers": 3, "steps": 2}, "method": method, "budget": {"epochs": 2},
           "data": {"name": "digits", "train_subset": 128, "test_subset": 64, "val_fraction": 0.5,
                    "batch_size": 32, "augment": None},
           "eval": {"epochs": 0}, "seeds": [0]}
    straight = runner.run_search(cfg, tmp_path / "a")["results"][0]
    rows = [json.loads(x) for x in (tmp_path / "a" / "seed-0" / "log.jsonl").read_text().splitlines()]
    kept = [k for r in rows if "growth" in r for k in r["growth"]["kept"]]
    assert kept and all("widen" in k or "cell-after" in k for k in kept)
    real = runner.FireflySearch.step

    def dying(self, i):
        if i == 1:  # after the growth round of step 0 was checkpointed
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(runner.FireflySearch, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(cfg, tmp_path / "b")
    monkeypatch.setattr(runner.FireflySearch, "step", real)
    resumed = runner.run_search(cfg, tmp_path / "b")["results"][0]
    assert resumed["genotype"] == straight["genotype"] and resumed["search_params"] == straight["search_params"]
    log = [(tmp_path / d / "seed-0" / "log.jsonl").read_text().splitlines() for d in "ab"]
    rows = [[json.loads(x) for x in lines] for lines in log]
    assert [r.get("train_loss") for r in rows[0]] == [r.get("train_loss") for r in rows[1]]
