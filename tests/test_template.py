"""The grower template (methods/base.py): per-layer budget pools for every grower, a printed report that
lists the groups a method left alone and says why an empty step is empty, and cell growth on the template
with every edit in its plan (`Plan.values`, set by the engine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.budget import Budget
from firefly_descent.errors import GrowthError, PlanError
from firefly_descent.methods import make_grower
from firefly_descent.methods.base import _REGISTRY, Grower, GrowthReport, register_grower
from firefly_descent.methods.cellsearch import CellGrowthReport, FireflyCells, minimal_genotype
from firefly_descent.models.darts import DartsNetwork
from firefly_descent.plan import GroupChange, NewUnits, Plan

pytestmark = pytest.mark.usefixtures("raw_plans")  # plans as the methods decided them (tests/conftest.py)

BUILT_IN = ["static", "net2net", "random", "nash", "splitting-exact", "splitting-fast", "gradmax", "tiny", "firefly"]
FAST = {  # small decisions, so that every grower runs in a second or two
    "nash": {"children": 2, "child_steps": 2},
    "firefly": {"step_one_steps": 2, "score_batches": 1, "cost_limit": None},
}


class Uneven(nn.Module):
    """Two hidden layers of very different widths (20 and 6): per-group pools of 7 and 2 units at 0.35,
    where one global pool holds int(0.35 * 26) = 9 units that may land anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 20), nn.Linear(20, 6), nn.Linear(6, 3)
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.r2(self.b(self.r1(self.a(x)))))


def _uneven(seed: int = 0) -> Uneven:
    torch.manual_seed(seed)
    return Uneven()


