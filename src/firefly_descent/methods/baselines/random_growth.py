"""Random growth: new units with random incoming and zero (or small random) outgoing weights.

Units are placed like Net2Net's draws: uniformly at random over the pool of all units of the
growable groups until the budget is used, each draw adding one new unit to the drawn unit's
group. Incoming weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default kaiming-uniform
init of Linear/Conv, a = sqrt(5)), bias 0, fresh BatchNorm channels, depthwise filters of the
same law; outgoing weights 0 (function exactly preserved) or U(-out_scale, out_scale).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ...analysis.rules import completed_roles
from ...errors import GrowthError
from ...plan import GroupChange, NewUnits, Plan
from ..base import Timer, register_grower
from ._common import BaselineGrower, Context, eligible_groups, fan_in, random_units, slice_shape, uniform, unit_costs


def random_new_units(
    ctx: Context, budget: Any, gen: torch.Generator, out_scale: float, counts: dict[str, int] | None = None
) -> list[GroupChange]:
    """The plan's group changes: random new units under `budget` (see module docstring), or exactly
    `counts[group]` new units per group (matched placement)."""
    pool = eligible_groups(ctx)
    if not pool:
        return []
    if counts is not None:
        unknown = sorted(set(counts) - {g.name for g in pool})
        if unknown:
            raise GrowthError(f"placement names group(s) {unknown} this model cannot grow; growable: "
                              f"{', '.join(g.name for g in pool)}")
        chosen = {g.name: list(range(int(counts.get(g.name, 0)))) for g in pool}
    else:
        chosen = random_units(pool, unit_costs(ctx, budget, pool), budget, gen, pool_groups=ctx.groups)
    changes = []
    for g in pool:
        k = len(chosen.get(g.name, []))
        if k == 0:
            continue
        incoming: dict[str, torch.Tensor] = {}
        outgoing: dict[str, torch.Tensor] = {}
        passthrough: dict[str, torch.Tensor] = {}
        completed = completed_roles(g)  # a normalised stream's new units are its completion (the mean): exact
        for m in g.members:
            shape = slice_shape(ctx.model, m)
            if m.role in completed:
                continue
            if m.role in ("producer", "passthrough") and m.kind == "weight":
                value = uniform([k, *shape], 1.0 / math.sqrt(fan_in(shape)), gen)
                (incoming if m.role == "producer" else passthrough)[m.tensor] = value
            elif m.role == "consumer" and out_scale > 0:
                outgoing[m.tensor] = uniform([k, *shape], out_scale, gen)
        changes.append(GroupChange(g, new=NewUnits(k, incoming, outgoing, passthrough, init="zero")))
    return changes


@register_grower("random")
class RandomGrowth(BaselineGrower):
    """Random new units under the budget.

    kwargs: budget=0.35, seed=0, out_scale=0.0 (0 = exactly function-preserving), batches=8, groups=None,
    placement=None: the matched-placement control. A list with one {group: units} dict per growth step, or a
    run directory whose growth.jsonl gives them (each step's splits + new units per group, e.g. a Firefly
    run): growth step k adds exactly that many random new units to each group, whatever the budget says.
    """

    name = "random"
    sharded_growth = True  # reads data only through the reduced losses, safeguard and BatchNorm refresh

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        out_scale: float = 0.0,
        batches: int | None = 8,
        groups: list[str] | None = None,
        per_group: bool = False,
        placement: list[dict[str, int]] | str | None = None,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if out_scale < 0:
            raise ValueError(f"out_scale must be >= 0, not {out_scale}")
        self.out_scale = float(out_scale)
        self.placement = read_placement(placement) if isinstance(placement, (str, Path)) else placement
        self.steps = 0  # growth steps taken (the index into `placement`); saved with the run

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))

    def decide(self, ctx: Context) -> Plan:
        counts = None
        if self.placement is not None:
            if self.steps >= len(self.placement):
                raise GrowthError(f"placement has {len(self.placement)} growth step(s); this is step {self.steps + 1}")
            counts = self.placement[self.steps]
            ctx.report.extra["placement"] = dict(counts)
        with Timer(ctx.report.timings, "search"):
            changes = random_new_units(ctx, self.budget, ctx.gen, self.out_scale, counts)
            plan = self.make_plan(ctx, changes, preserving=self.out_scale == 0)
        self.steps += 1
        return plan


def read_placement(run: str | Path) -> list[dict[str, int]]:
    """Per growth step, units added per group (splits + new units) as a run's growth.jsonl records them."""
    path = Path(run) / "growth.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise GrowthError(f"placement: no growth log at {path}; pass a run directory or its growth.jsonl")
    return placement_of([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def placement_of(records: Iterable[dict[str, Any]]) -> list[dict[str, int]]:
    """Per growth record (a GrowthReport dict), the units it added per group: splits + new units."""
    steps = []
    for rec in records:
        counts: dict[str, int] = {}
        for key in ("units_split", "units_added"):
            for g, n in (rec.get(key) or {}).items():
                counts[g] = counts.get(g, 0) + int(n)
        steps.append(counts)
    return steps
