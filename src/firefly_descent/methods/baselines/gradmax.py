"""GradMax (Evci, van Merriënboer, Unterthiner, Vladymyrov, Pedregosa 2022).

New units get ZERO incoming weights (so the function is unchanged whatever their outgoing
weights) and outgoing weights chosen to maximise the gradient norm of the new incoming weights.
With incoming weights W_new = 0 and outgoing weights u (one vector per new unit over all of its
consumer slices), the gradient of the loss w.r.t. the new unit's incoming weights is linear in u:
  ∂L/∂w_new = Mᵀu,   M = E[ Σ_positions s · (∂L/∂a_new as a function of u) ⊗ x ],
which for Linear→Linear is exactly M = E[∂L/∂z_{l+1} x_lᵀ] (z_{l+1}: consumer outputs, x_l: producer
inputs, with a 1 appended for a bias). Maximising ||Mᵀu|| under ||u|| ≤ c gives u = c × the top
left-singular vectors of M, new unit k taking the k-th; its one-step gain is (c·σ_k)².

How M is computed, for every consumer kind at once (Linear, k×k Conv, through flatten, pooling,
...): a deep copy of the model is grown by the engine with D_out probe units (D_out = size of one
unit's consumer slices), zero incoming and outgoing weights = the standard basis, so probe k's
gradient at its activation output is ∂L/∂a for u = e_k; hooks read it (exactly, see `_probe`) and
the producer's input patches x, and M[k] = s · Σ x ∂L/∂a_k. This is exact for any consumer layout,
so no k×k or flatten approximation is made. Conventions: BatchNorm in eval mode (a new channel's
fresh statistics make it y = h/sqrt(1 + eps), s includes that factor); the activation's derivative
at 0 is its right derivative (1 for ReLU, as in the paper, 0.5 for GELU); σ(0) must be 0.
Groups that are not `producer -> (BatchNorm) -> activation` (residual-tied producers, depthwise
chains, ...) are skipped with the reason in `report.extra["skipped_groups"]` (GrowthError when
named in `groups=`). Selection: (c_g σ_k)² competes across groups under the budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...budget import Candidate, select
from ...collective import current_sync
from ...engine import apply
from ...errors import GrowthError
from ...plan import GroupChange, NewUnits, Plan
from ..base import LossFn, Timer, register_grower
from ._common import BaselineGrower, Context, slice_shape, unit_costs, unit_slice
from ._probe import UnitPath, collect, find_paths, verify_paths


def slope_at_zero(act: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> tuple[float, float]:
    """(σ(0), right derivative σ'(0⁺)) of an activation (a module or a `_probe.UnitPath.activation`)."""
    with torch.enable_grad():
        t = torch.tensor([1e-6], dtype=torch.float64, device=like.device, requires_grad=True)
        (d,) = torch.autograd.grad(act(t).sum(), t)
    zero = act(torch.zeros(1, dtype=torch.float64, device=like.device))
    return float(zero), float(d)


@register_grower("gradmax")
class GradMax(BaselineGrower):
    """New units with zero incoming and gradient-maximising outgoing weights.

    kwargs: budget=0.35, seed=0, batches=1 (the paper uses one batch), scale=0.5, relative=True
    (c = scale × mean outgoing-weight norm of the group's existing units; absolute c = scale when
    False), max_probe=4096 (largest consumer-slice size D_out probed), groups=None,
    incoming_std=1e-3: std of the new units' incoming weights. Exactly zero incoming weights never train
    behind a ReLU in PyTorch (its derivative at 0 is 0, so the new units stay dead: measured in suite B,
    where GradMax with zero incoming weights ended exactly at the static network's accuracy); this tiny
    noise breaks that symmetry at the price of an O(incoming_std) change of the function. 0 = the paper's
    exact zero (function-preserving).
    """

    name = "gradmax"
    sharded_growth = True  # M reduced through collective.current_sync()

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        batches: int | None = 1,
        scale: float = 0.5,
        relative: bool = True,
        max_probe: int = 4096,
        groups: list[str] | None = None,
        per_group: bool = False,
        incoming_std: float = 1e-3,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, not {scale}")
        if incoming_std < 0:
            raise ValueError(f"incoming_std must be >= 0, not {incoming_std}")
        self.incoming_std = float(incoming_std)
        self.scale, self.relative, self.max_probe = float(scale), bool(relative), int(max_probe)

    # ---- the gradient-correlation matrix -----------------------------------------------------------
    def paths(self, ctx: Context) -> dict[str, UnitPath]:
        paths, skipped = find_paths(ctx.model, ctx.groups, ctx.x, self.name, depthwise=False)
        skipped.update(verify_paths(ctx.model, paths, ctx.batches[0], self.name))
        ref = next(ctx.model.parameters())
        for n, p in list(paths.items()):
            s0, _ = slope_at_zero(p.activation, ref)
            d_out = sum(math.prod(slice_shape(ctx.model, m)) for m in p.group.members if m.role == "consumer")
            if abs(s0) > 1e-12:
                skipped[n] = f"gradmax does not apply: its activation {p.act!r} is not 0 at 0"
            elif d_out > self.max_probe:
                skipped[n] = f"gradmax does not apply: one unit's outgoing weights have {d_out} > max_probe entries"
            elif d_out == 0:
                skipped[n] = "gradmax does not apply: the group has no consumer weights"
            if n in skipped:
                del paths[n]
        if self.group_names is not None and skipped:
            n = next(iter(skipped))
            raise GrowthError(f"group {n!r}: {skipped[n]}")
        ctx.skipped.update(skipped)
        return paths

    def correlation(self, ctx: Context, path: UnitPath) -> torch.Tensor:
        """M [D_out, D_in] of one group (see module docstring), averaged over the growth batches."""
        g = path.group
        consumers = [m for m in g.members if m.role == "consumer"]
        shapes = [slice_shape(ctx.model, m) for m in consumers]
        sizes = [math.prod(s) for s in shapes]
        d_out = sum(sizes)
        outgoing, off = {}, 0
        for m, shape, k in zip(consumers, shapes, sizes):
            basis = torch.zeros(d_out, k)
            basis[off:off + k] = torch.eye(k)
            outgoing[m.tensor] = basis.reshape(d_out, *shape)
            off += k
        probe = copy.deepcopy(ctx.model)
        plan = Plan([GroupChange(g, new=NewUnits(d_out, outgoing=outgoing, init="zero"))], method="gradmax-probe",
                    input_shapes=[list(s) for s in ctx.graph.input_shapes])
        apply(probe, plan, None, ctx.x, record=False)
        C = g.width
        acc = None
        for stats in collect(probe, {g.name: path}, ctx.batches, ctx.loss_fn):
            d = stats[g.name]
            part = d.X.transpose(0, 1) @ d.g[:, C:C + d_out]  # [D_in, D_out]
            acc = part if acc is None else acc + part
            c_new = d.c[C:C + d_out]
        assert acc is not None
        _, slope = slope_at_zero(path.activation, acc)
        M = (acc * (c_new * slope)).transpose(0, 1) / len(ctx.batches)
        return current_sync().mean(M, sum(len(y) for _, y in ctx.batches))  # every rank's shard (sharded growth)

    def matrices(
        self, model: nn.Module, data: Iterable[Any], loss_fn: LossFn, example_inputs: Any = None
    ) -> dict[str, torch.Tensor]:
        """M of every eligible group (no growth), for inspection and tests."""
        ctx = self.begin(model, data, loss_fn, example_inputs)
        return {n: self.correlation(ctx, p) for n, p in self.paths(ctx).items()}

    def out_norm(self, ctx: Context, path: UnitPath) -> float:
        if not self.relative:
            return self.scale
        consumers = [m for m in path.group.members if m.role == "consumer"]
        norms = [math.sqrt(sum(float(unit_slice(ctx.model, m, j).float().pow(2).sum()) for m in consumers))
                 for j in range(path.group.width)]
        mean = sum(norms) / max(1, len(norms))
        return self.scale * (mean if mean > 0 else 1.0)

    # ---- growth -------------------------------------------------------------------------------
    def decide(self, ctx: Context) -> Plan:
        report = ctx.report
        svd: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        with Timer(report.timings, "score"):
            paths = self.paths(ctx)
            for n, p in paths.items():
                U, S, _ = torch.linalg.svd(self.correlation(ctx, p), full_matrices=False)
                idx = U.abs().argmax(0)  # sign convention: each vector's largest entry is positive
                U = U * torch.sign(U.gather(0, idx[None]))
                svd[n] = (U, S, self.out_norm(ctx, p))
        with Timer(report.timings, "select"):
            costs = unit_costs(ctx, self.budget)
            cands = []
            for n, (_, S, c) in svd.items():
                top = float(S[0]) if S.numel() else 0.0
                for k, s in enumerate(S.tolist()):
                    if s > 1e-12 * max(top, 1e-30) and s > 0:
                        cands.append(Candidate("new", n, k, -((c * s) ** 2), costs[n]))
            kept = select(cands, self.budget, ctx.groups)
            chosen: dict[str, list[int]] = {}
            for cand in kept:
                chosen.setdefault(cand.group, []).append(cand.index)
            changes = []
            for n, ks in chosen.items():
                U, _, c = svd[n]
                ks = sorted(ks)
                u = (U[:, ks].transpose(0, 1) * c).detach().cpu()  # [count, D_out]
                outgoing, off = {}, 0
                for m in paths[n].group.members:
                    if m.role != "consumer":
                        continue
                    shape = slice_shape(ctx.model, m)
                    k = math.prod(shape)
                    outgoing[m.tensor] = u[:, off:off + k].reshape(len(ks), *shape)
                    off += k
                incoming = {}
                if self.incoming_std > 0:
                    for m in paths[n].group.members:
                        if m.role == "producer" and m.kind == "weight":
                            shape = [len(ks), *slice_shape(ctx.model, m)]
                            incoming[m.tensor] = torch.randn(shape, generator=ctx.gen) * self.incoming_std
                changes.append(GroupChange(paths[n].group, new=NewUnits(len(ks), incoming=incoming,
                                                                        outgoing=outgoing, init="zero")))
            plan = self.make_plan(ctx, changes, preserving=self.incoming_std == 0)
        report.extra["singular_values"] = {n: [float(s) for s in S[:8]] for n, (_, S, _) in svd.items()}
        report.extra["out_norm"] = {n: c for n, (_, _, c) in svd.items()}
        return plan
