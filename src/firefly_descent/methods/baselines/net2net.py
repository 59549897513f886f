"""Net2Net (Chen, Goodfellow, Shlens 2016): widen by copying random units, deepen by identity layers.

Width: units are drawn uniformly at random from the global pool of all units of the growable
groups until the budget is used (`random_units`); each drawn unit is split by the engine (the
twin copies incoming weights, BatchNorm and depthwise filters; consumers' weights are divided
among the copies), so with `noise=0` the function is exactly preserved. `noise > 0` breaks the
symmetry: a Gaussian direction with std `noise` × std of the unit's incoming weights is added to
the parent and subtracted from the twin (a `Split` direction).
Depth: `deepen=True` inserts one identity-initialised layer per step, after `deepen_after` or a
random eligible activation: Net2Net's identity Linear/Conv + ReLU after a ReLU ("identity"), or
z + 0·h(z) elsewhere ("residual"); `deepen_kind="auto"` picks by the module.
"""

from __future__ import annotations

from typing import Any

import torch

from ...analysis.graph import Group
from ...budget import Budget
from ...plan import GroupChange, NewLayer, Plan, Split
from ..base import Timer, register_grower
from ._common import (
    BaselineGrower,
    Context,
    depth_boundaries,
    eligible_groups,
    new_layers,
    normal,
    random_units,
    unit_costs,
    unit_slice,
)

DEEPEN_KINDS = ("auto", "identity", "residual")


def split_changes(
    ctx: Context, budget: Budget, gen: torch.Generator, noise: float, groups: list[Group] | None = None
) -> list[GroupChange]:
    """Random Net2Net splits of the growable groups under `budget` (see module docstring)."""
    pool = eligible_groups(ctx, groups, splits=True)
    if not pool:
        return []
    chosen = random_units(pool, unit_costs(ctx, budget, pool), budget, gen, pool_groups=ctx.groups)
    changes = []
    for g in pool:
        units = chosen.get(g.name, [])
        if not units:
            continue
        splits = []
        for u in units:
            dirs: dict[str, torch.Tensor] = {}
            if noise > 0:
                for m in g.producers():
                    if m.kind != "weight":
                        continue
                    sl = unit_slice(ctx.model, m, u).float()
                    std = float(sl.std()) if sl.numel() > 1 else float(sl.abs().mean())
                    dirs[m.tensor] = normal(list(sl.shape), gen) * (noise * std)
            splits.append(Split(u, dirs, eps=1.0))
        changes.append(GroupChange(g, splits=splits))
    return changes


def pick_layers(
    ctx: Context, after: list[str] | None, kind: str, gen: torch.Generator, added: dict[str, int], n: int = 1
) -> list[NewLayer]:
    """New layers after the named modules, or after `n` random eligible boundaries."""
    if after is None:
        eligible = depth_boundaries(ctx, "identity" if kind == "identity" else "residual")
        if not eligible:
            ctx.report.extra["deepen_skipped"] = "no eligible boundary (an activation run once per forward)"
            return []
        idx = torch.randperm(len(eligible), generator=gen)[: max(0, n)].tolist()
        after = [eligible[i] for i in sorted(idx)]
    return new_layers(ctx, after, kind, gen, added)


@register_grower("net2net")
class Net2Net(BaselineGrower):
    """Function-preserving random widening (and optional identity deepening).

    kwargs: budget=0.35, seed=0, noise=0.0, widen=True, deepen=False, deepen_after=None,
    deepen_kind="auto" (auto | identity | residual), batches=8 (for the reported losses), groups=None.
    """

    name = "net2net"
    sharded_growth = True  # reads data only through the reduced losses, safeguard and BatchNorm refresh

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        noise: float = 0.0,
        widen: bool = True,
        deepen: bool = False,
        deepen_after: list[str] | None = None,
        deepen_kind: str = "auto",
        batches: int | None = 8,
        groups: list[str] | None = None,
        per_group: bool = False,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, not {noise}")
        if deepen_kind not in DEEPEN_KINDS:
            raise ValueError(f"deepen_kind must be one of {', '.join(DEEPEN_KINDS)}, not {deepen_kind!r}")
        self.noise = float(noise)
        self.widen = bool(widen)
        self.deepen = bool(deepen) or deepen_after is not None
        self.deepen_after = list(deepen_after) if deepen_after is not None else None
        self.deepen_kind = deepen_kind

    def decide(self, ctx: Context) -> Plan:
        with Timer(ctx.report.timings, "search"):
            changes = split_changes(ctx, self.budget, ctx.gen, self.noise) if self.widen else []
            added = {c.group.name: c.added for c in changes}
            layers = pick_layers(ctx, self.deepen_after, self.deepen_kind, ctx.gen, added) if self.deepen else []
            return self.make_plan(ctx, changes, layers, preserving=self.noise == 0)
