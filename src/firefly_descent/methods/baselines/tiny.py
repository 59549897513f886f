"""TINY (Verbockhaven, Rudkiewicz, Chevallier, Charpiat 2024, "Growing Tiny Networks: Spotting
Expressivity Bottlenecks and Fixing Them Optimally"), written from the paper on this engine.

A group's units live on the path  x --producer--> h --(BatchNorm)--> act --> a --consumer--> z.
With V = -∂ℓ_i/∂z_i the per-sample *desired update* of the consumer's pre-activation:

1. Best update of the existing consumer weights (least squares over samples and positions):
   δW* = S_A⁺ M_A,  S_A = E[A Aᵀ], M_A = E[A Vᵀ]  (A: the consumer's input patch, + 1 for its bias).
   Its first-order loss decrease per unit of step is tr(M_Aᵀ δW*).
2. Expressivity bottleneck: V_proj = V - δW*ᵀA, the part of V no change of the existing consumer weights
   can express. E[A V_projᵀ] = 0 (the projection is orthogonal; tested).
3. New neurons in closed form: with B the producer's input patch (+ 1 for its bias) and, for a k×k
   consumer, B read at every consumer offset,
   S = E[Σ_offsets B Bᵀ],  N = E[Σ_offsets B V_projᵀ]   ([D_in, D_out·k·k]),
   SVD  S^{-1/2} N = Σ λ_k u_k v_kᵀ  →  α_k = √λ_k S^{-1/2} u_k (incoming),  ω_k = √λ_k v_k (outgoing).
   These minimise ‖V_proj - Σ_k ω_k (α_kᵀ B)‖² in the S metric (the generalised eigenproblem of the paper);
   neuron k removes λ_k² of the bottleneck (its "eigenvalue"). For a k×k consumer, cross-offset terms of
   the quadratic form are dropped (S sums B Bᵀ over offsets), as GroMo's FullConv2dGrowingModule does.
4. Amplitude: new incoming weights γ·α, outgoing γ·ω (and, with `update_existing`, existing consumer weights
   + γ²·δW*), so the change of z is γ²·σ'(0)·c·(...) to first order (c: the fresh BatchNorm scale
   1/sqrt(1+eps) of a new channel). γ is chosen per group by a line search of the growth batches' loss
   (GroMo's grid: 0 and log-spaced points from `gamma_min` to 1, extended by decades while it improves),
   group after group in order of expected improvement, each with the groups before it switched on at their
   γ (independent searches can each be fine and together blow the loss up); a group whose best γ is 0 is
   not grown. The loss is computed with hooks on the unchanged model, equal to the engine's grown model.
5. Where to grow: every neuron k of every group competes under the budget with its expected first-order
   improvement σ'(0)·c·λ_k² (GroMo's `first_order_improvement` of the extension).

Normalisation: V = -(batch size)·∂(batch-mean loss)/∂z, i.e. minus each sample's own loss gradient; S, M, N
are means over samples (images, not positions); `first_order` is the decrease of the growth batches'
sample-weighted mean loss per unit of γ²: fo_k = σ'(0)·c·α_kᵀ N_full ω_k with N_full built from V (not V_proj),
so it includes the cross term with the existing weights' best update and can differ from λ_k². It equals the
finite-difference derivative of the grown model's loss for activations with σ(t) = σ'(0)t + O(t³) (tanh,
identity; tested to 1e-4 relative); for ReLU, ReLU(γu) = γ·ReLU(u), so the first-order model is only TINY's
linearisation (it ignores that a ReLU neuron is off on part of the data) and the line search measures the
real loss.

Differences from GroMo 0.1.0 by design (numbers: benchmarks/tiny_vs_gromo.py, λ and first-order values agree
to ~1e-14 relative and the spans of α and ω to ~4e-8 rad on MLPs and a 3×3 conv pair):
- `update_existing` defaults to True: like GroMo's `compute_optimal_updates` (compute_delta=True) the default also
  moves the existing consumer weights by γ²·δW* (its docstring lists compute_delta=False to reproduce the
  paper). Measured on suite B's setup (benchmarks/tiny_growth_step.py, 3 seeds), held-out loss change of one
  step: +0.0145 ± 0.0075 without the update (in-sample -0.0180), -0.0122 ± 0.0089 with it; a baseline should
  not be a straw man, so the default is the peer's. `update_existing=False` isolates the choice of the new
  neurons (every other grower here only adds units). This is the one edit made outside the engine: values
  only, no shapes, on the consumers of the grown groups, just before the plan is applied. Either way the
  new neurons come from the projected V_proj, as GroMo's `tensor_n`. The δW* decrease is reported
  (`extra["delta_decrease"]`) but not used to rank groups.
- GroMo grows one layer per step (the best `first_order_improvement`, which includes the δW* decrease); here
  neurons of all groups compete for the budget (units, parameters or FLOPs) and each chosen group gets its
  own γ (sequential line search, see 4.).
- GroMo averages ∂loss/∂z over samples: with a batch-mean loss its λ is ours / batch size; with a summed loss
  (as in the cross-check) the two are the same number. α, ω, the spans and the ranking do not depend on it.
- S^{-1/2} drops eigenvalues below `rel_threshold` × the largest (GroMo: an absolute 1e-6), and neurons
  with λ_k < `rel_threshold` × λ_max are not candidates (GroMo: an absolute 1e-3).
- `holdout` (default 0, GroMo's in-sample search) can keep the last growth batches out of the statistics to
  choose γ on data the neurons were not fitted to.

Groups handled: a dense or 1-d to 3-d convolutional producer whose rule says how its input unfolds (Linear,
ungrouped zero-padded Conv1d/2d/3d, a user's layer with such a rule), optional BatchNorm, an activation (module
or functional) with σ(0) = 0, and exactly one such consumer (or a dense consumer reading the flattened
activation map, run as a full-map convolution) whose input *is* the activation output (checked
numerically). Other groups (pooling or other ops between the activation and its consumer, residual-tied
or concatenated producers, depthwise or grouped convolutions, LayerNorm/GroupNorm, several consumers) are
skipped with the reason in
`report.extra["skipped_groups"]` (GrowthError when named in `groups=`).

Where the code is: `_tiny_paths.py` decides which groups fit (the paragraph above), `_tiny_closed_form.py`
computes steps 1-3 (statistics, δW*, V_proj, the SVD), `_tiny_amplitude.py` step 4 (weights at γ, hooks, line
search, the δW* edit); this file is the grower: its settings, step 5 and the plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ...budget import Candidate, select
from ...errors import GrowthError
from ...plan import GroupChange, NewUnits
from ..base import Decision, Timer, mean_loss, register_grower
from . import _tiny_amplitude as amplitude
from ._common import BaselineGrower, Context, slice_shape, unit_costs
from ._tiny_closed_form import TinyGroup, closed_form
from ._tiny_paths import TinyPath, tiny_paths

__all__ = ["TINY", "TinyGroup", "TinyPath"]


@register_grower("tiny")
class TINY(BaselineGrower):
    """TINY: new neurons that best fill the expressivity bottleneck, in closed form (module docstring).

    kwargs: budget=0.35, seed=0, batches=8, groups=None,
    update_existing=True: also add γ²·δW* to the existing consumer weights (GroMo's default; the only edit
      this grower makes outside the engine, value-only, before the plan is applied; False = new units only),
    gamma=None: a fixed amplitude instead of the line search (0 = function-preserving),
    gamma_min=1e-3, points_per_decade=4, max_decades=6: the line search grid,
    rel_threshold=1e-8: relative eigenvalue cut of S and candidate cut of λ,
    holdout=0: the last `holdout` growth batches are left out of the statistics and only choose γ (and are
      what `line_loss` reports); 0 = statistics and line search on the same batches, as GroMo does,
    random_directions=False: ablation: replace α, ω by random directions of the same norms (same count,
      same line search), to measure what the closed form buys,
    stat_dtype=torch.float64: dtype of the statistics.
    """

    name = "tiny"

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        batches: int | None = 8,
        groups: list[str] | None = None,
        per_group: bool = False,
        update_existing: bool = True,
        gamma: float | None = None,
        gamma_min: float = 1e-3,
        points_per_decade: int = 4,
        max_decades: int = 6,
        rel_threshold: float = 1e-8,
        random_directions: bool = False,
        holdout: int = 0,
        stat_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if gamma is not None and gamma < 0:
            raise ValueError(f"gamma must be >= 0, not {gamma}")
        if not 0 < gamma_min < 1:
            raise ValueError(f"gamma_min must be in (0, 1), not {gamma_min}")
        self.update_existing, self.gamma = bool(update_existing), gamma
        self.gamma_min, self.points, self.max_decades = float(gamma_min), int(points_per_decade), int(max_decades)
        self.holdout = int(holdout)
        self.rel_threshold, self.random_directions, self.stat_dtype = float(rel_threshold), bool(
            random_directions), stat_dtype

    # ---- which groups, and their closed form --------------------------------------------------------
    def paths(self, ctx: Context) -> dict[str, TinyPath]:
        """The groups TINY can grow (reasons for the others go to `ctx.skipped`)."""
        return tiny_paths(ctx, self.name, self.group_names)

    def analyse(self, ctx: Context, tps: dict[str, TinyPath]) -> dict[str, TinyGroup]:
        """The closed-form TINY solution of every group in `tps` (two passes over the statistics batches)."""
        return closed_form(ctx, tps, self._split(ctx)[0], self.stat_dtype, self.rel_threshold)

    def _split(self, ctx: Context) -> tuple[list[Any], list[Any]]:
        """(batches for the statistics, batches for the line search): with `holdout` = k > 0 the last k
        growth batches only choose γ; otherwise both are all of them (GroMo's in-sample search)."""
        k = self.holdout
        if k <= 0:
            return ctx.batches, ctx.batches
        if len(ctx.batches) <= k:
            raise GrowthError(f"tiny: holdout={k} needs more than {k} growth batches, got {len(ctx.batches)}; "
                              "raise the growth batches or lower holdout")
        return ctx.batches[:-k], ctx.batches[-k:]

    # ---- the amplitude -----------------------------------------------------------------------------
    def virtual_loss(self, ctx: Context, tg: TinyGroup, ks: list[int], gamma: float,
                     fixed: Iterable[tuple[TinyGroup, list[int], float]] = ()) -> float:
        """Line-search batches' mean loss with neurons `ks` of `tg` at amplitude γ, plus the already accepted
        groups `fixed` (group, neurons, γ), computed with hooks (tested to equal the engine's grown model)."""
        return amplitude.virtual_loss(ctx, tg, ks, gamma, fixed, batches=self._split(ctx)[1],
                                      update_existing=self.update_existing)

    def line_search(self, ctx: Context, tg: TinyGroup, ks: list[int],
                    fixed: Iterable[tuple[TinyGroup, list[int], float]] = ()) -> tuple[float, float]:
        """(γ, loss) minimising the line-search batches' loss on 0 ∪ a log grid from `gamma_min`, extended by a
        decade while the best point is the largest one tried (at most `max_decades` extensions)."""
        return amplitude.line_search(ctx, tg, ks, fixed, batches=self._split(ctx)[1],
                                     update_existing=self.update_existing, gamma_min=self.gamma_min,
                                     points=self.points, max_decades=self.max_decades)

    # ---- growth -------------------------------------------------------------------------------------
    def decide(self, ctx: Context) -> Decision:
        """Select neurons under the budget by expected improvement, then set each chosen group's γ by a line
        search with the groups already accepted switched on (best expected improvement first), so the
        amplitudes account for each other; a group whose best γ is 0 is not grown."""
        report = ctx.report
        with Timer(report.timings, "score"):
            tps = self.paths(ctx)
            sol = self.analyse(ctx, tps) if tps else {}
        with Timer(report.timings, "select"):
            costs = unit_costs(ctx, self.budget)
            cands = [Candidate("new", n, k, -float(v), costs[n])
                     for n, tg in sol.items() for k, v in enumerate(tg.improvement.tolist()) if v > 0]
            kept = select(cands, self.budget, ctx.groups)
            chosen: dict[str, list[int]] = {}
            for c in kept:
                chosen.setdefault(c.group, []).append(c.index)
        order = sorted(chosen, key=lambda n: -float(sol[n].improvement[chosen[n]].sum()))
        accepted: list[tuple[TinyGroup, list[int], float]] = []
        extra: dict[str, Any] = {"lambdas": {}, "first_order": {}, "gamma": {}, "line_loss": {}, "delta_decrease": {}}
        with Timer(report.timings, "line_search"):
            for n in order:
                tg, ks = sol[n], sorted(chosen[n])
                if self.random_directions:
                    tg.alpha, tg.omega = self._random_directions(ctx, tg)
                if self.gamma is None:
                    gamma, loss = self.line_search(ctx, tg, ks, accepted)
                    extra["line_loss"][n] = loss
                    if gamma == 0.0:
                        continue  # no amplitude lowers the loss: grow nothing here
                else:
                    gamma = float(self.gamma)
                tg.gamma = gamma
                extra["gamma"][n] = gamma
                accepted.append((tg, ks, gamma))
        if self.gamma is None:
            base = mean_loss(ctx.model, self._split(ctx)[1], ctx.loss_fn) if self.holdout else report.loss_before
            predicted = (extra["line_loss"][accepted[-1][0].tpath.name] - float(base or 0.0) if accepted else 0.0)
            if self.holdout:
                extra["holdout_loss_before"] = base
        else:
            predicted = -sum(gm ** 2 * (float(tg.first_order[ks].sum()) + (tg.delta_decrease if self.update_existing
                                                                           else 0.0)) for tg, ks, gm in accepted)
        changes = []
        for tg, ks, gamma in accepted:
            w = amplitude.new_weights(ctx, tg, ks, gamma)
            p = tg.tpath
            cons_shape = slice_shape(ctx.model, next(m for m in p.path.group.members if m.role == "consumer"))
            incoming = {p.path.weight: w["pw"].unsqueeze(1).detach().cpu()}
            if p.path.bias:
                incoming[p.path.bias] = w["pb"].reshape(-1, 1).detach().cpu()
            om = (tg.omega[ks] * gamma).to(w["cw"].dtype).reshape(len(ks), *cons_shape)
            changes.append(GroupChange(p.path.group, new=NewUnits(len(ks), incoming=incoming,
                                                                  outgoing={p.consumer_weight: om.detach().cpu()},
                                                                  init="zero")))
        for n, tg in sol.items():
            extra["lambdas"][n] = [float(v) for v in tg.lambdas[:8]]
            extra["first_order"][n] = [float(v) for v in tg.first_order[:8]]
            extra["delta_decrease"][n] = tg.delta_decrease
        finalize = None
        if self.update_existing:  # applied right after the engine adds the units, inside the safeguard's step
            finalize = amplitude.existing_update(ctx, accepted)
        preserving = all(gm == 0.0 for _, _, gm in accepted)
        plan = self.make_plan(ctx, changes, preserving=preserving)
        report.predicted_loss_change = predicted
        report.extra.update(extra)
        report.extra["update_existing"] = self.update_existing
        self.last_solution = sol
        return Decision(plan, finalize=finalize)

    def _random_directions(self, ctx: Context, tg: TinyGroup) -> tuple[torch.Tensor, torch.Tensor]:
        def like(t: torch.Tensor) -> torch.Tensor:
            r = torch.randn(t.shape, generator=ctx.gen, dtype=torch.float64).to(t)
            return r * (t.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-300))
        return like(tg.alpha), like(tg.omega)

