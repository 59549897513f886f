"""Plumbing shared by the baseline growers: constructor options, random unit draws, slices, depth.

Every baseline only *writes a plan* (its `decide`); the `Grower` template (methods/base.py) hands it to
the engine through the safeguard. Randomness comes from a `torch.Generator` seeded by the grower's
`seed` and the number of growth steps the model has already taken (`Grower.generator`), so a run is
reproducible and a resumed run draws the same units as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...analysis.graph import Boundary, Group, Member
from ...analysis.rules import completion_reason, splits_whole_only
from ...budget import Budget, group_unit_costs
from ...engine import layer_spec
from ...errors import GrowthError
from ...layers import build_body
from ...plan import NewLayer, Plan
from ..base import Context, Decision, Grower, GrowthReport
from ..boundaries import depth_boundaries as find_depth_boundaries
from ..boundaries import is_relu_like


class BaselineGrower(Grower):
    """Common constructor arguments of every baseline; the step itself is the `Grower` template.

    budget: anything `Budget.parse` accepts (0.35 = 35 % of the growable units, "params:N", ...).
    seed:   all randomness derives from it (and the model's growth-step count).
    batches: how many batches of `data` the method reads (None = all).
    groups: restrict growth to these group names (default: every growable group, one global pool).
    per_group: every group gets its own budget pool (`Budget.group_limit`) instead of one global pool.
    """

    name = "baseline"

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        batches: int | None = 8,
        groups: list[str] | None = None,
        per_group: bool = False,
    ) -> None:
        self.budget = Budget.parse(budget)
        self.seed = int(seed)
        self.batches = batches
        self.group_names = list(groups) if groups is not None else None
        self.last_plan: Plan | None = None
        if per_group:
            self.use_group_pools()

    def finish(self, ctx: Context, decision: Decision) -> GrowthReport:
        report = super().finish(ctx, decision)
        report.extra["seed"] = self.seed
        return report

    def make_plan(self, ctx: Context, changes: list, layers: list | None = None, preserving: bool = True) -> Plan:
        return Plan(list(changes), list(layers or []), function_preserving=preserving, method=self.name,
                    input_shapes=[list(s) for s in ctx.graph.input_shapes])


# ---- slices -------------------------------------------------------------------------------------
def slice_shape(model: nn.Module, member: Member) -> list[int]:
    """Shape of one unit's slice of `member` (the tensor with its dim narrowed to `inner`)."""
    t = tensor_of(model, member.tensor)
    shape = list(t.shape)
    shape[member.dim] = member.inner
    return shape


def unit_slice(model: nn.Module, member: Member, unit: int) -> torch.Tensor:
    """Unit `unit`'s slice of `member` (a view of the live tensor: read only)."""
    t = tensor_of(model, member.tensor)
    return t.detach().narrow(member.dim, member.offset + unit * member.inner, member.inner)


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    mod, _, attr = name.rpartition(".")
    owner = model.get_submodule(mod) if mod else model
    t = getattr(owner, attr)
    if not isinstance(t, torch.Tensor):
        raise GrowthError(f"{name!r} is not a tensor of the model; re-analyse the model")
    return t


def norm_reason(group: Group, model: nn.Module, splits: bool) -> str | None:
    """Why a grower cannot change `group` exactly, from its constraints' registered answers: a split of some
    units of a LayerNorm/RMSNorm'd group moves the norm's statistics; new units need a completion that holds in
    this model (not a post-norm block)."""
    if splits:
        if splits_whole_only(group):
            return "normalised by LayerNorm/RMSNorm: splitting only some units moves its statistics"
        return None
    return completion_reason(group, model)


# ---- random draws under a budget (Net2Net, random growth, NASH) -----------------------------------
def random_units(
    groups: list[Group],
    costs: dict[str, float],
    budget: Budget,
    gen: torch.Generator,
    repeat: bool = True,
    pool_groups: list[Group] | None = None,
) -> dict[str, list[int]]:
    """Draw uniformly random units from the pool of all units of `groups` until the budget is used.

    Each draw takes a unit whose cost still fits its pool (one global pool, or per-group pools when
    `budget.per_group`); units of GroupNorm-normalised groups come in whole GroupNorm groups.
    Draws run in passes over a fresh random permutation of the pool; a later pass may pick a unit
    again (split it twice) when `repeat` and the budget exceeds the pool. `pool_groups` (default
    `groups`) sizes a ratio budget, so groups a method cannot grow still count toward the pool.
    """
    items: list[tuple[str, tuple[int, ...], float]] = []
    no_repeat: set[str] = set()
    for g in groups:
        blocks = [c for c in g.constraints if c.kind == "groupnorm" or c.channels_per_group > 1]
        cpg = blocks[0].channels_per_group if blocks else None
        if cpg is not None:
            no_repeat.add(g.name)  # GroupNorm groups split whole groups, each channel at most once
        step = cpg or 1
        for start in range(0, g.width, step):
            block = tuple(range(start, min(start + step, g.width)))
            items.append((g.name, block, costs[g.name] * len(block)))
    sizing = pool_groups if pool_groups is not None else groups
    if budget.per_group:
        left = {g.name: budget.group_limit(g, sizing) for g in groups}
    else:
        left = {"*": budget.limit(sizing)}
    chosen: dict[str, list[int]] = {g.name: [] for g in groups}
    taken: set[tuple[str, tuple[int, ...]]] = set()
    while items:
        added = False
        for i in torch.randperm(len(items), generator=gen).tolist():
            name, block, cost = items[i]
            key = name if budget.per_group else "*"
            if (name in no_repeat and (name, block) in taken) or cost > left[key] + 1e-9:
                continue
            left[key] -= cost
            chosen[name] += list(block)
            taken.add((name, block))
            added = True
        if not added or not repeat:
            break
    return {n: sorted(u) for n, u in chosen.items() if u}


def unit_costs(ctx: Context, budget: Budget, groups: list[Group] | None = None) -> dict[str, float]:
    """Cost of one unit of each group in the budget's currency (measured, see `budget`)."""
    return group_unit_costs(budget, ctx.groups if groups is None else groups, ctx.model, ctx.x)


def uniform(shape: list[int] | tuple[int, ...], bound: float, gen: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) drawn on the CPU from `gen` (reproducible on every device)."""
    return (torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 2 - 1).float() * bound


def normal(shape: list[int] | tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).float()


def fan_in(shape: list[int] | tuple[int, ...]) -> int:
    """Fan-in of one unit's producer slice (every element of the slice feeds the unit)."""
    return max(1, math.prod(shape))


def eligible_groups(ctx: Context, groups: list[Group] | None = None, splits: bool = False) -> list[Group]:
    """The groups a random grower may widen by splits (`splits`) or new units; the others are recorded in
    `ctx.skipped` with the reason (`norm_reason`)."""
    pool = []
    for g in ctx.groups if groups is None else groups:
        why = norm_reason(g, ctx.model, splits)
        if why:
            ctx.skipped[g.name] = why
        else:
            pool.append(g)
    return pool


def forward_with_hooks(model: nn.Module, x: tuple[torch.Tensor, ...], hooks: dict[str, Any]) -> None:
    """One eval-mode, no-grad forward with temporary forward hooks {module name: hook}; removed after."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()


# ---- depth ---------------------------------------------------------------------------------------
def call_counts(model: nn.Module, x: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """How often each submodule runs in one forward pass (modules reused twice cannot host a new layer)."""
    counts: dict[str, int] = {}

    def counter(name: str) -> Any:
        return lambda _m, _i, _o: counts.__setitem__(name, counts.get(name, 0) + 1)

    forward_with_hooks(model, x, {name: counter(name) for name, _ in model.named_modules() if name})
    return counts


def depth_boundaries(ctx: Context, kind: str) -> list[str]:
    """Modules after which a new layer may go: activation modules (kind "identity": ReLU-like only,
    whose outputs are >= 0), run exactly once per forward, on a group that does not reach the output."""
    spec_kind = "identity" if kind == "identity" else "residual"

    def has_spec(b: Boundary) -> bool:
        try:
            layer_spec(b, spec_kind)
        except GrowthError:
            return False
        return True

    return find_depth_boundaries(ctx.graph, ctx.model, relu_like=kind == "identity",
                                 counts=call_counts(ctx.model, ctx.x), accept=has_spec)


def new_layers(
    ctx: Context,
    after: list[str],
    kind: str,
    gen: torch.Generator,
    added: dict[str, int] | None = None,
) -> list[NewLayer]:
    """Identity-at-init layers after `after`: Net2Net identity (Linear/Conv + ReLU, needs z >= 0) or
    a residual branch with scale 0. Widths follow the width growth of the same plan (`added`); the
    residual branch's parameters are drawn from `gen` so the plan is reproducible."""
    modules = dict(ctx.model.named_modules())
    layers = []
    for name in after:
        b = ctx.graph.boundaries.get(name)
        if b is None:
            raise GrowthError(f"cannot insert a layer after {name!r}: not a module whose output carries one "
                              f"group's units; candidates: {', '.join(depth_boundaries(ctx, 'residual')[:12])}")
        k = kind
        if k == "auto":
            k = "identity" if is_relu_like(modules.get(name)) else "residual"
        if k == "identity" and not is_relu_like(modules.get(name)):
            raise GrowthError(f"an identity layer after {name!r} needs non-negative inputs (a ReLU before it); "
                              "use kind 'residual'")
        spec = dict(layer_spec(b, k))
        extra = (added or {}).get(b.group or "", 0)
        key = "channels" if "channels" in spec else "features"
        spec[key] = int(spec[key]) + extra
        params: dict[str, torch.Tensor] = {}
        if k == "residual":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                params = {n: t.detach().clone() for n, t in build_body(spec).state_dict().items()}
        layers.append(NewLayer(name, k, spec, params, scale=0.0))
    return layers