def _data(n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name", BUILT_IN)
def test_per_group_gives_every_grower_per_layer_pools(name):
    model = _uneven()
    grower = make_grower(name, budget=0.35, per_group=True, **FAST.get(name, {}))
    assert grower.budget.per_group is True
    report = grower.grow(model, _data(), F.cross_entropy, example_inputs=torch.randn(4, 5))
    limits = {g: int(0.35 * w) for g, w in report.widths_before.items()}
    assert limits == {"a": 7, "b": 2}
    grown = {g: report.units_split.get(g, 0) + report.units_added.get(g, 0) for g in limits}
    assert all(grown[g] <= limits[g] for g in limits), grown
    if name in ("net2net", "random"):  # random draws fill each pool exactly
        assert grown == limits
    if name in ("net2net", "random", "splitting-exact", "splitting-fast", "gradmax", "firefly"):
        assert sum(grown.values()) > 0
    wa, wb = 20 + grown["a"], 6 + grown["b"]
    if not report.layers_inserted:  # NASH may also deepen
        assert report.params_after == (5 + 1) * wa + (wa + 1) * wb + (wb + 1) * 3
    assert report.widths_after == {g: report.widths_before[g] + grown[g] for g in limits}


def test_per_group_changes_where_units_go():
    """Splitting's most negative eigenvalues sit in `b`: one global pool of 9 units gives `b` 5 of them, its
    own pool holds 2, and `a` gets its own 7."""
    shared = make_grower("splitting-exact", budget=0.35).grow(
        _uneven(), _data(), F.cross_entropy, example_inputs=torch.randn(4, 5))
    pooled = make_grower("splitting-exact", budget=0.35, per_group=True).grow(
        _uneven(), _data(), F.cross_entropy, example_inputs=torch.randn(4, 5))
    assert shared.units_split == {"a": 4, "b": 5}
    assert pooled.units_split == {"a": 7, "b": 2}


def test_per_group_is_refused_in_one_line_where_a_grower_has_no_pools():
    @register_grower("test-no-budget")
    class NoBudget(Grower):
        name = "test-no-budget"

    try:
        with pytest.raises(GrowthError, match="'test-no-budget' has no per-layer budget pools"):
            make_grower("test-no-budget", per_group=True)
    finally:
        _REGISTRY.pop("test-no-budget")
    with pytest.raises(GrowthError, match="'firefly-cells' has no per-layer budget pools"):
        FireflyCells().use_group_pools()
    assert Budget.parse({"kind": "ratio", "amount": 0.35, "per_group": True}).per_group


def test_printed_report_lists_skipped_groups_with_their_reasons():
    report = GrowthReport(method="m", extra={"skipped_groups": {"b.1": "why b", "a.0": "why a"}})
    lines = str(report).splitlines()
    assert lines[-2:] == ["  skipped a.0: why a", "  skipped b.1: why b"]


class NormedCNN(nn.Module):
    """A GroupNorm-normalised conv (Firefly has no candidates for it) before a plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.n1(self.c1(x)))))
        return self.fc(h.mean((2, 3)))


def test_firefly_lists_the_groups_it_leaves_alone():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    report = make_grower("firefly", budget=0.35, **FAST["firefly"]).grow(NormedCNN(), data, F.cross_entropy)
    why = "a GroupNorm/grouped-conv constraint: Firefly has no candidates for it"
    assert report.extra["skipped_groups"] == {"c1": why}
    assert f"  skipped c1: {why}" in str(report).splitlines()
    assert report.units_split.get("c1", 0) == 0 and report.widths_after["c1"] == 4


@pytest.mark.parametrize(
    ("name", "kwargs", "why"),
    [
        ("static", {}, "the static control never grows"),
        ("net2net", {"budget": "params:1"}, "no candidate was kept (none lowered the loss, or none fit the budget)"),
    ],
)
def test_an_empty_step_says_why(name, kwargs, why):
    report = make_grower(name, **kwargs).grow(_uneven(), _data(), F.cross_entropy)
    assert report.outcome == "empty" and report.params_after == report.params_before
    assert report.extra["empty_reason"] == why
    assert f"  check: empty ({why})" in str(report).splitlines()


def test_plan_values_are_set_by_the_engine_and_undone_with_the_resize():
    model = _uneven()
    x = torch.randn(4, 5)
    group = ff.analyze(model, x)["a"]
    plan = Plan([GroupChange(group, new=NewUnits(2, init="zero"))], function_preserving=False)
    want = torch.arange(22 * 5, dtype=torch.float32).reshape(22, 5) / 100
    plan.values = {"a.weight": want}
    old_b = model.b.weight.detach().clone()
    undo = ff.engine.apply_undoable(model, plan, None, x)
    assert torch.equal(model.a.weight, want) and model.b.weight.shape == (6, 22)
    undo()
    assert model.a.weight.shape == (20, 5) and torch.equal(model.b.weight, old_b)
    # only tensors the plan resizes, in their grown shape; a plan with values is kept or undone, never scaled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for values, msg in [({"c.weight": torch.zeros(3, 6)}, "does not resize"), ({"a.weight": want[:3]}, "shape")]:
        plan.values = values
        with pytest.raises(PlanError, match=msg):
            ff.apply(model, plan, example_inputs=x)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plan.values = {"a.weight": want}
    with pytest.raises(PlanError, match="cannot be scaled"):
        plan.scaled(0.5)
    assert torch.equal(Plan.from_dict(plan.to_dict()).values["a.weight"], want)
    assert "values" not in plan.to_dict(tensors=False)  # growth histories record structure only


def test_cell_growth_is_a_grower_whose_widening_is_all_in_its_plan():
    torch.manual_seed(0)
    model = DartsNetwork(minimal_genotype(2), C=4, layers=3, num_classes=3, in_channels=1, input_size=8).eval()
    torch.manual_seed(1)
    xs, ys = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    grower = FireflyCells(kinds=("widen",), budget=0.9, step_one_batches=2, score_batches=2, points=2,
                          rank="score", safeguard={"check": False})
    assert isinstance(grower, Grower)
    report = grower.grow(model, loader, F.cross_entropy)
    assert isinstance(report, CellGrowthReport) and isinstance(report, GrowthReport)
    assert report.kept == ["reduce:widen"] and report.candidates == 2
    values = grower.last_plan.values
    convs = {k: v for k, v in values.items() if v.dim() == 4}  # BatchNorm's are calibrated and refreshed after
    assert len(convs) >= 4 and all(torch.equal(model.get_parameter(k), v) for k, v in convs.items())
    assert report.params_after > report.params_before and "kept" in report.to_dict()
