"""What growth costs: units, parameters or FLOPs, and greedy selection under a budget.

The parameter cost of one unit of a group is the size of its slices across the group's members; the FLOP
cost is what one more unit adds to the model's `torch.utils.flop_counter` count, computed from one count
of the model and the grown shapes (`cost.plan_cost`; no copy of the model is grown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .analysis import GrowthGraph
from .analysis.graph import Group
from .cost import count_flops as count_flops  # re-exported: FLOPs are counted in cost.py
from .cost import plan_cost
from .errors import GrowthError
from .plan import GroupChange, NewUnits, Plan

BUDGET_KINDS = ("ratio", "units", "params", "flops")


def count_params(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def unit_param_cost(group: Group, model: nn.Module) -> int:
    """Parameters added by one more unit of `group` (buffers such as running statistics excluded)."""
    params = dict(model.named_parameters())
    total = 0
    for m in group.members:
        p = params.get(m.tensor)
        if p is None:
            continue
        total += (p.numel() // p.shape[m.dim]) * m.inner
    return total


def unit_flop_cost(group: Group, model: nn.Module, example_inputs: Any, base: int | None = None) -> int:
    """FLOPs (per sample) added by one more unit of `group` (`base`, the model's own count, is no longer
    needed: the model is counted once and cached)."""
    plan = Plan([GroupChange(group, new=NewUnits(1))], function_preserving=False)
    return max(0, plan_cost(model, plan, example_inputs).flops)


@dataclass
class Budget:
    """How much a growth step may add.

    kind "ratio": `amount` × current units of the growable groups (the paper: 0.35);
    "units": an absolute number of units; "params" / "flops": an absolute number of parameters /
    per-sample FLOPs. `per_group` gives each group its own pool instead of one global pool.
    """

    kind: str = "ratio"
    amount: float = 0.35
    per_group: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise GrowthError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, not {self.kind!r}")
        if not (self.amount > 0 and math.isfinite(self.amount)):
            raise GrowthError(f"budget amount must be a positive number, not {self.amount!r}")

    @classmethod
    def parse(cls, spec: Any) -> Budget:
        """0.35 → ratio; 12 (int ≥ 1) → units; "params:20000", "flops:1e6", "units:8", "ratio:0.5";
        {"kind": ..., "amount": ..., "per_group": ...}; a Budget."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, bool):
            raise GrowthError(f"cannot read a budget from {spec!r}")
        if isinstance(spec, float) and spec < 1:
            return cls("ratio", spec)
        if isinstance(spec, (int, float)):
            return cls("units", float(spec))
        if isinstance(spec, str) and ":" in spec:
            kind, _, amount = spec.partition(":")
            try:
                return cls(kind.strip(), float(amount))
            except ValueError:
                pass
        raise GrowthError(f"cannot read a budget from {spec!r}; use 0.35, 'units:8', 'params:20000' or 'flops:1e6'")

    @property
    def currency(self) -> str:
        return "units" if self.kind in ("ratio", "units") else self.kind

    def limit(self, groups: list[Group]) -> float:
        """The global pool in this budget's currency."""
        if self.kind == "ratio":
            return float(int(self.amount * sum(g.width for g in groups)))
        return float(self.amount)

    def group_limit(self, group: Group, groups: list[Group]) -> float:
        """A group's own pool (per-group budgets): ratio of its width, or its share of the total by width."""
        if self.kind == "ratio":
            return float(int(self.amount * group.width))
        total = sum(g.width for g in groups) or 1
        return float(self.amount) * group.width / total


def group_unit_costs(budget: Budget, groups: list[Group], model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """Cost of one unit of each group in the budget's currency."""
    if budget.currency == "units":
        return {g.name: 1.0 for g in groups}
    if budget.currency == "params":
        return {g.name: float(max(1, unit_param_cost(g, model))) for g in groups}
    return {g.name: float(max(1, unit_flop_cost(g, model, example_inputs))) for g in groups}


@dataclass
class Candidate:
    """One growth option competing for the budget: a split, a new unit or a new layer."""

    kind: str  # "split" | "new" | "head" (a block of new units: a whole head, a normalised stream's pool) | "layer"
    group: str  # group name (for layers: the boundary module name)
    index: int  # unit index (split), new-unit slot, or layer index
    score: float = 0.0  # predicted loss change when switched on (negative = improvement)
    cost: float = 1.0


def select(
    candidates: list[Candidate],
    budget: Budget,
    groups: list[Group],
    allow_increase: bool = False,
) -> list[Candidate]:
    """Keep the candidates with the most negative scores (per unit of cost for params/FLOPs) within the budget.

    Greedy: walk candidates best-first and keep each one that still fits its pool.
    """
    pool = [c for c in candidates if allow_increase or c.score < 0]
    # a new layer or head competes with units on loss decrease per unit of budget, whatever the currency
    by_cost = budget.currency != "units" or any(c.kind in ("layer", "head") for c in pool)
    pool.sort(key=lambda c: (c.score / c.cost if by_cost else c.score, c.kind, c.group, c.index))
    if budget.per_group:
        left = {g.name: budget.group_limit(g, groups) for g in groups}
    else:
        left = {"*": budget.limit(groups)}
    kept = []
    for c in pool:
        key = c.group if budget.per_group else "*"
        if key not in left:  # layers in per-group mode compete in a pool of their own boundary
            left[key] = budget.limit(groups) / max(1, len(groups))
        if c.cost <= left[key] + 1e-9:
            left[key] -= c.cost
            kept.append(c)
    return kept


def total_units(graph: GrowthGraph) -> int:
    return sum(g.width for g in graph.growable())
